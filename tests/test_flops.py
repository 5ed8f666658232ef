"""Analytic params / FLOPs against brute force: model.parameters() and torch's FlopCounterMode."""

import pytest
import torch
from conftest import tiny_config
from torch.utils.flop_counter import FlopCounterMode

from hf_vmoe import VMoEForImageClassification, VMoEModel
from hf_vmoe.recipes.flops import count_flops, count_params, measure_flops
from hf_vmoe.recipes.presets import get_preset, preset_names, preset_table
from hf_vmoe.recipes.upcycling import init_experts_from_dense

CONFIGS = {
    "dense": dict(moe_layers="none"),
    "image_shared_router": dict(),
    "image_per_layer_router_k2_shared_expert": dict(shared_router=False, num_experts_per_tok=2, num_shared_experts=1,
                                                   shared_expert_intermediate_size=16),
    "token_k2_every2": dict(routing_level="token", num_experts_per_tok=2, moe_layers="every:2"),
    "token_shared_experts_cls_mean_layerscale": dict(routing_level="token", num_shared_experts=2, pooling="cls_mean",
                                                     layerscale_value=0.1, qkv_bias=False),
    "image_narrow_experts_all_blocks": dict(moe_layers="all", moe_intermediate_size=24, num_experts=3,
                                            patch_size=4),
    "expert_choice_per_image_groups": dict(routing_level="token", router_type="expert_choice", router_group_size=17,
                                           capacity_factor=1.5, num_shared_experts=1),
    "expert_choice_default_groups_multiple_of_4": dict(routing_level="token", router_type="expert_choice",
                                                       capacity_multiple_of=4),  # each image alone at inference
    "soft_two_slots": dict(routing_level="token", router_type="soft", num_slots=2, moe_layers="every:2"),
    # 5 images x 17 tokens = 85 routed tokens: 4 groups of 20 and a last one of 5 with its own capacity
    "expert_choice_partial_last_group": dict(routing_level="token", router_type="expert_choice", router_group_size=20,
                                             router_group_remainder="partial"),
    "vmoe_gap_pre_logits": dict(routing_level="token", use_cls_token=False, pooling="mean", representation_size=24),
}
ALL_EXPERTS_ACTIVE = ("expert_choice", "soft")  # every expert computes part of every image


@pytest.mark.parametrize("name", list(CONFIGS))
def test_params_match_the_model(name):
    config = tiny_config(**CONFIGS[name])
    model = VMoEForImageClassification(config)
    total, active = count_params(config)
    assert total == sum(p.numel() for p in model.parameters())
    assert count_params(config, head=None)[0] == sum(p.numel() for p in VMoEModel(config).parameters())
    if config.is_moe:
        per_expert = 2 * config.hidden_size * config.moe_intermediate_size + config.moe_intermediate_size \
            + config.hidden_size
        idle = 0 if config.router_type in ALL_EXPERTS_ACTIVE else config.num_experts - config.num_experts_per_tok
        assert total - active == idle * per_expert * len(config.moe_layers)
    else:
        assert total == active


def brute_force_flops(model, batch):
    """FlopCounterMode on an eval forward with eager attention and eager experts (so every matmul is visible)."""
    model.eval()
    model.set_attn_implementation("eager")
    if model.config.is_moe:
        model.set_experts_implementation("eager")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixel_values=batch)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_flops_match_flop_counter(name):
    config = tiny_config(**CONFIGS[name])
    model = VMoEForImageClassification(config)
    batch = torch.randn(5, 3, 32, 32)
    expected = count_flops(config, batch_size=5).flops * 5
    if config.router_type == "expert_choice" and config.router_group_remainder == "partial":
        # the last group's capacity is shared by its tokens: the per-image figure is a fraction (rounded in
        # ModelCost)
        assert brute_force_flops(model, batch) == pytest.approx(expected, abs=5)
        return
    assert expected == brute_force_flops(model, batch)
    assert measure_flops(model, batch) == count_flops(config, batch_size=5).flops


@pytest.mark.parametrize("router", [dict(router_type="expert_choice"), dict(eval_capacity_factor=4.0),
                                    dict(eval_capacity_factor=None)], ids=["expert_choice", "top_k_capacity", "dropless"])
def test_padded_routing_groups_flops_match_flop_counter(router):
    """router_group_remainder='pad' runs 20 images for 5 here (17 tokens an image, groups of 20 tokens): the padding's
    blocks are counted, its classifier not. Dropless top-k needs no padding at inference, and gets none. (Top-k's
    capacity here, 4 x 20 / 4 experts = 20, drops nothing: count_flops counts every assignment.)"""
    config = tiny_config(routing_level="token", router_group_size=20, router_group_remainder="pad", **router)
    model = VMoEForImageClassification(config).eval()
    batch = torch.randn(5, 3, 32, 32)
    flops = count_flops(config, batch_size=5).flops
    assert brute_force_flops(model, batch) == pytest.approx(flops * 5, abs=5)
    unpadded = count_flops(config.__class__(**{**config.to_dict(), "router_group_remainder": "partial"}), batch_size=5)
    assert (flops > 3 * unpadded.flops) == (router.get("eval_capacity_factor", 1.0) is not None)


def test_image_routing_costs_the_dense_twin_plus_the_router():
    dense = count_flops(tiny_config(moe_layers="none"))
    moe = count_flops(tiny_config())
    router = 2 * 32 * 4 + 2 * 17 * 32  # 2 x hidden x experts, and the mean of the 17 tokens (a matmul)
    assert moe.flops - dense.flops == router  # one shared router
    per_layer = count_flops(tiny_config(shared_router=False))
    assert per_layer.flops - dense.flops == 2 * router  # a router in each of the 2 MoE blocks
    assert count_flops(tiny_config(router_input="cls")).flops - dense.flops == 2 * 32 * 4  # no mean
    assert moe.flops_all_experts - moe.flops == 3 * 2 * (2 * 2 * 17 * 32 * 64)  # 3 idle experts x 2 blocks


def test_flops_at_another_resolution_match_the_counter():
    config = tiny_config(moe_layers="all")
    model = VMoEForImageClassification(config).eval()
    model.set_attn_implementation("eager")
    model.set_experts_implementation("eager")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixel_values=torch.randn(2, 3, 48, 64), interpolate_pos_encoding=True)
    assert count_flops(config, image_size=(48, 64)).flops * 2 == counter.get_total_flops()
    with pytest.raises(ValueError, match="divisible"):
        count_flops(config, image_size=30)


def test_presets_and_paper_sizes():
    names = preset_names()
    assert "mobile-vmoe-12x192" in names and "vit-3x64" in names
    tiny = get_preset("mobile-vmoe-tiny")
    assert (tiny.num_hidden_layers, tiny.hidden_size, tiny.num_experts, tiny.num_experts_per_tok) == (12, 192, 10, 1)
    assert tiny.moe_layers == (10, 11) and tiny.shared_router and tiny.routing_level == "image"
    assert not get_preset("vit-tiny").is_moe
    # the paper quotes 11.05M params (all experts) and 6.31M active for per-image routing
    assert round(count_params(tiny)[0] / 1e6, 2) == 11.05
    assert round(count_params(get_preset("mobile-vmoe-tiny", num_experts_per_tok=2))[1] / 1e6, 2) == 6.31
    # our reconstruction of the 54M-FLOP model: 53.6M multiply-adds
    assert count_flops(get_preset("vit-54m")).macs == pytest.approx(54e6, rel=0.01)
    rows = {r["name"]: r for r in preset_table()}
    for size in ("12x192", "3x64", "6x96"):
        dense, moe = rows[f"vit-{size}"], rows[f"mobile-vmoe-{size}"]
        tokens = count_flops(get_preset(f"mobile-vmoe-{size}")).num_tokens
        # equal active FLOPs but for the router: its linear layer and the mean of the tokens (a matmul)
        assert moe["flops"] - dense["flops"] == 2 * dense["width"] * 10 + 2 * tokens * dense["width"]
        assert moe["params_total"] > moe["params_active"] == dense["params_active"] + dense["width"] * 10
    assert get_preset("mobile-vmoe-tiny", num_labels=7, image_size=64, patch_size=8).num_labels == 7
    for size in ("12x192", "3x64"):
        dense, vimoe = rows[f"vit-{size}"], rows[f"vimoe-{size}"]
        tokens = count_flops(get_preset(f"vimoe-{size}")).num_tokens
        # one half-width routed expert + the half-width shared expert = the dense MLP; extra: 2 token routers of 4
        assert vimoe["flops"] - dense["flops"] == 2 * (2 * tokens * dense["width"] * 4)
        width = dense["width"]  # per MoE block: the router (4 x width) and the routed expert's own output bias
        assert vimoe["params_active"] == dense["params_active"] + 2 * (width * 4 + width)
        # 3 more routed experts per block, each (2 x width) x width twice with biases
        assert vimoe["params_total"] == vimoe["params_active"] + 2 * 3 * (4 * width ** 2 + 3 * width)
    assert get_preset("mobile-vmoe-tiny", num_hidden_layers=6).moe_layers == (4, 5)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("vit-huge")


def test_init_experts_from_dense_reproduces_the_dense_model():
    dense = VMoEForImageClassification(tiny_config(moe_layers="none")).eval()
    moe = VMoEForImageClassification(tiny_config(normalize_router_weights=True)).eval()
    init_experts_from_dense(moe, dense)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(moe(pixel_values=x).logits, dense(pixel_values=x).logits)
    with pytest.raises(ValueError, match="shape"):
        init_experts_from_dense(VMoEForImageClassification(tiny_config(hidden_size=64)), dense)


def test_cli_presets_and_flops(capsys):
    from hf_vmoe.cli import main

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "| mobile-vmoe-12x192 | 12x192 | 10,11 | 10 | 1 | 11.05M | 5.72M |" in out
    assert "53.6" in out  # the 54M-FLOP reconstruction, in MACs
    assert main(["flops", "--preset", "mobile-vmoe-tiny"]) == 0
    out = capsys.readouterr().out
    assert "tokens per image: 197" in out and "router" in out


def test_init_experts_from_dense_noise_is_seeded_and_breaks_symmetry():
    from hf_vmoe.recipes.upcycling import init_experts_from_dense as canonical

    assert canonical is init_experts_from_dense  # one implementation, re-exported by hf_vmoe.recipes.presets
    dense = VMoEForImageClassification(tiny_config(moe_layers="none")).eval()
    a, b = (init_experts_from_dense(VMoEForImageClassification(tiny_config()), dense, noise_std=0.1, seed=3)
            for _ in range(2))
    up_a, up_b = a.vmoe.encoder.layer[-1].mlp.experts.up_proj, b.vmoe.encoder.layer[-1].mlp.experts.up_proj
    assert torch.equal(up_a, up_b)  # same seed, same experts
    assert not torch.equal(up_a[0], up_a[1])  # the copies differ
    dense_w = dense.vmoe.encoder.layer[-1].mlp.fc1.weight
    relative = (up_a - dense_w).std() / dense_w.std()
    assert 0.05 < relative < 0.2  # noise_std is relative to the dense weight's std
    torch.testing.assert_close(a.vmoe.encoder.layer[-1].mlp.experts.up_proj_bias[1],
                               dense.vmoe.encoder.layer[-1].mlp.fc1.bias)  # biases are not perturbed
    with pytest.raises(ValueError, match="noise_std"):
        init_experts_from_dense(VMoEForImageClassification(tiny_config()), dense, noise_std=-1.0)
