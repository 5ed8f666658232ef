"""The routing contract: declared outputs, the experts interface really used, float32 routers, loading info, and
the two routers built on the contract (expert choice, Soft MoE)."""

import copy
import json

import pytest
import torch
from conftest import expert_mlp, tiny_config
from transformers import Trainer, TrainingArguments
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from hf_vmoe import VMoEBackbone, VMoEForImageClassification, VMoEForSemanticSegmentation, VMoEModel
from hf_vmoe.recipes.analysis import collect_routing
from hf_vmoe.modeling_vmoe import (
    ExpertChoiceRouting,
    SoftRouting,
    VMoECheckpointMismatchError,
    VMoEExperts,
    VMoERouter,
    VMoESparseMoeBlock,
)
from hf_vmoe.integrations.upernet import VMoEUperNetForSemanticSegmentation, vmoe_upernet_config

SEQ = 17
EXPERT_CHOICE = dict(routing_level="token", router_type="expert_choice")
SOFT = dict(routing_level="token", router_type="soft", num_slots=2)
NEW_ROUTERS = {"expert_choice": EXPERT_CHOICE, "soft": SOFT}
ALL_ROUTINGS = {"image": dict(), "image_per_block": dict(shared_router=False, num_experts_per_tok=2),
                "token": dict(routing_level="token", num_experts_per_tok=2), **NEW_ROUTERS}


def pixels(batch=3):
    return torch.randn(batch, 3, 32, 32)


# --------------------------------------------------------------------------------------------------------------
# Declared outputs
# --------------------------------------------------------------------------------------------------------------

MODEL_CLASSES = [VMoEModel, VMoEForImageClassification, VMoEForSemanticSegmentation, VMoEBackbone]


@pytest.mark.parametrize("cls", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_recordable_outputs_are_declared(cls):
    declared = cls._can_record_outputs
    assert {"hidden_states", "attentions", "router_logits"} <= set(declared)
    assert declared["router_logits"].target_class is VMoERouter


@pytest.mark.parametrize("name", list(ALL_ROUTINGS))
@pytest.mark.parametrize("cls", MODEL_CLASSES + ["upernet"], ids=lambda c: getattr(c, "__name__", c))
def test_every_model_class_returns_router_logits_when_asked(cls, name):
    config = tiny_config(**ALL_ROUTINGS[name], moe_layers=(1, 3))
    if cls == "upernet":
        model = VMoEUperNetForSemanticSegmentation(vmoe_upernet_config(config, hidden_size=16, num_labels=3))
    else:
        model = cls(config)
    model.eval()
    x = pixels(2)
    with torch.no_grad():
        plain = model(x)
        asked = model(x, output_router_logits=True)
    assert plain.router_logits is None and plain.expert_counts is None and plain.aux_loss is None
    calls = 1 if name == "image" else 2  # the shared image router decides once for both MoE blocks
    assert len(asked.router_logits) == calls and asked.expert_counts.shape == (calls, 4)
    assert all(r.dtype == torch.float32 for r in asked.router_logits)
    assert asked.aux_loss is not None


def test_hidden_states_and_attentions_are_recorded_per_layer():
    model = VMoEForImageClassification(tiny_config()).eval()
    model.set_attn_implementation("eager")  # sdpa returns no attention maps
    out = model(pixels(2), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 5 and len(out.attentions) == 4
    assert out.attentions[0].shape == (2, 2, SEQ, SEQ)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 2, SEQ))


# --------------------------------------------------------------------------------------------------------------
# The experts interface: the backend asked for is the one that runs
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["image", "image_per_block", "token", "expert_choice", "soft"])
def test_chosen_experts_backend_is_the_one_called(name, monkeypatch):
    model = VMoEForImageClassification(tiny_config(**ALL_ROUTINGS[name])).eval()
    x = pixels(3)
    calls = {"eager": 0, "batched_mm": 0, "grouped_mm": 0}
    for backend in ("batched_mm", "grouped_mm"):
        original = ALL_EXPERTS_FUNCTIONS[backend]

        def spy(*args, _backend=backend, _original=original, **kwargs):
            calls[_backend] += 1
            return _original(*args, **kwargs)

        monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS, backend, spy)
    eager = VMoEExperts.forward.__wrapped__  # the class's own forward, behind transformers' dispatch

    def eager_spy(*args, **kwargs):
        calls["eager"] += 1
        return eager(*args, **kwargs)

    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS, "eager", eager_spy)
    per_expert = VMoEExperts.forward_per_expert  # the eager path of expert choice and Soft MoE (equal work)

    def per_expert_spy(*args, **kwargs):
        calls["eager"] += 1
        return per_expert(*args, **kwargs)

    monkeypatch.setattr(VMoEExperts, "forward_per_expert", per_expert_spy)
    results = {}
    for backend in ("eager", "batched_mm", "grouped_mm"):
        model.set_experts_implementation(backend)
        before = dict(calls)
        with torch.no_grad():
            results[backend] = model(x).logits
        ran = {k for k in calls if calls[k] > before[k]}
        assert ran == {backend}, (backend, ran)
    for backend in ("batched_mm", "grouped_mm"):
        torch.testing.assert_close(results[backend], results["eager"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["image", "token"])
def test_backends_agree_in_bfloat16(name):
    model = VMoEForImageClassification(tiny_config(**ALL_ROUTINGS[name])).eval().to(torch.bfloat16)
    x = pixels(3).to(torch.bfloat16)
    outs = {}
    for backend in ("eager", "batched_mm", "grouped_mm"):
        model.set_experts_implementation(backend)
        with torch.no_grad():
            outs[backend] = model(x).logits.float()
    for backend in ("batched_mm", "grouped_mm"):
        torch.testing.assert_close(outs[backend], outs["eager"], rtol=0.05, atol=0.05)


# --------------------------------------------------------------------------------------------------------------
# Conventions: float32 routers, loading info, error type, reentrant checkpointing
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL_ROUTINGS))
def test_routers_are_float32_when_loaded_in_bfloat16(name, tmp_path):
    model = VMoEForImageClassification(tiny_config(**ALL_ROUTINGS[name]))
    routers = [m for m in model.modules() if isinstance(m, VMoERouter)]
    assert routers and all(r.weight.dtype == torch.float32 for r in routers)
    model.save_pretrained(tmp_path)
    half = VMoEForImageClassification.from_pretrained(tmp_path, dtype=torch.bfloat16)
    routers = [m for m in half.modules() if isinstance(m, VMoERouter)]
    assert all(p.dtype == torch.float32 for r in routers for p in r.parameters())  # Soft MoE's scale too
    assert half.vmoe.encoder.layer[-1].mlp.experts.up_proj.dtype == torch.bfloat16
    out = half(pixels(2).to(torch.bfloat16), labels=torch.tensor([0, 1]), output_router_logits=True)
    assert torch.isfinite(out.loss) and all(r.dtype == torch.float32 for r in out.router_logits)


def test_router_created_in_float32_under_a_bfloat16_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = VMoEForImageClassification(tiny_config(routing_level="token"))
    finally:
        torch.set_default_dtype(previous)
    assert model.vmoe.encoder.layer[-1].mlp.router.weight.dtype == torch.float32
    assert model.vmoe.encoder.layer[-1].mlp.experts.up_proj.dtype == torch.bfloat16


def test_loading_info_is_returned_instead_of_raised(tmp_path):
    VMoEForImageClassification(tiny_config(num_experts=2)).save_pretrained(tmp_path / "two")
    config = tiny_config(num_experts=4)
    with pytest.raises(RuntimeError, match="checkpoint shape") as err:  # transformers' error type for mismatches
        VMoEForImageClassification.from_pretrained(tmp_path / "two", config=config)
    assert isinstance(err.value, VMoECheckpointMismatchError) and isinstance(err.value, ValueError)
    model, info = VMoEForImageClassification.from_pretrained(tmp_path / "two", config=config, output_loading_info=True)
    mismatched = {key for key, *_ in info["mismatched_keys"]}
    assert any(key.endswith("mlp.experts.up_proj") for key in mismatched)
    assert any("router.weight" in key for key in mismatched)
    # missing weights: a dense checkpoint into a MoE model
    VMoEForImageClassification(tiny_config(moe_layers="none")).save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        VMoEForImageClassification.from_pretrained(tmp_path / "dense", config=tiny_config())
    model, info = VMoEForImageClassification.from_pretrained(tmp_path / "dense", config=tiny_config(),
                                                             output_loading_info=True)
    assert any(key.endswith("mlp.experts.up_proj") for key in info["missing_keys"])


@pytest.mark.parametrize("name", ["image", "token", "expert_choice"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_keeps_the_routing_gradients(name, reentrant):
    model = VMoEForImageClassification(tiny_config(**ALL_ROUTINGS[name], pooling="mean")).train()
    x, labels = pixels(3), torch.tensor([0, 1, 4])
    torch.manual_seed(0)
    model(x, labels=labels).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    torch.manual_seed(0)
    model(x, labels=labels).loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(reference) and any("router" in n for n in got)
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], rtol=1e-5, atol=1e-7, msg=key)


def test_trainer_total_flos_counts_active_flops():
    from hf_vmoe.recipes.flops import count_flops

    for overrides in (dict(), dict(routing_level="token", num_experts_per_tok=2)):
        config = tiny_config(**overrides)
        model = VMoEForImageClassification(config)
        x = pixels(4)
        assert model.floating_point_ops({"pixel_values": x}) == 3 * 4 * count_flops(config).flops


# --------------------------------------------------------------------------------------------------------------
# Expert choice and Soft MoE
# --------------------------------------------------------------------------------------------------------------


def test_expert_choice_is_balanced_by_construction_and_has_no_balancing_loss():
    config = tiny_config(**EXPERT_CHOICE, capacity_factor=1.5, router_aux_loss_coef=1.0,
                         router_importance_loss_coef=1.0, router_z_loss_coef=0.0)
    block = VMoESparseMoeBlock(config)
    torch.nn.init.normal_(block.router.weight, std=1.0)
    x = torch.randn(4, SEQ, 32)
    _, plan = block.router(x)
    assert isinstance(plan, ExpertChoiceRouting)
    capacity = -(-4 * SEQ * 3 // (2 * 4))  # ceil(tokens * 1.5 / E)
    assert plan.expert_counts(4).tolist() == [capacity] * 4
    # each expert took its own top-C tokens by gate
    gates = plan.logits.softmax(-1)
    for e in range(4):
        chosen = plan.token_index[plan.expert_index[:, 0] == e]
        assert set(chosen.tolist()) == set(gates[:, e].topk(capacity).indices.tolist())
    model = VMoEForImageClassification(config).train()
    out = model(pixels(2), labels=torch.tensor([0, 1]))
    assert out.aux_loss == 0  # z-loss off, and no balancing loss for a router balanced by construction


def _peaked_routers(model):
    for router in (m for m in model.modules() if isinstance(m, VMoERouter)):
        torch.nn.init.normal_(router.weight, std=1.0)
    return model


@pytest.mark.parametrize("group_size", [None, SEQ], ids=["default", "per-image-groups"])
def test_expert_choice_inference_is_batch_invariant(group_size):
    """transformers' batching equivalence: an image's outputs alone, in a batch, and beside other images are the
    same. Without a group size expert choice routes each image alone at inference; each expert takes
    ceil(17 x 1.0 / 4) = 5 tokens of every image."""
    model = _peaked_routers(VMoEForImageClassification(tiny_config(**EXPERT_CHOICE, router_group_size=group_size)))
    model.eval()
    x = pixels(5)
    with torch.no_grad():
        out = model(x, output_router_logits=True)
        single = torch.cat([model(x[i : i + 1]).logits for i in range(5)])
        mixed = model(torch.cat([x[:2], pixels(3)])).logits
    torch.testing.assert_close(out.logits, single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[:2], out.logits[:2], rtol=1e-5, atol=1e-5)
    assert out.expert_counts.tolist() == [[5 * 5] * 4] * 2


def test_expert_choice_with_an_explicit_group_size_routes_groups_of_images():
    """An explicit `router_group_size` (what the vmoe converter sets) groups tokens across images at inference
    too: each expert takes its top-C tokens of each group of two images, so an image's routing depends on its
    neighbour; in training without a group size the group is the whole batch."""
    config = tiny_config(**EXPERT_CHOICE, router_group_size=2 * SEQ)
    block = VMoESparseMoeBlock(config).eval()
    torch.nn.init.normal_(block.router.weight, std=1.0)
    x = torch.randn(4, SEQ, 32)
    _, plan = block.router(x)
    gates = plan.logits.softmax(-1).view(2, 2 * SEQ, 4)
    capacity = -(-2 * SEQ // 4)  # ceil(34 x 1.0 / 4) per group
    for e in range(4):
        rows = plan.token_index[plan.expert_index[:, 0] == e]
        for g in range(2):
            chosen = {t - g * 2 * SEQ for t in rows.tolist() if g * 2 * SEQ <= t < (g + 1) * 2 * SEQ}
            assert chosen == set(gates[g, :, e].topk(capacity).indices.tolist())
    model = _peaked_routers(VMoEForImageClassification(config)).eval()
    images = pixels(4)
    with torch.no_grad():
        grouped = model(images).logits
        by_image = _peaked_routers(VMoEForImageClassification(tiny_config(**EXPERT_CHOICE))).eval()
        by_image.load_state_dict(model.state_dict())
        assert not torch.allclose(by_image(images).logits, grouped, atol=1e-4)
    block.train()
    block.router.config = tiny_config(**EXPERT_CHOICE)
    _, whole = block.router(x)
    assert whole.expert_counts(4).tolist() == [SEQ] * 4  # ceil(68 x 1.0 / 4): one group of the 4 images


def test_router_group_size_must_divide_the_tokens():
    model = VMoEForImageClassification(tiny_config(**EXPERT_CHOICE, router_group_size=10)).eval()
    with pytest.raises(ValueError, match="router_group_size=10 must divide the number of routed tokens"):
        model(pixels(3))


def test_soft_moe_weights_are_convex_and_every_token_is_used():
    config = tiny_config(**SOFT)
    block = VMoESparseMoeBlock(config)
    for parameter in block.experts.parameters():  # a bare block is not initialised (torch.empty): give it weights
        torch.nn.init.normal_(parameter, std=0.02)
    torch.nn.init.normal_(block.router.weight, std=1.0)
    x = torch.randn(3, SEQ, 32, requires_grad=True)
    logits, plan = block.router(x)
    assert isinstance(plan, SoftRouting) and logits.shape == (3 * SEQ, 4 * 2)
    torch.testing.assert_close(plan.dispatch_weights.sum(1), torch.ones(3, 8))  # each slot: a mix of tokens
    torch.testing.assert_close(plan.combine_weights.sum(2), torch.ones(3, SEQ))  # each token: a mix of slots
    out = block(x)
    # dense reference: slots = D^T X, each expert on its slots, output = C Y
    slots = torch.einsum("bsn,bsh->bnh", plan.dispatch_weights, x)
    experts = block.experts
    ys = []
    for n in range(8):
        e = n // 2
        ys.append(expert_mlp(experts, e, slots[:, n]))
    y = torch.stack(ys, dim=1)
    torch.testing.assert_close(out, torch.einsum("bsn,bnh->bsh", plan.combine_weights, y), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert (x.grad.abs().sum(-1) > 0).all()  # fully differentiable: every token reaches the loss
    assert block.router.weight.grad.abs().sum() > 0


def test_soft_moe_is_batch_invariant_and_compiles():
    model = VMoEForImageClassification(tiny_config(**SOFT, num_shared_experts=1)).eval()
    x = pixels(4)
    with torch.no_grad():
        batch = model(x).logits
        single = torch.cat([model(x[i : i + 1]).logits for i in range(4)])
        torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x).logits, batch, rtol=1e-5, atol=1e-5)


def test_soft_moe_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    import numpy as np
    import onnxruntime

    model = VMoEForImageClassification(tiny_config(**SOFT)).eval()
    x = pixels(2)

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values).logits

    path = tmp_path / "soft.onnx"
    torch.onnx.export(Logits(), (x,), str(path), dynamo=True, input_names=["pixel_values"], output_names=["logits"])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).logits.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(NEW_ROUTERS))
@pytest.mark.parametrize("head", ["classification", "segmentation", "backbone", "upernet"])
def test_new_routers_forward_backward_with_shared_experts(name, head):
    config = tiny_config(**NEW_ROUTERS[name], num_shared_experts=1, pooling="mean")
    x = pixels(2)
    if head == "classification":
        model = VMoEForImageClassification(config).train()
        loss = model(x, labels=torch.tensor([0, 3])).loss
    elif head == "segmentation":
        model = VMoEForSemanticSegmentation(config).train()
        loss = model(x, labels=torch.randint(0, 5, (2, 32, 32))).loss
    elif head == "backbone":
        model = VMoEBackbone(tiny_config(**NEW_ROUTERS[name], num_shared_experts=1, out_indices=[2, 4])).train()
        out = model(x)
        loss = sum(f.pow(2).mean() for f in out.feature_maps) + out.aux_loss
    else:
        model = VMoEUperNetForSemanticSegmentation(vmoe_upernet_config(config, hidden_size=16, num_labels=3)).train()
        loss = model(x, labels=torch.randint(0, 3, (2, 32, 32))).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for key in ("router.weight", "experts.up_proj", "shared_expert.fc1.weight"):
        found = [g for n, g in grads.items() if n.endswith(key)]
        assert found and all(g is not None and g.abs().sum() > 0 for g in found), key


class _Images(torch.utils.data.Dataset):
    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(16, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, 5, (16,), generator=generator)

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


@pytest.mark.parametrize("name", list(NEW_ROUTERS))
def test_new_routers_train_with_the_trainer_and_save_load(name, tmp_path):
    torch.manual_seed(0)
    model = VMoEForImageClassification(tiny_config(**NEW_ROUTERS[name]))
    data = _Images()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, learning_rate=3e-3,
                             max_steps=30, use_cpu=True, report_to=[], seed=0, logging_steps=5, save_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.7 * before, (before, after)
    model.save_pretrained(tmp_path / "saved")
    loaded = VMoEForImageClassification.from_pretrained(tmp_path / "saved").eval()
    model.eval()
    x = pixels(3)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert loaded.config.router_type == name


@pytest.mark.parametrize("name", list(NEW_ROUTERS))
def test_routing_analysis_reads_the_new_plans(name):
    model = VMoEForImageClassification(tiny_config(**NEW_ROUTERS[name], moe_layers=(1, 3))).eval()
    data = [{"pixel_values": pixels(3), "labels": torch.tensor([0, 1, 2])} for _ in range(2)]
    stats = collect_routing(model, data)
    assert stats.layers == [1, 3] and stats.unit == "token"
    for layer in stats.layers:
        counts = stats.counts[layer]
        assert counts.shape == (5, 4)
        if name == "soft":  # each labelled patch token's dispatch mass over the experts; 16 patches x 6 images
            assert counts.sum() == pytest.approx(float(_soft_patch_mass(model, data, layer)), rel=1e-5)
        else:  # expert choice: every selection of a patch token counts once
            assert counts.sum() > 0 and float(counts.sum()).is_integer()


def _soft_patch_mass(model, data, layer):
    captured = []
    router = model.vmoe.encoder.layer[layer].mlp.router
    handle = router.register_forward_hook(lambda m, a, out: captured.append(out[1]))
    with torch.no_grad():
        for batch in data:
            model(batch["pixel_values"])
    handle.remove()
    return sum(plan.assignment_mass(4).view(3, SEQ, 4)[:, 1:].sum() for plan in captured)


def test_top_k_router_group_size_applies_capacity_per_group():
    """With groups, each group of tokens gets its own capacity: the same tokens routed as one group keep a
    different set of assignments than routed as two groups."""
    config = tiny_config(routing_level="token", num_experts_per_tok=1, eval_capacity_factor=0.5,
                         router_group_size=2 * SEQ)
    block = VMoESparseMoeBlock(config).eval()
    torch.nn.init.normal_(block.router.weight, std=1.0)
    x = torch.randn(4, SEQ, 32)
    _, grouped = block.router(x)
    capacity = -(-2 * SEQ // (2 * 4))  # ceil(34 * 1 * 0.5 / 4) per group
    kept = grouped.keep.view(2, 2 * SEQ)
    for g in range(2):
        per_expert = torch.bincount(grouped.top_k_index.view(2, 2 * SEQ)[g][kept[g]], minlength=4)
        assert (per_expert <= capacity).all()
    whole = copy.deepcopy(block)
    whole.router.config = copy.deepcopy(config)
    whole.router.config.router_group_size = None
    _, one_group = whole.router(x)
    assert torch.equal(grouped.top_k_index, one_group.top_k_index)
    assert grouped.keep.sum() != one_group.keep.sum() or not torch.equal(grouped.keep, one_group.keep)


def test_a_users_trainer_counts_active_flops_through_count_active_flops(tmp_path):
    from hf_vmoe.integrations.callbacks import count_active_flops
    from hf_vmoe.recipes.flops import count_flops

    config = tiny_config(**EXPERT_CHOICE, router_group_size=SEQ)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    stock = Trainer(model=VMoEForImageClassification(config), args=args, train_dataset=_Images())
    stock.train()
    ours = Trainer(model=VMoEForImageClassification(config), args=args, train_dataset=_Images())
    count_active_flops(ours)
    ours.train()
    expected = 3 * 12 * count_flops(config).flops  # 3 steps of 4 images
    assert ours.state.total_flos == expected
    assert stock.state.total_flos > 10 * expected  # 6 x pixels x all parameters


# --------------------------------------------------------------------------------------------------------------
# Soft MoE as vmoe computes it
# --------------------------------------------------------------------------------------------------------------


def test_soft_moe_logits_are_scaled_cosines_of_tokens_and_slots():
    """vmoe's SoftRouter: logits = scale x cos(token, slot parameter); the token and slot norms do not matter."""
    block = VMoESparseMoeBlock(tiny_config(**SOFT))
    router = block.router
    torch.nn.init.normal_(router.weight, std=0.3)
    with torch.no_grad():
        router.scale.fill_(2.5)
    x = torch.randn(3, SEQ, 32)
    logits, plan = router(x)
    cosines = torch.nn.functional.cosine_similarity(x.unsqueeze(2), router.weight.view(1, 1, 8, 32), dim=-1)
    torch.testing.assert_close(logits.view(3, SEQ, 8), 2.5 * cosines, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        router.weight.mul_(7.0)
    torch.testing.assert_close(router(x * 0.1)[0], logits, rtol=1e-4, atol=1e-5)
    assert router.scale.shape == () and router.scale.dtype == torch.float32
    model = VMoEForImageClassification(tiny_config(**SOFT))
    assert all(float(m.scale) == 1.0 for m in model.modules() if hasattr(m, "scale"))  # vmoe's init: ones


@pytest.mark.parametrize("overrides, slots", [
    (dict(), 4),  # round(17 tokens x 1.0 / 4 experts) = round(4.25)
    (dict(capacity_factor=1.5), 6),  # round(6.375)
    (dict(use_cls_token=False, pooling="mean", capacity_factor=0.625), 2),  # round(2.5) = 2, as Python's (vmoe's)
    (dict(num_slots=3, capacity_factor=2.0), 3),  # num_slots given: the factor does not count
])
def test_soft_moe_slots_default_to_vmoe_capacity_rule(overrides, slots, tmp_path):
    config = tiny_config(routing_level="token", router_type="soft", **overrides)
    assert config.num_slots == slots
    model = VMoEForImageClassification(config)
    assert model.vmoe.encoder.layer[-1].mlp.router.weight.shape == (4 * slots, 32)
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_slots"] == slots  # stored resolved


def test_soft_moe_slot_and_group_errors_name_the_values():
    with pytest.raises(ValueError, match=r"17 tokens per image x capacity_factor 0.1 / num_experts 4 rounds to 0"):
        tiny_config(routing_level="token", router_type="soft", capacity_factor=0.1)
    with pytest.raises(ValueError, match="router_group_size=17 does not apply to router_type='soft'"):
        tiny_config(**SOFT, router_group_size=17)


def test_soft_moe_bfloat16_dispatch_rounds_tokens_and_slot_outputs():
    """vmoe's Bfloat16Dispatcher around Soft MoE's einsum dispatcher: tokens rounded to bfloat16 before they are
    mixed into slots, slot outputs before they are mixed back, the mixing in float32."""
    config = tiny_config(**SOFT, expert_dispatch_dtype="bfloat16")
    block = VMoESparseMoeBlock(config)
    for parameter in block.experts.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    torch.nn.init.normal_(block.router.weight, std=1.0)
    x = torch.randn(3, SEQ, 32)
    _, plan = block.router(x)
    slots = torch.einsum("bsn,bsh->bnh", plan.dispatch_weights, x.bfloat16().float())
    outputs = torch.stack([expert_mlp(block.experts, n // 2, slots[:, n]) for n in range(8)], dim=1)
    expected = torch.einsum("bsn,bnh->bsh", plan.combine_weights, outputs.bfloat16().float())
    got = block(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    unrounded = VMoESparseMoeBlock(tiny_config(**SOFT))
    unrounded.load_state_dict(block.state_dict())
    assert (unrounded(x) - got).abs().max() > 1e-4  # the rounding is visible


def test_soft_moe_checkpoint_in_the_old_layout_is_refused(tmp_path):
    """hf_vmoe's first Soft MoE router was a plain linear layer (router.weight only): such a checkpoint is refused
    with a message naming the change, whatever the loading options."""
    from safetensors.torch import load_file, save_file

    VMoEForImageClassification(tiny_config(**SOFT)).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    old = {key: value for key, value in weights.items() if not key.endswith("router.scale")}
    assert len(old) == len(weights) - 2  # the two MoE blocks
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for options in (dict(), dict(ignore_mismatched_sizes=True), dict(output_loading_info=True)):
        with pytest.raises(VMoECheckpointMismatchError, match=r"old layout .*router\.weight without 'scale'.*"
                                                              r"L2-normalised tokens and slot parameters"):
            VMoEForImageClassification.from_pretrained(tmp_path, **options)


def test_register_router_checks_its_arguments_and_enables_the_name():
    from hf_vmoe.configuration_vmoe import ROUTER_LEVELS
    from hf_vmoe.modeling_vmoe import ROUTER_CLASSES, VMoETopKRouter, register_router

    with pytest.raises(ValueError, match="router_type must be one of"):
        tiny_config(router_type="mine")
    with pytest.raises(TypeError, match="VMoERouter subclass"):
        register_router("mine", torch.nn.Linear)
    with pytest.raises(ValueError, match="routing_levels"):
        register_router("mine", VMoETopKRouter, routing_levels=("pixel",))

    class ImageRouter(VMoETopKRouter):  # a built-in router under a new name, for whole images only
        pass

    try:
        register_router("mine", ImageRouter, routing_levels=("image",))
        model = VMoEForImageClassification(tiny_config(router_type="mine", moe_layers=(2, 3)))
        assert isinstance(model.vmoe.encoder.router, ImageRouter)  # the shared image router too
        with pytest.raises(ValueError, match="router_type='mine' routes images"):
            tiny_config(router_type="mine", routing_level="token")
    finally:
        ROUTER_CLASSES.pop("mine", None)
        ROUTER_LEVELS.pop("mine", None)


@pytest.mark.parametrize("name", ["expert_choice", "soft"])
def test_equal_work_routers_send_global_expert_ids_when_experts_are_sharded(name, monkeypatch):
    """Under expert parallelism a rank's `VMoEExperts` holds some experts only (`num_experts` is the local count): expert
    choice and Soft MoE then go through the experts interface with every row's global expert id, not their batched
    per-expert path, which needs every expert."""
    block = VMoESparseMoeBlock(tiny_config(**ALL_ROUTINGS[name], num_experts=4))
    block.experts.config._experts_implementation = "eager"
    seen = []

    def spy(experts, hidden_states, top_k_index, top_k_weights):
        seen.append(top_k_index.unique().tolist())
        return torch.zeros_like(hidden_states)

    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS, "eager", spy)
    with torch.no_grad():
        block(torch.randn(2, SEQ, 32))
        assert seen == []  # every expert local: one batched matmul per projection, no interface call
        block.experts.num_experts = 2  # as a rank of two holds them
        block(torch.randn(2, SEQ, 32))
    assert seen == [[0, 1, 2, 3]]


def test_vmoe_cpu_backend_names_the_experts_it_is_for():
    from hf_vmoe.modeling_vmoe import vmoe_cpu_experts_forward

    with pytest.raises(ValueError, match="'vmoe_cpu' is hf_vmoe's, for VMoEExperts; got Linear"):
        vmoe_cpu_experts_forward(torch.nn.Linear(2, 2), torch.zeros(1, 2), torch.zeros(1, 1, dtype=torch.long),
                                 torch.ones(1, 1))
