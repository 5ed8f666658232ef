"""Numerical parity with Google's reference V-MoE (google-research/vmoe, JAX/Flax, imported from ../shared/ref).

Each case builds a small V-MoE with vmoe's own Flax modules (random, perturbed parameters), saves it with vmoe's
own sharded checkpoint writer, converts it with `hf_vmoe.integrations.convert_vmoe` and runs both models on the same images:

* inference (vmoe deterministic=True, hf eval()): logits within 1e-4 of the logit scale, the experts every token
  chose (best first), and which choices capacity dropped, in every MoE block;
* training mode without router noise (vmoe deterministic=False, hf train()): the same, under the training capacity,
  and the auxiliary losses vmoe reports in its metrics against hf_vmoe's `aux_loss`;
* batches that are not whole routing groups: vmoe's evaluator pads its last batch with all-zero examples, hf_vmoe's
  `router_group_remainder="pad"` (set by the converter) does the same;
* training with router noise: the noise samples differ, so hf_vmoe's `aux_loss` is checked against vmoe's own loss
  functions (importance and load loss) applied to the clean and noisy logits of hf_vmoe's forward;
* expert choice (vmoe's `NoisyTopItemsPerExpertRouter`) and Soft MoE (vmoe's `SoftRouter`), in inference and training
  without noise: logits, the tokens each expert took in each group (expert choice), the dispatch and combine weights
  (Soft MoE), and no auxiliary loss.

`Case.needs` names the parity options of VMoEConfig a case exercises (docs/vmoe-parity-spec.md §10); every one
exists now, so every case is an ordinary test. The whole module skips when the reference code or jax is absent.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings

import numpy as np
import pytest
import torch

import vmoe_reference as ref

pytestmark = pytest.mark.skipif(ref.skip_reason() is not None, reason=str(ref.skip_reason()))

BATCH, IMAGE, TOKENS = 8, 24, 10  # 24 px images, 8 px patches: 9 patches + the class token
RTOL = 1e-4  # max |logit difference| / max |reference logit|


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    config: dict  # vmoe_reference.model_config kwargs
    needs: tuple[str, ...] = ()  # the VMoEConfig parity options the case exercises
    drops: bool = False  # capacity must drop some choices (a check that the case tests capacity)
    eval_overrides: tuple = ()  # vmoe's evaluate.model_overrides: ((dispatcher field, value), ...)


ONE_GROUP = BATCH * TOKENS  # 80 tokens: one routing group per batch
TWO_IMAGES = 4 * TOKENS  # 40 tokens: 2 groups of 4 images

CASES = [
    Case("k1-last2-dropless", dict(k=1, moe_layers=(2, 3), capacity_factor=4.0, group_size=ONE_GROUP)),
    Case("k2-every2-dropless-groups", dict(k=2, moe_layers=(1, 3), capacity_factor=2.0, group_size=TWO_IMAGES)),
    Case("k1-last2-capacity", dict(k=1, moe_layers=(2, 3), capacity_factor=1.0, group_size=ONE_GROUP), drops=True),
    Case("k2-every2-capacity-bpr",
         dict(k=2, moe_layers=(1, 3), capacity_factor=1.0, batch_priority=True, group_size=ONE_GROUP), drops=True),
    Case("k2-every2-capacity-bpr-groups",
         dict(k=2, moe_layers=(1, 3), capacity_factor=1.0, batch_priority=True, group_size=TWO_IMAGES),
         needs=("router_group_size",), drops=True),
    Case("k1-last2-capacity-groups-rounded",  # ceil(40 * 1 * 1.0 / 4) = 10 -> 12 (a multiple of 4)
         dict(k=1, moe_layers=(2, 3), capacity_factor=1.0, group_size=TWO_IMAGES),
         needs=("router_group_size", "capacity_multiple_of"), drops=True),
    Case("k2-capacity-rounded",  # ceil(80 * 2 * 0.75 / 4) = 30 -> 32
         dict(k=2, moe_layers=(2, 3), capacity_factor=0.75, batch_priority=True, group_size=ONE_GROUP),
         needs=("capacity_multiple_of",), drops=True),
    Case("k2-indices-dispatcher-groups",
         dict(k=2, moe_layers=(1, 3), capacity_factor=1.0, batch_priority=True, group_size=TWO_IMAGES,
              dispatcher="indices"),
         needs=("router_group_size",), drops=True),
    Case("eval-capacity-override",  # trains at capacity factor 4 (dropless), evaluates at 1.0
         dict(k=2, moe_layers=(1, 3), capacity_factor=4.0, batch_priority=True, group_size=ONE_GROUP),
         drops=True, eval_overrides=(("capacity_factor", 1.0),)),
    Case("pre-logits", dict(k=1, moe_layers=(2, 3), capacity_factor=4.0, group_size=ONE_GROUP,
                            representation_size=12), needs=("representation_size",)),
    Case("gap-classifier", dict(k=1, moe_layers=(2, 3), capacity_factor=4.0, group_size=BATCH * (TOKENS - 1),
                                classifier="gap"), needs=("use_cls_token",)),
    Case("bfloat16-dispatcher",
         dict(k=2, moe_layers=(2, 3), capacity_factor=1.0, batch_priority=True, group_size=ONE_GROUP, bfloat16=True),
         needs=("expert_dispatch_dtype",), drops=True),
]


def _eval_overrides(case: Case) -> dict | None:
    if not case.eval_overrides:
        return None
    return {"encoder": {"moe": {"router": {"dispatcher": dict(case.eval_overrides)}}}}


_REFERENCES: dict[str, tuple] = {}
_CONVERTED: dict[tuple[str, str], str] = {}


def _reference(case: Case):
    """(vmoe model config, random parameters, images) of a case, built once."""
    if case.name not in _REFERENCES:
        config = ref.model_config(**case.config)
        params = ref.init_params(config, image_size=IMAGE, batch=BATCH)
        _REFERENCES[case.name] = (config, params, ref.images(BATCH, IMAGE))
    return _REFERENCES[case.name]


def _converted(case: Case, tmp_root: str) -> str:
    """vmoe's sharded checkpoint of the case, converted once; returns the hf model folder."""
    if (case.name, tmp_root) not in _CONVERTED:
        _CONVERTED[case.name, tmp_root] = _convert(case, tmp_root)
    return _CONVERTED[case.name, tmp_root]


def _convert(case: Case, tmp_root: str) -> str:
    from hf_vmoe.integrations.convert_vmoe import convert_vmoe_checkpoint

    config, params, _ = _reference(case)
    prefix = ref.save_sharded(params, f"{tmp_root}/{case.name}/ckpt", num_shards=2)
    spec = {"model": config, "image_size": IMAGE, "eval_overrides": _eval_overrides(case) or {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inexact conversions warn; the comparison below is the verdict
        convert_vmoe_checkpoint(prefix, spec, f"{tmp_root}/{case.name}/hf")
    return f"{tmp_root}/{case.name}/hf"


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("vmoe_parity"))


def record_routing(model) -> dict[int, object]:
    """Forward hooks that keep, per encoder block, the first routing plan (an object with `top_k_index` and `keep`)
    its modules return during a forward."""
    caught: dict[int, object] = {}
    for name, module in model.named_modules():
        match = re.search(r"\blayer\.(\d+)\.", name + ".")
        if not match:
            continue

        def hook(module, args, output, block=int(match.group(1))):
            for item in output if isinstance(output, tuple) else (output,):
                if hasattr(item, "top_k_index") and block not in caught:
                    caught[block] = item

        module.register_forward_hook(hook)
    return caught


def _ours(folder: str, x: np.ndarray, train: bool, labels: bool = False):
    from hf_vmoe import VMoEForImageClassification

    model = VMoEForImageClassification.from_pretrained(folder)
    model.train(train)
    routing = record_routing(model)
    pixels = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    kwargs = {"labels": torch.zeros(len(x), dtype=torch.long)} if labels else {}
    with torch.set_grad_enabled(train):
        out = model(pixels, output_router_logits=True, **kwargs)
    return model, out, routing


def _compare(case: Case, folder: str, train: bool):
    config, params, x = _reference(case)
    theirs = ref.run(config, params, x, train=train, overrides=None if train else _eval_overrides(case))
    model, out, routing = _ours(folder, x, train)
    scale = float(np.abs(theirs.logits).max())
    diff = float(np.abs(out.logits.detach().numpy() - theirs.logits).max())
    assert diff <= RTOL * scale, f"{case.name}: max |logit diff| {diff:.3g} > {RTOL} x logit scale {scale:.3g}"
    moe_blocks = [int(n.rpartition("_")[2]) for n in theirs.experts]
    assert sorted(routing) == sorted(moe_blocks), f"routing plans recorded for blocks {sorted(routing)}"
    dropped_total = 0
    for block in moe_blocks:
        name = f"encoderblock_{block}"
        plan = routing[block]
        ours_experts = plan.top_k_index.numpy()
        assert ours_experts.shape == theirs.experts[name].shape
        mismatch = np.flatnonzero((ours_experts != theirs.experts[name]).any(axis=1))
        assert mismatch.size == 0, f"block {block}: {mismatch.size} tokens chose other experts, first {mismatch[:5]}"
        ours_kept = np.ones_like(theirs.kept[name]) if plan.keep is None else plan.keep.numpy()
        wrong = np.flatnonzero((ours_kept != theirs.kept[name]).any(axis=1))
        assert wrong.size == 0, (f"block {block}: capacity keeps other choices for {wrong.size} tokens (first "
                                 f"{wrong[:5]}); vmoe dropped {(~theirs.kept[name]).sum()}, hf {(~ours_kept).sum()}")
        dropped_total += int((~theirs.kept[name]).sum())
    if case.drops and not train:
        assert dropped_total > 0, f"{case.name}: the reference dropped nothing; the case does not test capacity"
    return theirs, model, out


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.name) for c in CASES]
)
def test_inference_matches_reference(case, tmp_root):
    _compare(case, _converted(case, tmp_root), train=False)


TRAIN_CASES = [
    Case("train-k2-every2-capacity", dict(k=2, moe_layers=(1, 3), capacity_factor=1.0, group_size=ONE_GROUP),
         needs=("router_aux_loss_layer_reduction",), drops=True),
    Case("train-k1-last2-capacity-bpr",
         dict(k=1, moe_layers=(2, 3), capacity_factor=1.0, batch_priority=True, group_size=ONE_GROUP),
         needs=("router_aux_loss_layer_reduction",), drops=True),
    Case("train-k2-every2-groups", dict(k=2, moe_layers=(1, 3), capacity_factor=1.0, group_size=TWO_IMAGES),
         needs=("router_group_size", "router_aux_loss_layer_reduction"), drops=True),
]


def _layer_reduce(model, values: list[float]) -> float:
    """How hf_vmoe combines per-layer losses: the mean, or the sum where the config says so."""
    if getattr(model.config, "router_aux_loss_layer_reduction", "mean") == "sum":
        return float(np.sum(values))
    return float(np.mean(values))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in TRAIN_CASES])
def test_training_forward_and_importance_loss_match_reference(case, tmp_root):
    """Training mode without noise: logits, choices and drops under the training capacity; hf's aux_loss (the
    converter keeps only the importance loss, weight 0.005) equals vmoe's importance_loss per block (mean over
    groups), combined over blocks the way hf_vmoe combines them."""
    theirs, model, out = _compare(case, _converted(case, tmp_root), train=True)
    weight = model.config.router_importance_loss_coef
    assert weight == case.config.get("importance_loss_weight", 0.005)
    per_block = [weight * float(m["importance_loss"].mean()) for m in theirs.metrics.values()]
    expected = _layer_reduce(model, per_block)
    assert out.aux_loss is not None
    assert abs(float(out.aux_loss) - expected) <= 1e-5 * max(1.0, abs(expected)), (float(out.aux_loss), expected)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in TRAIN_CASES])
def test_training_aux_loss_equals_vmoe_auxiliary_loss(case, tmp_root):
    """vmoe's total: metrics['auxiliary_loss'] summed over MoE blocks, averaged over groups (what its trainer adds
    to the loss). Without noise it is importance_loss_weight x importance_loss (no load loss)."""
    config, params, x = _reference(case)
    theirs = ref.run(config, params, x, train=True)
    _, out, _ = _ours(_converted(case, tmp_root), x, train=True)
    expected = float(theirs.auxiliary_loss.mean())
    assert abs(float(out.aux_loss) - expected) <= 1e-5 * max(1.0, abs(expected)), (float(out.aux_loss), expected)


def test_switch_loss_equals_vmoe_gshard_loss_for_k1(tmp_root):
    """vmoe also reports `gshard_loss` (E^2 * mean_e(f_e * P_e), f_e the share of top-1 choices): for k=1 and one
    group it is hf_vmoe's switch loss (`router_aux_loss_coef`)."""
    from hf_vmoe import VMoEForImageClassification

    case = TRAIN_CASES[1]
    config, params, x = _reference(case)
    theirs = ref.run(config, params, x, train=True)
    model = VMoEForImageClassification.from_pretrained(_converted(case, tmp_root), router_aux_loss_coef=1.0,
                                                       router_importance_loss_coef=0.0).train()
    out = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    expected = _layer_reduce(model, [float(m["gshard_loss"].mean()) for m in theirs.metrics.values()])
    assert abs(float(out.aux_loss) - expected) <= 1e-5 * max(1.0, abs(expected)), (float(out.aux_loss), expected)


# -- batches that are not whole routing groups -----------------------------------------------------------------------

# (case, images hf_vmoe gets): vmoe runs the BATCH images with the ones after the first `images` set to zero (its
# evaluator's fake examples), hf_vmoe runs the first `images` and pads them itself (router_group_remainder="pad").
PADDED_CASES = [
    (Case("padded-one-image-k2-capacity", dict(k=2, moe_layers=(1, 3), capacity_factor=1.0, group_size=ONE_GROUP),
          needs=("router_group_size", "router_group_remainder"), drops=True), 1),
    (Case("padded-3-images-k2-capacity-bpr",
          dict(k=2, moe_layers=(1, 3), capacity_factor=1.0, batch_priority=True, group_size=ONE_GROUP),
          needs=("router_group_size", "router_group_remainder"), drops=True), 3),
    (Case("padded-6-images-groups-of-4", dict(k=1, moe_layers=(2, 3), capacity_factor=1.0, group_size=TWO_IMAGES),
          needs=("router_group_size", "router_group_remainder"), drops=True), 6),
]


def compare_padded(case: Case, images: int, tmp_root: str) -> dict:
    """vmoe on the zero-padded batch, hf_vmoe on the real images: the logits of the real images and the routing of
    every token (hf_vmoe's plans cover its padded batch)."""
    config, params, x = _reference(case)
    padded = x.copy()
    padded[images:] = 0.0
    theirs = ref.run(config, params, padded)
    model, out, routing = _ours(_converted(case, tmp_root), x[:images], train=False)
    assert model.config.router_group_remainder == "pad"
    scale = float(np.abs(theirs.logits[:images]).max())
    result = {"max_rel_logit_diff": float(np.abs(out.logits.detach().numpy() - theirs.logits[:images]).max()) / scale,
              "experts_differ": 0, "dropped_differ": 0, "reference_dropped": 0, "choices": 0}
    for name in theirs.experts:
        plan = routing[int(name.rpartition("_")[2])]
        result["experts_differ"] += int((plan.top_k_index.numpy() != theirs.experts[name]).any(axis=1).sum())
        kept = np.ones_like(theirs.kept[name]) if plan.keep is None else plan.keep.numpy()
        result["dropped_differ"] += int((kept != theirs.kept[name]).any(axis=1).sum())
        result["reference_dropped"] += int((~theirs.kept[name]).sum())
        result["choices"] += int(theirs.kept[name].size)
    result["tokens"] = int(theirs.experts[name].shape[0])
    return result


@pytest.mark.parametrize("case, images", [pytest.param(c, n, id=c.name) for c, n in PADDED_CASES])
def test_batch_padded_to_whole_groups_matches_vmoe_evaluator(case, images, tmp_root):
    result = compare_padded(case, images, tmp_root)
    assert result["max_rel_logit_diff"] <= RTOL, result
    assert result["experts_differ"] == 0 and result["dropped_differ"] == 0, result
    assert result["reference_dropped"] > 0, f"{case.name}: nothing dropped; the case does not test capacity"


def test_padding_is_for_inference_only(tmp_root):
    """vmoe's training batches are whole groups (the input pipeline drops the remainder): so are hf_vmoe's."""
    case, _ = PADDED_CASES[0]
    _, _, x = _reference(case)
    from hf_vmoe import VMoEForImageClassification

    model = VMoEForImageClassification.from_pretrained(_converted(case, tmp_root)).train()
    with pytest.raises(ValueError, match="must divide the number of routed tokens.*'pad' pads at inference only"):
        model(torch.from_numpy(np.ascontiguousarray(x[:3].transpose(0, 3, 1, 2))))


# -- the load loss (training with router noise) ----------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_load_loss_formula_equals_vmoe(k):
    """hf_vmoe's `vmoe_load_loss` against vmoe's `_load_auxiliary_loss` (vmapped over groups as vmoe does)."""
    from hf_vmoe.modeling_vmoe import vmoe_load_loss

    m = ref.modules()
    rng = np.random.default_rng(k)
    logits = rng.normal(size=(3, 40, 4)).astype(np.float32)
    sigma = 0.25
    noisy = (logits + sigma * rng.normal(size=logits.shape)).astype(np.float32)
    theirs = m.jax.vmap(functools.partial(m.routing.NoisyTopExpertsPerItemRouter._load_auxiliary_loss,
                                          num_selected_experts=k, noise_std=sigma))(m.jnp.asarray(logits),
                                                                                   m.jnp.asarray(noisy))
    ours = vmoe_load_loss(torch.from_numpy(logits), torch.from_numpy(noisy), k, sigma)
    np.testing.assert_allclose(ours.numpy(), np.asarray(theirs), rtol=1e-5, atol=1e-7)


NOISY_CASES = [
    Case("train-noisy-k2-every2-groups",
         dict(k=2, moe_layers=(1, 3), capacity_factor=1.0, group_size=TWO_IMAGES, noise_std=1.0),
         needs=("router_load_loss_coef", "router_aux_loss_layer_reduction", "router_group_size")),
    Case("train-noisy-k1-last2", dict(k=1, moe_layers=(2, 3), capacity_factor=1.0, group_size=ONE_GROUP,
                                      noise_std=1.0, load_loss_weight=0.01),
         needs=("router_load_loss_coef", "router_aux_loss_layer_reduction")),
]


def noisy_aux_loss(case: Case, tmp_root: str) -> tuple[float, float]:
    """(hf_vmoe's aux_loss in training with noise, vmoe's auxiliary_loss formula on hf_vmoe's clean and noisy
    logits: the sum over MoE blocks of the mean over groups of w_importance * importance + w_load * load)."""
    config, params, x = _reference(case)
    model, out, routing = _ours(_converted(case, tmp_root), x, train=True)
    m = ref.modules()
    router = m.routing.NoisyTopExpertsPerItemRouter
    moe = config["encoder"]["moe"]
    k, group = moe["router"]["num_selected_experts"], moe["group_size"]
    sigma = moe["router"]["noise_std"] / moe["num_experts"]
    assert model.config.router_noise_std == sigma and model.config.router_aux_loss_layer_reduction == "sum"
    expected = 0.0
    for block in sorted(routing):
        plan = routing[block]
        assert plan.noisy_logits is not None
        clean = m.jnp.asarray(plan.logits.detach().numpy().reshape(-1, group, moe["num_experts"]))
        noisy = m.jnp.asarray(plan.noisy_logits.detach().numpy().reshape(clean.shape))
        importance = m.jax.vmap(router._importance_auxiliary_loss)(m.jax.nn.softmax(clean))
        load = m.jax.vmap(functools.partial(router._load_auxiliary_loss, num_selected_experts=k,
                                            noise_std=sigma))(clean, noisy)
        expected += float(np.mean(moe["router"]["importance_loss_weight"] * np.asarray(importance)
                                  + moe["router"]["load_loss_weight"] * np.asarray(load)))
    return float(out.aux_loss.detach()), expected


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in NOISY_CASES])
def test_noisy_training_aux_loss_is_vmoe_formula(case, tmp_root):
    ours, expected = noisy_aux_loss(case, tmp_root)
    assert abs(ours - expected) <= 1e-5 * max(1.0, abs(expected)), (ours, expected)


# -- expert choice and Soft MoE --------------------------------------------------------------------------------------

# vmoe's `NoisyTopItemsPerExpertRouter` (expert choice: each expert takes the top-C tokens of its group) and Soft MoE's
# `SoftRouter` (vmoe/projects/soft_moe/router.py: L2-normalised tokens and slot parameters times a learned scale,
# bfloat16 dispatch). The routing compared is the dispatcher's: which tokens each expert took (expert choice), the
# dispatch and combine weights (Soft MoE).
ROUTER_CASES = [
    Case("expert-choice-groups",  # C = ceil(40 x 1.0 / 4) = 10 -> 12 (vmoe's multiple of 4)
         dict(router=ref.EXPERT_CHOICE, moe_layers=(1, 3), capacity_factor=1.0, group_size=TWO_IMAGES),
         needs=("router_group_size", "capacity_multiple_of")),
    Case("expert-choice-one-group-round",  # C = round(80 x 0.7 / 4) = 14, no multiple: the factor is (C - 1/2) E / n
         dict(router=ref.EXPERT_CHOICE, moe_layers=(2, 3), capacity_factor=0.7, group_size=ONE_GROUP,
              capacity_ceil_or_round="round", capacity_multiple_of=1),
         needs=("router_group_size",)),
    Case("expert-choice-per-image-bfloat16",
         dict(router=ref.EXPERT_CHOICE, moe_layers=(2, 3), capacity_factor=2.0, group_size=TOKENS, bfloat16=True),
         needs=("router_group_size", "expert_dispatch_dtype")),
    Case("soft-gap-slots-from-capacity",  # GAP (vmoe's Soft MoE configs): 9 tokens, round(9 x 1.0 / 4) = 2 slots
         dict(router=ref.SOFT, moe_layers=(2, 3), capacity_factor=1.0, group_size=TOKENS - 1, classifier="gap"),
         needs=("use_cls_token", "expert_dispatch_dtype")),
    Case("soft-gap-3-slots-every2",
         dict(router=ref.SOFT, moe_layers=(1, 3), num_slots=3, capacity_factor=None, group_size=TOKENS - 1,
              classifier="gap"), needs=("use_cls_token", "expert_dispatch_dtype")),
    Case("soft-class-token-1-slot", dict(router=ref.SOFT, moe_layers=(2, 3), num_slots=1, group_size=TOKENS),
         needs=("expert_dispatch_dtype",)),
]


def _soft_plan_weights(plan) -> tuple[np.ndarray, np.ndarray]:
    """hf_vmoe's Soft MoE plan as vmoe's dispatcher holds it: (combine, dispatch) weights (B, S, E, P)."""
    batch, seq, total = plan.combine_weights.shape
    shape = (batch, seq, total // plan.num_slots, plan.num_slots)
    return (plan.combine_weights.detach().numpy().reshape(shape), plan.dispatch_weights.detach().numpy().reshape(shape))


def _expert_choice_picks(plan, num_experts: int, groups: int, group_size: int) -> np.ndarray:
    """hf_vmoe's expert-choice plan as (G, E, C): the tokens (index within their group) each expert took, sorted."""
    tokens = plan.token_index.numpy().reshape(num_experts, groups, -1)  # expert-major rows, then group by group
    local = tokens - group_size * np.arange(groups).reshape(1, groups, 1)
    return np.sort(local.transpose(1, 0, 2), axis=-1)


def compare_router(case: Case, tmp_root: str, train: bool = False) -> dict:
    """vmoe and hf_vmoe on the case's images: the max |logit difference| relative to the logit scale, and the
    routing: for expert choice the tokens each expert took in each group (counted where they differ); for Soft MoE
    the largest difference of the dispatch and combine weights."""
    config, params, x = _reference(case)
    theirs = ref.run(config, params, x, train=train)
    model, out, _ = _ours(_converted(case, tmp_root), x, train)
    plans = {f"encoderblock_{index}": layer.mlp.router for index, layer in enumerate(model.vmoe.encoder.layer)
             if layer.is_moe}
    captured = {}

    def keep(name):
        def hook(module, args, output):
            captured[name] = output[1]
        return hook

    handles = [router.register_forward_hook(keep(name)) for name, router in plans.items()]
    pixels = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.set_grad_enabled(train):
        again = model(pixels).logits
    for handle in handles:
        handle.remove()
    assert torch.equal(again, out.logits)
    scale = float(np.abs(theirs.logits).max())
    result = {"max_rel_logit_diff": float(np.abs(out.logits.detach().numpy() - theirs.logits).max()) / scale,
              "aux_loss": None if out.aux_loss is None else float(out.aux_loss),
              "vmoe_auxiliary_loss": float(theirs.auxiliary_loss.mean()), "picks_differ": 0, "picks": 0,
              "max_weight_diff": 0.0}
    assert sorted(theirs.weights) == sorted(captured)
    for name, (combine, dispatch) in theirs.weights.items():
        plan = captured[name]
        if model.config.router_type == "soft":
            ours_combine, ours_dispatch = _soft_plan_weights(plan)
            result["max_weight_diff"] = max(result["max_weight_diff"], float(np.abs(ours_combine - combine).max()),
                                            float(np.abs(ours_dispatch - dispatch).max()))
        else:
            groups, group_size, num_experts, capacity = dispatch.shape
            theirs_picks = np.sort(dispatch.argmax(axis=1), axis=-1)  # (G, E, C): the token in each buffer slot
            ours_picks = _expert_choice_picks(plan, num_experts, groups, group_size)
            assert ours_picks.shape == theirs_picks.shape, (ours_picks.shape, theirs_picks.shape)
            result["picks_differ"] += int((ours_picks != theirs_picks).any(axis=-1).sum())
            result["picks"] += groups * num_experts
    return result


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in ROUTER_CASES])
def test_expert_choice_and_soft_moe_inference_match_reference(case, tmp_root):
    result = compare_router(case, tmp_root)
    assert result["max_rel_logit_diff"] <= RTOL, result
    assert result["picks_differ"] == 0, result
    assert result["max_weight_diff"] <= 1e-5, result


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in (ROUTER_CASES[0], ROUTER_CASES[3])])
def test_expert_choice_and_soft_moe_training_forward_match_reference(case, tmp_root):
    """Training mode without noise: the same routing and logits, and no auxiliary loss (vmoe's is 0 for both)."""
    result = compare_router(case, tmp_root, train=True)
    assert result["max_rel_logit_diff"] <= RTOL, result
    assert result["picks_differ"] == 0 and result["max_weight_diff"] <= 1e-5, result
    assert result["vmoe_auxiliary_loss"] == 0.0 and result["aux_loss"] == 0.0, result


def test_soft_moe_parity_needs_the_normalised_router(tmp_root):
    """The check can fail: the converted Soft MoE with its router's logits computed as a plain linear layer (the
    router hf_vmoe had before: no L2 normalisation, no scale) is far from vmoe's."""
    from hf_vmoe.modeling_vmoe import VMoESoftRouter

    case = ROUTER_CASES[3]
    config, params, x = _reference(case)
    theirs = ref.run(config, params, x)
    original = VMoESoftRouter.slot_logits
    try:
        VMoESoftRouter.slot_logits = lambda self, h: torch.nn.functional.linear(h.float(), self.weight)
        _, out, _ = _ours(_converted(case, tmp_root), x, train=False)
    finally:
        VMoESoftRouter.slot_logits = original
    diff = float(np.abs(out.logits.detach().numpy() - theirs.logits).max()) / float(np.abs(theirs.logits).max())
    assert diff > 100 * RTOL, diff
