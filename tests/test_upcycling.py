"""Sparse upcycling: a dense ViT / DINOv2 (random weights) and its upcycled VMoE compute the same function."""

import pytest
import torch
from conftest import load_example, tiny_config
from transformers import (
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from hf_vmoe import (
    VMoEBackbone,
    VMoEConfig,
    VMoEForImageClassification,
    VMoEForSemanticSegmentation,
    VMoEModel,
)
from hf_vmoe.recipes.upcycling import init_experts_from_dense, upcycle, vmoe_config_from_dense

DENSE = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8, num_labels=5)
ATOL = 1e-5


def _randomize(model):
    """Random non-trivial weights everywhere (norms, biases, layer scale too) so a wrong mapping shows."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0))
    return model.eval()


def vit_classifier():
    return _randomize(ViTForImageClassification(ViTConfig(intermediate_size=64, **DENSE)))


def dinov2_classifier(**kw):
    return _randomize(Dinov2ForImageClassification(Dinov2Config(mlp_ratio=2, layerscale_value=0.5, **DENSE, **kw)))


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("family", ["vit", "dinov2"])
@pytest.mark.parametrize("routing_level", ["image", "token"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("num_shared_experts", [0, 1])
def test_upcycled_classifier_equals_dense(family, routing_level, k, num_shared_experts, pixels):
    dense = vit_classifier() if family == "vit" else dinov2_classifier()
    model = upcycle(
        dense,
        routing_level=routing_level,
        num_experts=4,
        num_experts_per_tok=k,
        num_shared_experts=num_shared_experts,
        moe_layers=(1, 2),
        seed=0,
    )
    assert isinstance(model, VMoEForImageClassification)
    assert model.config.normalize_router_weights
    assert model.config.pooling == ("cls_mean" if family == "dinov2" else "cls")
    with torch.no_grad():
        expected = dense(pixels).logits
        out = model(pixels, output_router_logits=True)
    torch.testing.assert_close(out.logits, expected, atol=ATOL, rtol=0)
    items = 3 if routing_level == "image" else 3 * 17
    assert out.expert_counts.shape[1] == 4 and (out.expert_counts.sum(1) == items * k).all()
    if routing_level == "token":  # the routers are live (random init): tokens spread over several experts
        assert (out.expert_counts.sum(0) > 0).sum() > 1
    # changing one expert changes the output: the experts are really used
    with torch.no_grad():
        model.vmoe.encoder.layer[2].mlp.experts.down_proj.mul_(3.0)
        assert not torch.allclose(model(pixels).logits, expected, atol=1e-3)


def test_mlp_mapping_is_per_block(pixels):
    """Hidden states after every block match: dense blocks stay dense, MoE blocks reproduce their own MLP."""
    dense = dinov2_classifier()
    model = upcycle(dense, routing_level="token", num_experts=3, num_experts_per_tok=2, moe_layers=(0, 2), seed=0)
    assert [layer.is_moe for layer in model.vmoe.encoder.layer] == [True, False, True]
    torch.testing.assert_close(
        model.vmoe.encoder.layer[1].mlp.fc1.weight, dense.dinov2.encoder.layer[1].mlp.fc1.weight
    )
    torch.testing.assert_close(
        model.vmoe.encoder.layer[0].layer_scale2.lambda1, dense.dinov2.encoder.layer[0].layer_scale2.lambda1
    )
    with torch.no_grad():
        ref = dense(pixels, output_hidden_states=True).hidden_states
        got = model(pixels, output_hidden_states=True).hidden_states
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_shared_experts", [0, 2])
def test_base_models(num_shared_experts, pixels):
    for dense in (
        _randomize(ViTModel(ViTConfig(intermediate_size=64, **DENSE), add_pooling_layer=False)),
        _randomize(Dinov2Model(Dinov2Config(mlp_ratio=2, **DENSE))),
    ):
        model = upcycle(dense, routing_level="token", num_experts=2, num_experts_per_tok=1,
                        num_shared_experts=num_shared_experts, moe_layers="all")
        assert isinstance(model, VMoEModel)
        with torch.no_grad():
            ref, out = dense(pixels), model(pixels)
        torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=ATOL, rtol=0)
        # VMoE's pooler output is the final class token (DINOv2's too; ViT without its pooler has none)
        torch.testing.assert_close(out.pooler_output, ref.last_hidden_state[:, 0], atol=ATOL, rtol=0)


def test_dinov2_other_image_size():
    """DINOv2 interpolates its position embeddings at every forward: upcycling to image_size=48 resamples them the
    same way, so the VMoE at 48 px equals DINOv2 at 48 px (no interpolate_pos_encoding needed)."""
    dense = dinov2_classifier()
    x = torch.randn(2, 3, 48, 48)
    model = upcycle(dense, routing_level="image", num_experts=4, num_experts_per_tok=2, image_size=48)
    assert model.config.image_size == 48
    assert model.vmoe.embeddings.position_embeddings.shape[1] == 1 + 36
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, dense(x).logits, atol=ATOL, rtol=0)
    # default image size keeps the dense grid, and another size then needs interpolate_pos_encoding
    same = upcycle(dense, routing_level="image", num_experts=4)
    assert same.vmoe.embeddings.position_embeddings.shape[1] == 1 + 16
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        same(x)


def test_vit_other_image_size_matches_interpolation():
    dense = vit_classifier()
    x = torch.randn(2, 3, 40, 48)
    model = upcycle(dense, routing_level="token", num_experts=2, image_size=(40, 48))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, dense(x, interpolate_pos_encoding=True).logits, atol=ATOL, rtol=0)


def test_split_experts_uniform_router_over_all_experts_equals_dense(pixels):
    dense = vit_classifier()
    model = upcycle(dense, routing_level="token", expert_init="split", num_experts=4, num_experts_per_tok=4,
                    moe_layers=(2,))
    assert model.config.moe_intermediate_size == 16
    with torch.no_grad():
        model.vmoe.encoder.layer[2].mlp.router.weight.zero_()  # uniform router: each expert gets weight 1/4
        torch.testing.assert_close(model(pixels).logits, dense(pixels).logits, atol=ATOL, rtol=0)
    one = upcycle(dense, routing_level="token", expert_init="split", num_experts=4, num_experts_per_tok=1,
                  moe_layers=(2,))
    with torch.no_grad():  # a single slice is not the dense MLP
        assert not torch.allclose(one(pixels).logits, dense(pixels).logits, atol=1e-3)
    with pytest.raises(ValueError, match="divisible"):
        upcycle(dense, expert_init="split", num_experts=3)


def test_expert_noise_perturbs_copies(pixels):
    dense = vit_classifier()
    model = upcycle(dense, routing_level="token", num_experts=4, expert_noise_std=0.05, seed=3, moe_layers=(2,))
    experts = model.vmoe.encoder.layer[2].mlp.experts
    assert not torch.allclose(experts.up_proj[0], experts.up_proj[1])
    rel = (experts.up_proj[0] - dense.vit.layers[2].mlp.fc1.weight).std() / dense.vit.layers[2].mlp.fc1.weight.std()
    assert 0.02 < rel.item() < 0.1
    with torch.no_grad():
        diff = (model(pixels).logits - dense(pixels).logits).abs().max().item()
    assert 0 < diff < 1.0


def test_from_local_directory_and_round_trip(tmp_path, pixels):
    dense = dinov2_classifier()
    dense.save_pretrained(tmp_path / "dense")
    model = upcycle(str(tmp_path / "dense"), routing_level="token", num_experts=4, num_experts_per_tok=2,
                    num_shared_experts=1)
    with torch.no_grad():
        expected = dense(pixels).logits
        torch.testing.assert_close(model(pixels).logits, expected, atol=ATOL, rtol=0)
    model.save_pretrained(tmp_path / "moe")
    assert (tmp_path / "moe" / "model.safetensors").exists()
    reloaded = VMoEForImageClassification.from_pretrained(tmp_path / "moe")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).logits, expected, atol=ATOL, rtol=0)
    assert reloaded.config.id2label == dense.config.id2label


def test_segmentation_and_backbone_targets(pixels):
    dense = vit_classifier()
    seg = upcycle(dense, task="segmentation", routing_level="token", num_experts=4, num_shared_experts=1,
                  id2label={0: "a", 1: "b", 2: "c"})
    assert isinstance(seg, VMoEForSemanticSegmentation) and seg.config.num_labels == 3
    assert seg(pixels).logits.shape == (3, 3, 32, 32)
    backbone = upcycle(dense, task="backbone", routing_level="token", num_experts=4, out_indices=[1, 3])
    assert isinstance(backbone, VMoEBackbone)
    with torch.no_grad():
        maps = backbone(pixels).feature_maps
        hidden = dense(pixels, output_hidden_states=True).hidden_states
    assert len(maps) == 2 and maps[0].shape == (3, 32, 4, 4)
    # the backbone applies the final layer norm to each stage, as Dinov2Backbone does
    expected = dense.vit.layernorm(hidden[3])[:, 1:].reshape(3, 4, 4, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(maps[1], expected, atol=ATOL, rtol=0)


def test_refusals():
    with pytest.raises(ValueError, match="use_swiglu_ffn"):
        upcycle(dinov2_classifier(use_swiglu_ffn=True), num_experts=2)
    registers = Dinov2WithRegistersModel(
        Dinov2WithRegistersConfig(num_register_tokens=4, **{k: v for k, v in DENSE.items() if k != "num_labels"})
    )
    with pytest.raises(ValueError, match="register tokens"):
        upcycle(registers, num_experts=2)
    deit = DeiTForImageClassificationWithTeacher(DeiTConfig(intermediate_size=64, **DENSE)).eval()
    with pytest.raises(ValueError, match="distillation token"):
        upcycle(deit, num_experts=2)
    with pytest.raises(ValueError, match="task"):
        upcycle(vit_classifier(), task="detection")
    with pytest.raises(ValueError, match="expert_init"):
        upcycle(vit_classifier(), expert_init="random")
    with pytest.raises(ValueError, match="hidden_size"):
        upcycle(vit_classifier(), hidden_size=64)
    for name in ("moe_intermediate_size", "expert_intermediate_size"):  # the field and its earlier name
        with pytest.raises(ValueError, match="moe_intermediate_size=32 does not fit"):
            upcycle(vit_classifier(), **{name: 32})
    with pytest.raises(ValueError, match="model_type"):
        vmoe_config_from_dense(VMoEConfig())


def test_deit_with_dropped_distillation_token(pixels):
    deit = _randomize(DeiTForImageClassificationWithTeacher(DeiTConfig(intermediate_size=64, **DENSE)))
    model = upcycle(deit, drop_distillation_token=True, routing_level="token", num_experts=2)
    pos = deit.deit.embeddings.position_embeddings
    torch.testing.assert_close(model.vmoe.embeddings.position_embeddings, torch.cat([pos[:, :1], pos[:, 2:]], 1))
    torch.testing.assert_close(model.classifier.weight, deit.cls_classifier.weight)
    assert model(pixels).logits.shape == (3, 5)


def test_upcycle_example_script(tmp_path, capsys):
    import json

    script = load_example("upcycle")
    dinov2_classifier().save_pretrained(tmp_path / "dense")
    script.main([str(tmp_path / "dense"), str(tmp_path / "moe"), "--num_experts", "4", "--num_shared_experts", "1",
                 "--moe_layers", "1,2", "--image_size", "48", "--check"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["max_abs_diff"] < ATOL and summary["moe_layers"] == [1, 2]
    model = VMoEForImageClassification.from_pretrained(tmp_path / "moe")
    assert model.config.image_size == 48 and model.config.num_shared_experts == 1
    assert (tmp_path / "moe" / "preprocessor_config.json").exists()


@pytest.mark.parametrize("router", [dict(router_type="soft", num_slots=2), dict(router_type="expert_choice")],
                         ids=["soft", "expert_choice"])
def test_upcycling_into_the_other_routers_copies_the_experts(router):
    """Expert choice and Soft MoE do not compute the dense function, but upcycle into them: the experts are the dense
    MLP, the routers start fresh (Soft MoE's scale at 1)."""
    dense = vit_classifier()
    model = upcycle(dense, routing_level="token", num_experts=4, **router)
    layer = model.vmoe.encoder.layer[-1]
    fc1 = dense.vit.layers[-1].mlp.fc1.weight
    assert all(torch.equal(layer.mlp.experts.up_proj[e], fc1) for e in range(4))
    if router["router_type"] == "soft":
        assert float(layer.mlp.router.scale) == 1.0


# --------------------------------------------------------------------------------------------------------------
# Drop-upcycling: a share of each expert's hidden units re-initialised
# --------------------------------------------------------------------------------------------------------------


def dense_twin():
    """A dense VMoE (tiny_config without MoE blocks) with random non-trivial weights and its MoE twin."""
    dense = _randomize(VMoEForImageClassification(tiny_config(moe_layers="none")))
    return dense, VMoEForImageClassification(tiny_config(moe_layers=[2, 3], num_experts=4))


def redrawn_units(experts, fc1, fc2):
    """Per expert, the hidden units whose up row, up bias or down column differ from the dense MLP's."""
    units = []
    for e in range(experts.up_proj.shape[0]):
        changed = ((experts.up_proj[e] != fc1.weight).any(dim=1) | (experts.up_proj_bias[e] != fc1.bias)
                   | (experts.down_proj[e] != fc2.weight).any(dim=0))
        units.append(torch.nonzero(changed).flatten())
    return units


@pytest.mark.parametrize("ratio,expected", [(0.25, 16), (0.5, 32), (0.1, 6), (1.0, 64)])
def test_drop_upcycling_redraws_an_exact_share_per_expert(ratio, expected):
    dense, moe = dense_twin()
    init_experts_from_dense(moe, dense, drop_ratio=ratio, seed=0)
    dense_state = dense.state_dict()
    for name, value in moe.state_dict().items():
        if ".mlp." not in name and "router" not in name:
            assert torch.equal(value, dense_state[name]), name  # outside the experts everything is the dense model's
    for i in (2, 3):
        experts, fc1, fc2 = moe.vmoe.encoder.layer[i].mlp.experts, dense.vmoe.encoder.layer[i].mlp.fc1, \
            dense.vmoe.encoder.layer[i].mlp.fc2
        units = redrawn_units(experts, fc1, fc2)
        assert [len(u) for u in units] == [expected] * 4  # round(ratio * 64) units in every expert
        if expected < 64:
            assert len({tuple(u.tolist()) for u in units}) == 4  # a different subset per expert
        for e, changed in enumerate(units):
            kept = torch.ones(64, dtype=torch.bool)
            kept[changed] = False
            assert torch.equal(experts.up_proj[e][kept], fc1.weight[kept])  # bit for bit
            assert torch.equal(experts.up_proj_bias[e][kept], fc1.bias[kept])
            assert torch.equal(experts.down_proj[e][:, kept], fc2.weight[:, kept])
            assert torch.equal(experts.down_proj_bias[e], fc2.bias)
            # every part of a redrawn unit is new, drawn with the dense matrix's statistics (std 0.2 here, not the
            # initialiser's 0.02)
            assert (experts.up_proj[e][changed] != fc1.weight[changed]).all()
            assert (experts.down_proj[e][:, changed] != fc2.weight[:, changed]).all()
            new_std = experts.up_proj[e][changed].std().item()
            assert 0.7 < new_std / fc1.weight.std().item() < 1.3


def test_drop_upcycling_zero_is_the_plain_upcycle_and_is_seeded():
    dense, moe = dense_twin()
    plain = init_experts_from_dense(VMoEForImageClassification(moe.config), dense).state_dict()
    zero = init_experts_from_dense(VMoEForImageClassification(moe.config), dense, drop_ratio=0.0, seed=1).state_dict()
    experts = [k for k in plain if ".experts." in k]
    assert experts and all(torch.equal(plain[k], zero[k]) for k in experts)
    first, again, other = (init_experts_from_dense(VMoEForImageClassification(moe.config), dense, drop_ratio=0.5,
                                                   seed=seed).state_dict() for seed in (3, 3, 4))
    assert all(torch.equal(first[k], again[k]) for k in experts)
    assert not torch.equal(first[experts[0]], other[experts[0]])


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_drop_upcycling_refuses_a_ratio_outside_0_1(ratio):
    dense, moe = dense_twin()
    with pytest.raises(ValueError, match=rf"drop_ratio must be a number in \[0, 1\].*got {ratio!r}"):
        init_experts_from_dense(moe, dense, drop_ratio=ratio)
    with pytest.raises(ValueError, match="drop_ratio"):
        upcycle(vit_classifier(), num_experts=4, drop_ratio=ratio)


def test_upcycle_with_drop_ratio(pixels):
    dense = vit_classifier()
    kwargs = dict(routing_level="token", num_experts=4, num_experts_per_tok=2, moe_layers=(1, 2), seed=0)
    plain, dropped = upcycle(dense, **kwargs), upcycle(dense, drop_ratio=0.25, **kwargs)
    assert torch.equal(upcycle(dense, drop_ratio=0.0, **kwargs)(pixels).logits, plain(pixels).logits)
    for i in (1, 2):
        mlp = dense.vit.layers[i].mlp
        units = redrawn_units(dropped.vmoe.encoder.layer[i].mlp.experts, mlp.fc1, mlp.fc2)
        assert [len(u) for u in units] == [16] * 4 and len({tuple(u.tolist()) for u in units}) == 4
    with torch.no_grad():
        assert not torch.allclose(dropped(pixels).logits, dense(pixels).logits, atol=1e-3)


def test_upcycle_example_script_drop_ratio(tmp_path, capsys):
    script = load_example("upcycle")
    vit_classifier().save_pretrained(tmp_path / "dense")
    model = script.main([str(tmp_path / "dense"), str(tmp_path / "moe"), "--num_experts", "4", "--moe_layers", "2",
                         "--drop_ratio", "0.25", "--check"])
    assert "--check skipped" in capsys.readouterr().out
    mlp = vit_classifier().vit.layers[2].mlp  # the same random weights (_randomize is seeded)
    units = redrawn_units(model.vmoe.encoder.layer[2].mlp.experts, mlp.fc1, mlp.fc2)
    assert [len(u) for u in units] == [16] * 4


# --------------------------------------------------------------------------------------------------------------
# split_shared: a shared expert of the first half of the dense MLP, routed experts copies of the second half
# --------------------------------------------------------------------------------------------------------------


def split_shared_twin(k=1, **overrides):
    """A dense VMoE twin and a token MoE of 4 half-width experts + a half-width shared expert (round 3's B3 arm)."""
    dense = _randomize(VMoEForImageClassification(tiny_config(moe_layers="none")))
    width = dense.config.intermediate_size // 2
    moe = VMoEForImageClassification(tiny_config(
        routing_level="token", moe_layers=[2, 3], num_experts=4, num_experts_per_tok=k, num_shared_experts=1,
        moe_intermediate_size=width, shared_expert_intermediate_size=width, **overrides))
    return dense, moe


@pytest.mark.parametrize("k", [1, 2])
def test_split_shared_from_the_dense_twin_equals_dense_and_lays_out_the_halves(k):
    dense, moe = split_shared_twin(k, normalize_router_weights=True)
    init_experts_from_dense(moe, dense, expert_init="split_shared").eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = moe(x, output_router_logits=True)
        torch.testing.assert_close(out.logits, dense(x).logits, atol=ATOL, rtol=0)
    assert (out.expert_counts.sum(0) > 0).sum() > 1  # the (random) routers spread tokens: the experts are used
    half = dense.config.intermediate_size // 2
    for i in (2, 3):
        fc1, fc2 = dense.vmoe.encoder.layer[i].mlp.fc1, dense.vmoe.encoder.layer[i].mlp.fc2
        block = moe.vmoe.encoder.layer[i].mlp
        assert torch.equal(block.shared_expert.fc1.weight, fc1.weight[:half])
        assert torch.equal(block.shared_expert.fc2.weight, fc2.weight[:, :half])
        assert torch.equal(block.shared_expert.fc2.bias, fc2.bias)
        for e in range(4):
            assert torch.equal(block.experts.up_proj[e], fc1.weight[half:])
            assert torch.equal(block.experts.up_proj_bias[e], fc1.bias[half:])
            assert torch.equal(block.experts.down_proj[e], fc2.weight[:, half:])
            assert not block.experts.down_proj_bias[e].any()


def test_split_shared_drop_and_noise_touch_only_the_routed_experts():
    dense, moe = split_shared_twin()
    init_experts_from_dense(moe, dense, expert_init="split_shared", drop_ratio=0.5, noise_std=0.1, seed=0)
    plain = init_experts_from_dense(split_shared_twin()[1], dense, expert_init="split_shared")
    for name, value in moe.state_dict().items():
        if "router" in name:
            continue
        same = torch.equal(value, plain.state_dict()[name])
        assert same == (".experts." not in name or name.endswith("down_proj_bias")), name


def test_split_shared_refuses_what_it_cannot_build():
    dense, moe = split_shared_twin()
    with pytest.raises(ValueError, match="expert_init must be 'copy' or 'split_shared'.*'split'"):
        init_experts_from_dense(moe, dense, expert_init="split")
    with pytest.raises(ValueError, match="use expert_init='split_shared'"):  # a shared expert, copy mode
        init_experts_from_dense(moe, dense)
    full_width = VMoEForImageClassification(tiny_config(routing_level="token", moe_layers=[2, 3], num_experts=4))
    with pytest.raises(ValueError, match=r"makes shape \(4, 32, 32\).*has \(4, 64, 32\)"):
        init_experts_from_dense(full_width, dense, expert_init="split_shared")


def test_upcycle_split_shared_equals_dense(pixels):
    dense = vit_classifier()
    model = upcycle(dense, routing_level="token", expert_init="split_shared", num_experts=4, num_experts_per_tok=1,
                    moe_layers=(1, 2), seed=0)
    config = model.config
    widths = (config.num_shared_experts, config.moe_intermediate_size, config.shared_expert_intermediate_size)
    assert widths == (1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, dense(pixels).logits, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="one shared expert.*num_shared_experts=2"):
        upcycle(dense, routing_level="token", expert_init="split_shared", num_shared_experts=2)
    odd = _randomize(ViTForImageClassification(ViTConfig(intermediate_size=63, **DENSE)))
    with pytest.raises(ValueError, match="width must be even, got 63"):
        upcycle(odd, routing_level="token", expert_init="split_shared")


@pytest.mark.parametrize("kwargs,sums", [
    (dict(noise_std=0.1, drop_ratio=0.25), (-0.432413, -0.37416)),
    (dict(drop_ratio=0.25), (-0.262294, -0.14003)),
    (dict(noise_std=0.1), (-0.230587, -0.410921)),
])
def test_seeded_copies_keep_their_draws(kwargs, sums):
    """A seed gives the experts it gave before expert_init existed: noise for every block first, then the drop in
    sorted key order (layer 10 before layer 2). The sums were recorded with that earlier code (729cc7e)."""
    def config(**kw):
        return VMoEConfig(hidden_size=8, num_hidden_layers=12, num_attention_heads=2, intermediate_size=16,
                          image_size=16, patch_size=8, num_experts=3, num_labels=3, **kw)

    torch.manual_seed(0)
    dense = VMoEForImageClassification(config(moe_layers="none"))
    moe = init_experts_from_dense(VMoEForImageClassification(config(moe_layers=[2, 10])), dense, seed=0, **kwargs)
    got = [float(moe.vmoe.encoder.layer[i].mlp.experts.up_proj.double().sum()) for i in (2, 10)]
    assert got == pytest.approx(sums, abs=1e-5)


def test_split_shared_state_dict_needs_one_shared_expert():
    from hf_vmoe.recipes.upcycling import upcycled_state_dict

    config = vmoe_config_from_dense(vit_classifier().config, routing_level="token", num_experts=4,
                                    moe_intermediate_size=32, moe_layers=(2,))
    with pytest.raises(ValueError, match="needs num_shared_experts=1, got 0"):
        upcycled_state_dict(vit_classifier(), config, expert_init="split_shared")
