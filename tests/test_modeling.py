"""Forward / backward, gradients, aux losses, outputs, sparsity, dense equivalence, determinism, backends."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from transformers import ViTConfig, ViTForImageClassification

from hf_vmoe import VMoEBackbone, VMoEForImageClassification, VMoEForSemanticSegmentation, VMoEModel
from hf_vmoe.modeling_vmoe import VMoEExperts, VMoESparseMoeBlock

ROUTINGS = [("image", True), ("image", False), ("token", False)]  # (routing_level, shared_router)
ROUTING_IDS = ["image-shared-router", "image-per-block-router", "token"]
SEQ = 17  # 16 patches + class token in tiny_config


def pixels(batch=3, size=32):
    return torch.randn(batch, 3, size, size)


def base_of(model):
    return model.vmoe if hasattr(model, "vmoe") else model


def moe_blocks(model):
    return [m for m in model.modules() if isinstance(m, VMoESparseMoeBlock)]


def routing_rows(model):
    """Row of `expert_counts` that applies to each MoE block: the shared image router makes one decision (row 0)
    for every block; otherwise each block's router has its own row, in block order."""
    blocks = moe_blocks(model)
    shared = base_of(model).encoder.router is not None
    return [0 if shared else i for i in range(len(blocks))]


def routers(model):
    found = [m.router for m in moe_blocks(model) if m.router is not None]
    if base_of(model).encoder.router is not None:
        found.append(base_of(model).encoder.router)
    return found


def run_head(model, head, batch=3, **kwargs):
    """Forward + a loss for each head. Returns (output, loss)."""
    x = pixels(batch)
    if head == "classification":
        out = model(x, labels=torch.randint(0, 5, (batch,)), **kwargs)
        return out, out.loss
    if head == "segmentation":
        out = model(x, labels=torch.randint(0, 5, (batch, 32, 32)), **kwargs)
        return out, out.loss
    out = model(x, **kwargs)
    return out, sum(f.pow(2).mean() for f in out.feature_maps) + out.aux_loss


HEADS = {"classification": VMoEForImageClassification, "segmentation": VMoEForSemanticSegmentation,
         "backbone": VMoEBackbone}


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("num_shared", [0, 1])
@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
def test_forward_backward_gradients(routing, num_shared, k, head):
    level, shared_router = routing
    config = tiny_config(routing_level=level, shared_router=shared_router, num_shared_experts=num_shared,
                         num_experts_per_tok=k, router_importance_loss_coef=0.01,
                         pooling="mean")  # with "cls" pooling the last block's patch tokens do not reach the loss
    model = HEADS[head](config).train()
    out, loss = run_head(model, head, batch=2)
    assert torch.isfinite(loss)
    loss.backward()
    # routers: the shared encoder router or each block's router
    rs = routers(model)
    assert len(rs) == (1 if shared_router else 2)
    for router in rs:
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    counts = None if head == "backbone" else out.expert_counts  # the backbone output has no counts
    for block, row in zip(moe_blocks(model), routing_rows(model)):
        experts = block.experts
        for name in ("up_proj", "down_proj", "up_proj_bias", "down_proj_bias"):
            assert getattr(experts, name).grad is not None
        used = experts.up_proj.grad.flatten(1).abs().sum(-1) > 0
        if counts is not None:
            assert torch.equal(used, counts[row] > 0), (used, counts[row])
            assert torch.equal(experts.down_proj.grad.flatten(1).abs().sum(-1) > 0, counts[row] > 0)
        assert used.any()
        if level == "image":  # 2 images x k experts: at least 4 - 2k experts are idle and get exactly zero grad
            assert int((~used).sum()) >= config.num_experts - 2 * k
        if num_shared:
            assert block.shared_expert.fc1.weight.grad.abs().sum() > 0
            assert block.shared_expert.fc2.weight.grad.abs().sum() > 0
        else:
            assert block.shared_expert is None


@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
def test_expert_counts_match_routed_items(routing):
    level, shared_router = routing
    model = VMoEForImageClassification(tiny_config(routing_level=level, shared_router=shared_router,
                                                   num_experts_per_tok=2)).eval()
    assert model(pixels(3)).expert_counts is None  # plain inference computes no routing statistics
    out = model(pixels(3), output_router_logits=True)
    items = 3 if level == "image" else 3 * SEQ
    assert out.expert_counts.shape == (1 if shared_router else 2, 4)
    assert (out.expert_counts.sum(-1) == items * 2).all()


@pytest.mark.parametrize("head", ["classification", "segmentation"])
@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
def test_aux_loss_reaches_loss_without_output_router_logits(routing, head):
    level, shared_router = routing
    config = tiny_config(routing_level=level, shared_router=shared_router, router_aux_loss_coef=0.5,
                         router_z_loss_coef=0.1, router_importance_loss_coef=0.2)
    assert config.output_router_logits is False
    model = HEADS[head](config).eval()
    out, loss = run_head(model, head)
    assert out.router_logits is None
    assert out.aux_loss is not None and out.aux_loss > 0
    if head == "classification":
        labels = torch.randint(0, 5, (3,))
        out = model(pixels(3), labels=labels)
        task = F.cross_entropy(out.logits, labels)
    else:
        labels = torch.randint(0, 5, (3, 32, 32))
        labels[0, :4] = 255
        out = model(pixels(3), labels=labels)
        task = F.cross_entropy(out.logits, labels, ignore_index=255)
    torch.testing.assert_close(out.loss - task, out.aux_loss, rtol=1e-5, atol=1e-6)
    # coefficients at zero: no aux loss in `loss`
    quiet = HEADS[head](tiny_config(routing_level=level, shared_router=shared_router, router_aux_loss_coef=0.0,
                                    router_z_loss_coef=0.0, router_importance_loss_coef=0.0)).eval()
    out = quiet(pixels(3), labels=labels)
    assert out.aux_loss == 0


def test_aux_loss_is_the_mean_over_router_calls_of_each_term():
    config = tiny_config(routing_level="token", router_aux_loss_coef=1.0, router_z_loss_coef=0.0)
    model = VMoEModel(config).eval()
    out = model(pixels(2), output_router_logits=True)
    expected = []
    for logits, counts in zip(out.router_logits, out.expert_counts):
        probs = logits.softmax(-1)
        fraction = counts.float() / counts.sum()
        expected.append(4 * (fraction * probs.mean(0)).sum())
    torch.testing.assert_close(out.aux_loss, torch.stack(expected).mean())


@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
def test_output_flags(routing):
    level, shared_router = routing
    model = VMoEForImageClassification(tiny_config(routing_level=level, shared_router=shared_router)).eval()
    x = pixels(2)
    plain = model(x)
    assert plain.hidden_states is None and plain.attentions is None and plain.router_logits is None
    out = model(x, output_hidden_states=True, output_router_logits=True)
    assert len(out.hidden_states) == 5 and all(h.shape == (2, SEQ, 32) for h in out.hidden_states)
    items = 2 if level == "image" else 2 * SEQ
    assert len(out.router_logits) == (1 if shared_router else 2)
    assert all(r.shape == (items, 4) and r.dtype == torch.float32 for r in out.router_logits)
    # config default for output_router_logits is used when the argument is omitted
    model.config.output_router_logits = True
    assert model(x).router_logits is not None
    model.config.output_router_logits = False
    # attentions: sdpa returns none, eager returns the maps, and both give the same logits
    sdpa = model(x, output_attentions=True)
    model.set_attn_implementation("eager")
    eager = model(x, output_attentions=True)
    assert len(eager.attentions) == 4
    for maps in eager.attentions:
        assert maps.shape == (2, 2, SEQ, SEQ)
        torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, SEQ))
    torch.testing.assert_close(sdpa.logits, eager.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager.logits, plain.logits, rtol=1e-5, atol=1e-5)
    # return_dict=False gives a tuple starting with the logits
    assert torch.equal(model(x, return_dict=False)[0], eager.logits)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
def test_no_routing_runs_every_expert_on_every_input(routing, k, monkeypatch):
    """Count the rows each expert's up projection computes in the eager backend: each expert sees only the rows
    routed to it, once per block, and the total is B * S * k token rows (image routing: the S tokens of each of the
    B * k image assignments)."""
    level, shared_router = routing
    model = VMoEForImageClassification(tiny_config(routing_level=level, shared_router=shared_router,
                                                   num_experts_per_tok=k, num_experts=4)).eval()
    model.set_experts_implementation("eager")
    owners = {block.experts.up_proj[e].data_ptr(): (id(block.experts), e)  # an expert's up projection, by storage
              for block in moe_blocks(model) for e in range(4)}
    calls = []
    linear = torch.nn.functional.linear

    def counting(input, weight, bias=None):
        if weight.dim() == 2 and weight.data_ptr() in owners:
            calls.append((*owners[weight.data_ptr()], input.numel() // input.shape[-1]))  # (experts, expert, rows)
        return linear(input, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    for batch in (1, 5):
        calls.clear()
        out = model(pixels(batch), output_router_logits=True)
        items = batch * SEQ
        rows_per_item = SEQ if level == "image" else 1  # expert_counts counts images for image routing
        for block, row in zip(moe_blocks(model), routing_rows(model)):
            mine = [(e, n) for owner, e, n in calls if owner == id(block.experts)]
            experts_called = [e for e, _ in mine]
            assert len(experts_called) == len(set(experts_called)), "an expert ran twice in one block"
            assert sum(n for _, n in mine) == items * k
            for e, n in mine:
                assert n == out.expert_counts[row, e] * rows_per_item
            assert len(mine) == int((out.expert_counts[row] > 0).sum())
        assert len(calls) <= 2 * 4


def _dense_state_from_single_expert(moe_model):
    state = {}
    for key, value in moe_model.state_dict().items():
        if ".mlp.router." in key or key.endswith("encoder.router.weight"):
            continue
        if ".mlp.experts." in key:
            prefix, name = key.split(".mlp.experts.")
            target = {"up_proj": "fc1.weight", "up_proj_bias": "fc1.bias", "down_proj": "fc2.weight",
                      "down_proj_bias": "fc2.bias"}[name]
            state[f"{prefix}.mlp.{target}"] = value[0]
            continue
        state[key] = value
    return state


@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
def test_single_expert_equals_dense_mlp(routing):
    level, shared_router = routing
    common = dict(routing_level=level, num_experts=1, num_experts_per_tok=1, normalize_router_weights=True)
    moe = VMoEForImageClassification(tiny_config(shared_router=shared_router, moe_layers=(1, 3), **common)).eval()
    dense = VMoEForImageClassification(tiny_config(moe_layers=(), **common)).eval()
    missing, unexpected = dense.load_state_dict(_dense_state_from_single_expert(moe), strict=True)
    x = pixels(4)
    torch.testing.assert_close(moe(x).logits, dense(x).logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(moe(x, interpolate_pos_encoding=True).logits, dense(x).logits, rtol=1e-6, atol=1e-6)
    assert dense(x).aux_loss is None


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dense_vmoe_equals_transformers_vit(attn):
    config = tiny_config(moe_layers=(), qkv_bias=True)
    ours = VMoEForImageClassification(config).eval()
    vit_config = ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8, num_labels=5, layer_norm_eps=config.layer_norm_eps,
                           hidden_act=config.hidden_act, qkv_bias=True)
    vit = ViTForImageClassification(vit_config).eval()
    mapped = {
        key.replace("vmoe.encoder.layer.", "vit.layers.").replace("vmoe.", "vit."): value
        for key, value in ours.state_dict().items()
    }
    assert set(mapped) == set(vit.state_dict()), set(mapped) ^ set(vit.state_dict())
    vit.load_state_dict(mapped, strict=True)
    ours.set_attn_implementation(attn)
    vit.set_attn_implementation(attn)
    x = pixels(3)
    torch.testing.assert_close(ours(x).logits, vit(x).logits, rtol=1e-5, atol=1e-5)
    big = pixels(2, size=48)
    torch.testing.assert_close(
        ours(big, interpolate_pos_encoding=True).logits, vit(big, interpolate_pos_encoding=True).logits,
        rtol=1e-5, atol=1e-5,
    )


@pytest.mark.parametrize("num_shared", [0, 1])
@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
def test_eval_is_batch_invariant(routing, num_shared):
    level, shared_router = routing
    for capacity in (None, 0.5):  # a training capacity never applies at eval (eval_capacity_factor=None)
        model = VMoEForImageClassification(tiny_config(
            routing_level=level, shared_router=shared_router, num_shared_experts=num_shared, num_experts_per_tok=2,
            capacity_factor=capacity, router_noise_std=1.0)).eval()
        x = pixels(6)
        full = model(x).logits
        singles = torch.cat([model(x[i : i + 1]).logits for i in range(6)])
        torch.testing.assert_close(full, singles, rtol=1e-5, atol=1e-6)
        perm = torch.randperm(6)
        torch.testing.assert_close(model(x[perm]).logits, full[perm], rtol=1e-5, atol=1e-6)
        mixed = torch.cat([x[:2], pixels(3)])
        torch.testing.assert_close(model(mixed).logits[:2], full[:2], rtol=1e-5, atol=1e-6)
    # an eval capacity that cannot drop anything (capacity >= items) keeps invariance as well
    model.config.eval_capacity_factor = 4 / 2
    torch.testing.assert_close(model(x).logits, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_one_image_fast_path_equals_sorted_dispatch(top_k, monkeypatch):
    """`vmoe_cpu`, the default experts backend of image routing on CPU, runs one image at inference without the
    sort / gather / scatter of the eager loop and gives the same output (the experts summed in ascending id order,
    as the loop does), never building per-expert counts; with gradients it is the eager loop."""
    model = VMoEForImageClassification(tiny_config(num_experts=4, num_experts_per_tok=top_k))
    assert model.config._experts_implementation == "vmoe_cpu"
    experts = model.vmoe.encoder.layer[-1].mlp.experts
    hidden = torch.randn(1, 17, experts.hidden_dim)
    index = torch.tensor([[3, 0, 2][:top_k]])  # slot order != expert order
    weights = torch.tensor([[0.5, 0.3, 0.2][:top_k]])
    eager = VMoEExperts.forward.__wrapped__
    reference = eager(experts, hidden.reshape(-1, experts.hidden_dim), index.repeat_interleave(17, 0),
                      weights.repeat_interleave(17, 0)).view(1, 17, -1).detach()
    with torch.no_grad(), monkeypatch.context() as patch:  # inference: cached weight views, no counts
        patch.setattr(torch, "bincount", lambda *a, **k: pytest.fail("the single-image path counted experts"))
        torch.testing.assert_close(experts(hidden, index, weights), reference, rtol=0, atol=1e-6)
    # with gradients (a training step on one image) the eager loop runs, and the weights and input get gradients
    weights.requires_grad_(True)
    hidden.requires_grad_(True)
    (experts(hidden, index, weights) * reference).sum().backward()
    assert weights.grad.abs().sum() > 0 and hidden.grad.abs().sum() > 0


@pytest.mark.parametrize("top_k", [1, 2])
def test_padded_token_path_equals_sorted_dispatch(top_k, monkeypatch):
    """`vmoe_cpu` runs few token rows per expert at inference as one batched matmul over capacity-padded (E, C, H)
    buffers (`infer_padded`) and gives the eager loop's output (the same rows, summed in ascending expert order; only
    the matmul kernels differ), also for repeated experts in a row, bfloat16 experts and small-integer ids. More
    rows, a padding of more than half, one thread, gradients, tracing / compiling, or ids of another rank's experts
    run the loop."""
    from hf_vmoe.modeling_vmoe import PADDED_MAX_ROWS

    model = VMoEForImageClassification(tiny_config(routing_level="token", num_experts=4, num_experts_per_tok=top_k))
    experts = model.vmoe.encoder.layer[-1].mlp.experts
    eager = VMoEExperts.forward.__wrapped__
    padded_calls = []
    infer_padded = VMoEExperts.infer_padded
    monkeypatch.setattr(VMoEExperts, "infer_padded",
                        lambda self, *args: padded_calls.append(args[-1]) or infer_padded(self, *args))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the rule, whatever the machine

    def padded(index, module=experts, dtype=torch.float32, atol=1e-6):
        rows, calls = index.shape[0], len(padded_calls)
        hidden = torch.randn(rows, module.hidden_dim).to(dtype)
        weights = torch.rand(rows, top_k)  # float32 weights for any expert dtype, as the router gives them
        with torch.no_grad():
            reference = eager(module, hidden, index.long(), weights)
            torch.testing.assert_close(module(hidden, index, weights), reference, rtol=0, atol=atol)
        return len(padded_calls) > calls

    balanced = torch.stack([torch.randperm(4)[:top_k] for _ in range(30)])  # ~30 * k / 4 rows per expert
    assert padded(balanced)
    assert padded_calls[-1] == torch.bincount(balanced.flatten(), minlength=4).tolist()
    assert padded(torch.randint(0, 4, (40, top_k)))  # rows that repeat an expert
    assert padded(balanced.to(torch.int16))
    bf16 = copy.deepcopy(experts).to(torch.bfloat16)
    bf16.config._experts_implementation = "vmoe_cpu"
    assert padded(balanced, bf16, torch.bfloat16, atol=1e-2)
    skewed = torch.zeros(30, top_k, dtype=torch.long)  # padding would quadruple the rows
    skewed[:, 1:] = torch.arange(1, top_k)
    assert not padded(skewed)
    assert not padded(torch.stack([torch.randperm(4)[:top_k] for _ in range(4 * PADDED_MAX_ROWS // top_k + 8)]))
    remote = balanced.clone()
    remote[::3, 0] = 4  # an id of another rank's expert (expert parallelism): the loop drops it
    assert not padded(remote)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "get_num_threads", lambda: 1)
        assert not padded(balanced)
    with monkeypatch.context() as patch:  # under torch.compile / export: no host reads of the counts
        patch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not padded(balanced)
    # with gradients the eager loop runs (the input gets its gradient)
    calls = len(padded_calls)
    hidden = torch.randn(30, experts.hidden_dim, requires_grad=True)
    experts(hidden, balanced, torch.rand(30, top_k)).sum().backward()
    assert len(padded_calls) == calls and hidden.grad.abs().sum() > 0
    # the default model at batch 1 takes the padded path (where a block's load is even enough) and gives the eager
    # backend's logits
    model.eval()
    padded_calls.clear()
    x = pixels(1)
    with torch.no_grad():
        logits = model(x).logits
        assert padded_calls
        model.set_experts_implementation("eager")
        torch.testing.assert_close(model(x).logits, logits, rtol=0, atol=1e-6)


def test_training_mode_without_gradients_routes_on_tensors():
    """The host-side plan is for inference only: a batch-1 forward in train() mode under no_grad (an EMA teacher, a
    statistics pass) still adds router noise and follows super-class forcing."""
    from hf_vmoe.modeling_vmoe import TopKRouting

    model = VMoEForImageClassification(tiny_config(superclass_ids=[0, 1, 2, 3, 0], train_routing="superclass",
                                                   router_noise_std=1.0)).train()
    with torch.no_grad():
        _, plan = model.vmoe.encoder.router(torch.randn(1, SEQ, 32), torch.tensor([3]))
    assert type(plan) is TopKRouting and plan.noisy_logits is not None
    assert plan.top_k_index.tolist() == [[3]]


@pytest.mark.parametrize("top_k", [1, 2])
def test_one_image_inference_is_planned_on_the_host_and_matches_the_tensor_path(top_k):
    """At batch 1 on a CPU without gradients the image router decides on the host (`OneImageRouting`) and the experts
    run on cached weight views; logits, recorded statistics and the aux loss equal the tensor path (gradients
    enabled), and the views follow in-place loads, replaced parameters and dtype conversions."""
    from hf_vmoe.modeling_vmoe import OneImageRouting, TopKRouting

    model = VMoEForImageClassification(tiny_config(num_experts_per_tok=top_k, normalize_router_weights=top_k > 1))
    model.eval()
    router = model.vmoe.encoder.router
    hidden = torch.randn(1, SEQ, 32)
    with torch.no_grad():
        assert type(router(hidden)[1]) is OneImageRouting
    assert type(router(hidden)[1]) is TopKRouting  # gradients enabled: the tensor path
    x = pixels(1)

    def both(**kwargs):
        with torch.no_grad():
            host = model(x, **kwargs)
        return host, model(x, **kwargs)

    host, tensor = both(output_router_logits=True, labels=torch.tensor([2]))
    torch.testing.assert_close(host.logits, tensor.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(host.aux_loss, tensor.aux_loss, rtol=1e-5, atol=1e-7)
    assert torch.equal(host.expert_counts, tensor.expert_counts) and host.expert_counts.sum() == top_k  # one image
    torch.testing.assert_close(model(torch.cat([x, pixels(2)])).logits[:1], tensor.logits, rtol=1e-5, atol=1e-6)
    experts = moe_blocks(model)[0].experts
    with torch.no_grad():  # an in-place load shows through the cached views
        model.load_state_dict({k: v * 1.5 if "experts" in k else v for k, v in model.state_dict().items()})
    host, tensor = both()
    torch.testing.assert_close(host.logits, tensor.logits, rtol=1e-5, atol=1e-6)
    experts.down_proj = torch.nn.Parameter(torch.randn_like(experts.down_proj))  # a replaced parameter
    host, tensor = both()
    torch.testing.assert_close(host.logits, tensor.logits, rtol=1e-5, atol=1e-6)
    model.to(torch.float64)  # a conversion drops the old views
    assert experts._views is None
    host, tensor = both()
    assert host.logits.dtype == torch.float64
    torch.testing.assert_close(host.logits, tensor.logits, rtol=1e-7, atol=1e-9)  # float32 router weights


def test_host_top_k_equals_torch_topk_and_defers_ties():
    from hf_vmoe.modeling_vmoe import host_top_k

    for top_k, normalize in itertools.product([1, 2, 3], [False, True]):
        logits = torch.randn(10)
        weights, index = torch.topk(logits.softmax(-1), top_k)
        if normalize:
            weights = weights / weights.sum()
        experts, host_weights = host_top_k(logits.tolist(), top_k, normalize)
        assert experts == index.tolist()
        torch.testing.assert_close(torch.tensor(host_weights), weights, rtol=1e-6, atol=1e-7)
    assert host_top_k([0.5, 1.0, 0.5, 0.1], 2, False) is None  # the second place is a tie: torch.topk decides
    assert host_top_k([0.5, 1.0, 0.5, 0.1], 3, False)[0] in ([1, 0, 2], [1, 2, 0])
    assert host_top_k([0.0, 0.0], 2, False) is not None  # all experts taken: no tie to break


def test_mean_router_input_after_inference_mode_still_trains():
    """The router's averaging weights are made outside inference mode, so a training step after an
    `inference_mode` pass can save them for backward; the mean equals `Tensor.mean`."""
    model = VMoEForImageClassification(tiny_config(router_input="mean"))
    router = model.vmoe.encoder.router
    hidden = torch.randn(2, SEQ, 32)
    torch.testing.assert_close(router.mean_patch_token(hidden), hidden[:, 1:].mean(dim=1), rtol=1e-6, atol=1e-7)
    with torch.inference_mode():
        model.eval()(pixels(1))
    model.train()
    model(pixels(2), labels=torch.tensor([0, 1])).loss.backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
def test_eval_is_deterministic_and_noise_free(routing):
    level, shared_router = routing
    config = tiny_config(routing_level=level, shared_router=shared_router, router_noise_std=5.0, num_experts_per_tok=2)
    model = VMoEForImageClassification(config).eval()
    x = pixels(4)
    first = model(x, output_router_logits=True)
    second = model(x, output_router_logits=True)
    assert torch.equal(first.logits, second.logits) and torch.equal(first.expert_counts, second.expert_counts)
    quiet = copy.deepcopy(model)
    quiet.config.router_noise_std = 0.0
    assert torch.equal(quiet(x).logits, first.logits)
    # in training the noise is applied: the choice of experts changes between two passes
    model.train()
    outs = [model(x).logits for _ in range(3)]
    assert not all(torch.equal(outs[0], o) for o in outs[1:])
    quiet.train()
    assert torch.equal(quiet(x).logits, quiet(x).logits)


@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
def test_capacity_drops_only_where_configured(routing):
    level, shared_router = routing
    batch = 8
    items = batch * (1 if level == "image" else SEQ)

    def routed(model, train):
        model.train(train)
        return model(pixels(batch), output_router_logits=True).expert_counts.sum(-1)

    dropless = VMoEForImageClassification(tiny_config(routing_level=level, shared_router=shared_router))
    assert (routed(dropless, True) == items).all() and (routed(dropless, False) == items).all()
    train_only = VMoEForImageClassification(tiny_config(routing_level=level, shared_router=shared_router,
                                                        capacity_factor=0.5))
    capacity = -(-items * 1 * 0.5 // 4)  # ceil(N * k * factor / E)
    assert (routed(train_only, True) <= 4 * capacity).all() and (routed(train_only, True) < items).all()
    assert (routed(train_only, False) == items).all()
    both = VMoEForImageClassification(tiny_config(routing_level=level, shared_router=shared_router,
                                                  capacity_factor=0.5, eval_capacity_factor=0.5))
    assert (routed(both, False) < items).all()


@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
def test_experts_backends_agree(routing):
    level, shared_router = routing
    model = VMoEForImageClassification(tiny_config(routing_level=level, shared_router=shared_router,
                                                   num_experts_per_tok=2, num_shared_experts=1))
    assert model._can_set_experts_implementation()
    assert VMoEModel._can_set_experts_implementation() and VMoEBackbone._can_set_experts_implementation()
    x = pixels(3)
    labels = torch.randint(0, 5, (3,))
    results = {}
    for impl in ("eager", "vmoe_cpu", "batched_mm", "grouped_mm"):
        model.set_experts_implementation(impl)
        assert model.config._experts_implementation == impl
        model.zero_grad()
        model.eval()
        logits = model(x).logits
        model.config.eval_capacity_factor = 0.5  # the capacity path (some assignments dropped)
        dropped = model(x).logits
        model.config.eval_capacity_factor = None
        model.train()
        model(x, labels=labels).loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[impl] = (logits, dropped, grads)
    for impl in ("vmoe_cpu", "batched_mm", "grouped_mm"):
        for ours, ref in zip(results[impl], results["eager"]):
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
def test_gradient_checkpointing_gives_the_same_gradients(routing):
    level, shared_router = routing
    model = VMoEForImageClassification(tiny_config(routing_level=level, shared_router=shared_router,
                                                   num_experts_per_tok=2)).train()
    x, labels = pixels(3), torch.randint(0, 5, (3,))
    model(x, labels=labels).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    model(x, labels=labels).loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(reference)
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
def test_router_is_float32_under_bf16(routing):
    level, shared_router = routing
    model = VMoEForImageClassification(tiny_config(routing_level=level, shared_router=shared_router)).eval()
    x = pixels(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, output_router_logits=True)
    assert out.logits.dtype == torch.bfloat16
    assert all(r.dtype == torch.float32 for r in out.router_logits)
    assert out.aux_loss.dtype == torch.float32
    half = copy.deepcopy(model).to(torch.bfloat16)
    out = half(x, output_router_logits=True, labels=torch.tensor([0, 1]))
    assert out.logits.dtype == torch.bfloat16
    assert all(r.dtype == torch.float32 for r in out.router_logits)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(r.weight.grad).all() for r in routers(half))


@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
def test_batch_of_one_and_idle_experts_give_finite_losses(routing):
    level, shared_router = routing
    config = tiny_config(routing_level=level, shared_router=shared_router, num_experts=8, router_aux_loss_coef=1.0,
                         router_importance_loss_coef=1.0, router_z_loss_coef=1.0, capacity_factor=0.25)
    model = VMoEForImageClassification(config).train()
    out = model(pixels(1), labels=torch.tensor([3]))
    assert (out.expert_counts == 0).any()  # idle experts
    assert torch.isfinite(out.aux_loss) and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # a zero router (all logits equal) is fine too
    for router in routers(model):
        torch.nn.init.zeros_(router.weight)
    assert torch.isfinite(model(pixels(1), labels=torch.tensor([0])).loss)


def test_heads_do_not_take_loss_kwargs():
    """The Trainer then divides `loss` (task + aux) by the accumulation steps itself: no over-weighted aux loss."""
    assert VMoEForImageClassification.accepts_loss_kwargs is False
    assert VMoEForSemanticSegmentation.accepts_loss_kwargs is False


def test_interpolate_pos_encoding_and_rectangular_images():
    model = VMoEForSemanticSegmentation(tiny_config(routing_level="token")).eval()
    out = model(torch.randn(2, 3, 48, 64), interpolate_pos_encoding=True)
    assert out.logits.shape == (2, 5, 48, 64)
    cls = VMoEForImageClassification(tiny_config(image_size=(32, 48))).eval()
    assert cls(torch.randn(2, 3, 32, 48)).logits.shape == (2, 5)


def test_pooling_variants_and_layerscale_drop_path():
    x = pixels(2)
    for pooling, width in (("cls", 32), ("mean", 32), ("cls_mean", 64)):
        model = VMoEModel(tiny_config(pooling=pooling, layerscale_value=0.1, drop_path_rate=0.1)).eval()
        out = model(x)
        assert out.pooler_output.shape == (2, width)
        torch.testing.assert_close(out.pooler_output[:, :32] if pooling != "mean" else out.pooler_output,
                                   out.last_hidden_state[:, 0] if pooling != "mean"
                                   else out.last_hidden_state[:, 1:].mean(1))
    # layer scale is applied: scaling lambda to zero turns every block into the identity
    model = VMoEModel(tiny_config(layerscale_value=0.1)).eval()
    for layer in model.encoder.layer:
        layer.layer_scale1.lambda1.data.zero_()
        layer.layer_scale2.lambda1.data.zero_()
    out = model(x, output_hidden_states=True)
    for h in out.hidden_states[1:]:
        torch.testing.assert_close(h, out.hidden_states[0])


def test_all_routing_combinations_build_for_all_heads():
    """A cheap sweep over the remaining options (router input, normalisation, capacity, priority)."""
    for router_input, normalize, capacity, priority in itertools.product(
        ("cls", "mean"), (False, True), (None, 1.0), (False, True)
    ):
        config = tiny_config(router_input=router_input, normalize_router_weights=normalize,
                             capacity_factor=capacity, batch_priority_routing=priority, num_experts_per_tok=2)
        model = VMoEForImageClassification(config).train()
        out = model(pixels(2), labels=torch.tensor([0, 1]))
        out.loss.backward()
        assert torch.isfinite(out.loss)


@pytest.mark.parametrize("router_type", ["top_k", "expert_choice"])
def test_group_padding_returns_the_real_images_of_the_padded_batch(router_type):
    """`router_group_remainder="pad"`: 3 images in groups of 2 images' tokens run as 4 (one all-zero image), and
    every per-image output (hidden states, attentions, router logits, feature maps) is the padded run's first 3."""
    options = dict(routing_level="token", router_type=router_type, capacity_factor=1.0, router_group_size=2 * 17,
                   router_group_remainder="pad", moe_layers=(1, 3))
    config = tiny_config(**options)
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    padded = torch.cat([x, torch.zeros(1, 3, 32, 32)])
    flags = dict(output_hidden_states=True, output_attentions=True, output_router_logits=True)
    model = VMoEModel(config).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ours, theirs = model(x, **flags), model(padded, **flags)
    assert ours.last_hidden_state.shape[0] == 3
    torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state[:3])
    torch.testing.assert_close(ours.pooler_output, theirs.pooler_output[:3])
    for name, per_image in (("hidden_states", 1), ("attentions", 1), ("router_logits", 17)):
        assert len(ours[name]) == len(theirs[name]) > 0
        for a, b in zip(ours[name], theirs[name]):
            torch.testing.assert_close(a, b[: 3 * per_image])
    torch.testing.assert_close(ours.aux_loss, theirs.aux_loss)  # the losses include the padding
    backbone = VMoEBackbone(tiny_config(**options, out_features=["stage2", "stage4"])).eval()
    backbone.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        ours, theirs = backbone(x), backbone(padded)
    assert [m.shape[0] for m in ours.feature_maps] == [3, 3]
    for a, b in zip(ours.feature_maps, theirs.feature_maps):
        torch.testing.assert_close(a, b[:3])


def test_group_padding_errors_name_the_batch_as_given():
    model = VMoEModel(tiny_config(routing_level="token", capacity_factor=1.0, router_group_size=2 * 17,
                                  router_group_remainder="pad", moe_layers=(1, 3))).eval()
    with pytest.raises(ValueError, match=r"got \(3, 4, 32, 32\)"):
        model(torch.randn(3, 4, 32, 32))
    x = torch.randn(3, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"1 NaN or infinite values \(of 9216\)"):
        model(x)
