"""Expert parallelism: `from_pretrained(..., distributed_config=DistributedConfig(ep_size=2))`
shards the experts of a token-routed VMoE over 2 CPU processes (gloo), and the outputs equal the single-process
model's.

How transformers 5.24 runs it (read in `transformers/distributed/`, tried on CPU with gloo):
- the plan is `config.base_model_ep_plan` (keys relative to the base model, `encoder.layer.*.mlp.experts...`),
  merged with the class `_ep_plan` and the children's plans (`mixin.py`, `init_parallel_plans`), so
  `VMoEForImageClassification.ep_plan` has the same keys under `vmoe.`;
- `"grouped_gemm"` shards a stacked expert parameter on dim 0 and sets `experts.num_experts` to the local count;
  `"ep_dispatch_experts"` replaces `experts.forward(hidden_states, top_k_index, top_k_weights)` (global expert ids)
  by an `EPImplementation` (`expert_parallel.py`) that hands the experts' own forward local ids;
- `ep_size` must divide `fsdp_size * tp_size` (`configuration_utils.py`), so `ep_size=2` alone is refused: the
  ranks are either data-parallel (`fsdp_size=2`: each rank its own batch, tokens exchanged with all-to-all) or share
  one batch (`tp_size=2`: at inference each rank runs its experts on the whole batch with the other ranks' routes
  masked as expert id `num_experts` (local) with weight 0, then an all-reduce). VMoE has no tensor-parallel plan
  and transformers refuses `tp_size>1` with an empty one (`mixin.py`, `_resolve_parallel_plans`), so the
  shared-batch test names one no-op rule (`"replicate"` on the final layer norm).

The plan is declared by `VMoEConfig.base_model_ep_plan`: a missing plan fails these tests.
"""

import os
import socket
import tempfile
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_config
from hf_vmoe import VMoEBackbone, VMoEForImageClassification, VMoEModel

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")

# What hf_vmoe should declare as `VMoEConfig.base_model_ep_plan`, for token routing only.
BASE_EP_PLAN = {
    "encoder.layer.*.mlp.experts.up_proj": "grouped_gemm",
    "encoder.layer.*.mlp.experts.up_proj_bias": "grouped_gemm",
    "encoder.layer.*.mlp.experts.down_proj": "grouped_gemm",
    "encoder.layer.*.mlp.experts.down_proj_bias": "grouped_gemm",
    "encoder.layer.*.mlp.experts": "ep_dispatch_experts",
}
BACKENDS = ("eager", "batched_mm", "grouped_mm")
ATOL = 1e-5
TIMEOUT_S = 240


def token_config(**overrides):
    kwargs = dict(routing_level="token", num_experts=4, num_experts_per_tok=2, moe_layers=[1, 3])
    kwargs.update(overrides)
    return tiny_config(**kwargs)


# ------------------------------------------------------------------------------------------------------------------
# The declared plan (in process)
# ------------------------------------------------------------------------------------------------------------------


def test_ep_plan_declared_for_token_routing():
    config = token_config()
    assert VMoEModel(config).ep_plan == BASE_EP_PLAN
    assert VMoEBackbone(config).ep_plan == BASE_EP_PLAN  # the backbone is its own base model
    model = VMoEForImageClassification(config)
    assert model.ep_plan == {f"vmoe.{key}": style for key, style in BASE_EP_PLAN.items()}
    # every rule names something that exists in every MoE block (a typo would silently shard nothing)
    names = dict(model.named_parameters()) | dict(model.named_modules())
    for layer in config.moe_layers:
        for key in BASE_EP_PLAN:
            assert f"vmoe.{key}".replace("*", str(layer)) in names, key


def test_no_ep_plan_for_image_routing():
    """Image routing runs the experts on whole images with the full stacked weights, which EP does not wrap: sharding them
    would fail inside the forward ("aten.addmm.default got mixed torch.Tensor and DTensor"). Without a plan,
    `ep_size>1` is refused at load by transformers ("... has no `ep_plan`")."""
    assert VMoEForImageClassification(token_config()).ep_plan  # declared for token routing
    assert not VMoEForImageClassification(tiny_config(routing_level="image")).ep_plan


# ------------------------------------------------------------------------------------------------------------------
# 2 gloo processes against the single-process model
# ------------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, path, dist_kwargs, backends, inputs, refs, queue):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    report = {"rank": rank}
    try:
        from torch.distributed.tensor import DTensor
        from transformers.distributed import DistributedConfig

        report["diffs"] = {}
        for backend in backends:
            # the backend is chosen at load: after FSDP wraps the model its class is `FSDPVMoEForImageClassification`,
            # and transformers' `set_experts_implementation` then refuses it (`_can_set_experts_implementation`
            # looks for `@use_experts_implementation` in the source of the class's module)
            model = VMoEForImageClassification.from_pretrained(
                path, distributed_config=DistributedConfig(**dist_kwargs), experts_implementation=backend
            ).eval()
            assert model.config._experts_implementation == backend
            with torch.no_grad():
                logits = model(pixel_values=inputs[rank]).logits
            report["diffs"][backend] = (logits - refs[rank]).abs().max().item()
        report["backend"] = torch.distributed.get_backend()
        experts = [module for name, module in model.named_modules() if name.endswith("mlp.experts")]
        report["local_num_experts"] = [e.num_experts for e in experts]
        report["local_shapes"] = [
            tuple(p.to_local().shape) if isinstance(p, DTensor) else tuple(p.shape)
            for e in experts for p in (e.up_proj, e.up_proj_bias, e.down_proj, e.down_proj_bias)
        ]
        # training: the token exchange and its backward run, every local expert shard gets a finite gradient
        model.train()
        loss = model(pixel_values=inputs[rank], labels=torch.zeros(len(inputs[rank]), dtype=torch.long)).loss
        loss.backward()
        grads = [e.up_proj.grad for e in experts]
        report["grads_finite"] = all(
            g is not None and bool(torch.isfinite(g.to_local() if isinstance(g, DTensor) else g).all()) for g in grads
        )
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which fails the test with it
        report["error"] = "".join(traceback.format_exception(err))[-4000:]
    finally:
        queue.put(report)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run_two_ranks(dist_kwargs, backends, shared_batch, config=None):
    config = config or token_config()
    with tempfile.TemporaryDirectory() as path:
        torch.manual_seed(0)
        model = VMoEForImageClassification(config).eval()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # large weights and non-zero biases: a wrong shard or a wrong expert shows
            for name, param in model.named_parameters():
                if ".mlp." in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
        model.save_pretrained(path)
        pixels = torch.randn(3, 3, 32, 32, generator=gen)
        # shared batch: both ranks hold the same 3 images; data-parallel: uneven batches (2 images, then 1)
        inputs = [pixels, pixels] if shared_batch else [pixels[:2], pixels[2:]]
        with torch.no_grad():
            refs = [model(pixel_values=x).logits for x in inputs]

        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(rank, 2, port, path, dist_kwargs, backends, inputs, refs, queue))
                 for rank in range(2)]
        for proc in procs:
            proc.start()
        reports = []
        try:
            for _ in procs:
                reports.append(queue.get(timeout=TIMEOUT_S))
        except Exception:  # a rank died or hangs in a collective
            reports.append({"error": f"no report within {TIMEOUT_S}s (a rank died or hangs)"})
        finally:
            for proc in procs:
                proc.join(timeout=30)
                if proc.is_alive():
                    proc.kill()
    errors = [r["error"] for r in reports if "error" in r]
    assert not errors, "\n\n".join(errors)
    return sorted(reports, key=lambda r: r["rank"])


def _check(reports, config, backends):
    local = config.num_experts // 2
    per_block = [(local, config.moe_intermediate_size, config.hidden_size), (local, config.moe_intermediate_size),
                 (local, config.hidden_size, config.moe_intermediate_size), (local, config.hidden_size)]
    for report in reports:
        assert report["backend"] == "gloo"
        assert report["local_num_experts"] == [local] * len(config.moe_layers), report
        assert report["local_shapes"] == per_block * len(config.moe_layers), report
        for backend in backends:
            assert report["diffs"][backend] <= ATOL, (report["rank"], backend, report["diffs"])
        assert report["grads_finite"], report


@pytest.mark.slow
def test_expert_parallel_data_parallel_ranks_match_single_process():
    """DistributedConfig(fsdp_size=2, ep_size=2): each rank its own (uneven) batch, tokens exchanged with
    all-to-all; every experts backend gives the single-process logits of that rank's batch."""
    config = token_config()
    reports = _run_two_ranks(dict(fsdp_size=2, ep_size=2), BACKENDS, shared_batch=False, config=config)
    _check(reports, config, BACKENDS)


@pytest.mark.slow
def test_expert_parallel_shared_batch_matches_single_process():
    """DistributedConfig(tp_size=2, ep_size=2): both ranks hold the same batch; at inference transformers' default
    (`ep_implementation="auto"`) masks the other rank's routes as local expert id `num_experts` with weight 0 and
    all-reduces, so the eager experts must skip that id (transformers' `batched_mm` / `grouped_mm` already do).
    Training falls back to all-to-all."""
    config = token_config()
    dist_kwargs = dict(tp_size=2, ep_size=2, tp_plan={"vmoe.layernorm": "replicate"})  # no-op TP rule, see top
    reports = _run_two_ranks(dist_kwargs, ("eager", "batched_mm"), shared_batch=True, config=config)
    _check(reports, config, ("eager", "batched_mm"))
