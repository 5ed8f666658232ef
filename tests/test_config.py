"""VMoEConfig: defaults, MoE layer specs, validation (every error is a ValueError naming the value), round trips."""

import json

import pytest
from huggingface_hub.errors import StrictDataclassFieldValidationError
import torch
from conftest import tiny_config
from transformers import AutoConfig

from hf_vmoe import VMoEConfig, VMoEForImageClassification, every_nth_layer, last_layers
from hf_vmoe.configuration_vmoe import resolve_moe_layers


def test_defaults_are_mobile_vmoe_tiny():
    config = VMoEConfig()
    assert config.model_type == "vmoe"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (192, 12, 3)
    assert config.routing_level == "image" and config.shared_router is True
    assert config.num_experts == 10 and config.num_experts_per_tok == 1
    assert config.moe_layers == (10, 11)
    assert config.moe_intermediate_size == config.intermediate_size == 768
    assert config.shared_expert_intermediate_size == 768
    assert config.capacity_factor is None and config.eval_capacity_factor is None
    assert config.stage_names[0] == "stem" and config.stage_names[-1] == "stage12"
    assert config.out_features == ["stage12"]


def test_token_routing_defaults_to_per_block_routers():
    assert tiny_config(routing_level="token").shared_router is False


@pytest.mark.parametrize(
    "spec, expected",
    [
        (None, (2, 3)),
        ("last:1", (3,)),
        ("last:4", (0, 1, 2, 3)),
        ("every:2", (1, 3)),
        ("all", (0, 1, 2, 3)),
        ("none", ()),
        ((), ()),
        ([3, 1], (1, 3)),
        ([-1], (3,)),
    ],
)
def test_moe_layer_specs(spec, expected):
    assert tiny_config(moe_layers=spec).moe_layers == expected


def test_layer_helpers():
    assert last_layers(12, 2) == (10, 11)
    assert every_nth_layer(12, 2) == (1, 3, 5, 7, 9, 11)
    assert every_nth_layer(12, 3, offset=0) == (0, 3, 6, 9)
    assert resolve_moe_layers("last:0", 12) == ()


# Each entry: the overrides, then a piece of text the error must contain (the field or the bad value). Wrong types
# are caught by @strict (StrictDataclassFieldValidationError, as for transformers' own configs), ranges and
# combinations by our checks (ValueError).
INVALID = [
    (dict(num_experts_per_tok=5), "num_experts_per_tok (k=5)"),
    (dict(num_experts=0), "num_experts must be a positive integer, got 0"),
    (dict(num_experts="4"), "Field 'num_experts' expected int, got str (value: '4')"),
    (dict(num_experts_per_tok=0), "num_experts_per_tok must be a positive integer"),
    (dict(moe_layers=(4,)), "block index 4"),
    (dict(moe_layers=(-5,)), "block index -5"),
    (dict(moe_layers=(1, 1)), "duplicate"),
    (dict(moe_layers="last:9"), "moe_layers='last:9'"),
    (dict(moe_layers="every:0"), "moe_layers='every:0'"),
    (dict(moe_layers="first:2"), "moe_layers='first:2'"),
    (dict(moe_layers=["a"]), "Field 'moe_layers' with value ['a']"),
    (dict(routing_level="patch"), "routing_level must be one of ('image', 'token'), got 'patch'"),
    (dict(router_input="max"), "router_input"),
    (dict(pooling="max"), "pooling"),
    (dict(train_routing="oracle"), "train_routing"),
    (dict(hidden_act="tanhh"), "hidden_act"),
    (dict(superclass_ids=[0, 1, 2]), "superclass_ids has 3 entries but num_labels is 5"),
    (dict(superclass_ids=[0, 1, 2, 3, 4]), "superclass_ids[4] = 4 is out of range"),
    (dict(superclass_ids=[0, 1, 2, 3, -1]), "superclass_ids[4] = -1"),
    (dict(superclass_ids=[0, 1, 2, 3, 0.5]), "Field 'superclass_ids' with value [0, 1, 2, 3, 0.5]"),
    (dict(superclass_ids=[0, 1, 2, 3, 0], routing_level="token"), "needs routing_level='image'"),
    (dict(train_routing="superclass"), "train_routing='superclass' needs superclass_ids"),
    (dict(train_routing="superclass", superclass_ids=[0, 1, 2, 3, 0], shared_router=False), "needs shared_router=True"),
    (dict(routing_level="token", shared_router=True), "shared_router=True is only supported with routing_level='image'"),
    (dict(capacity_factor=0), "capacity_factor must be None (dropless) or a number > 0, got 0"),
    (dict(eval_capacity_factor=-1.0), "eval_capacity_factor"),
    (dict(hidden_size=30, num_attention_heads=4), "hidden_size (30) must be divisible by num_attention_heads (4)"),
    (dict(image_size=30), "image_size (30, 30) must be divisible by patch_size (8, 8)"),
    (dict(patch_size=0), "patch_size must be a positive int"),
    (dict(image_size=(32, 32, 3)), "Field 'image_size' with value (32, 32, 3)"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer, got 0"),
    (dict(num_shared_experts=-1), "num_shared_experts must be an integer >= 0, got -1"),
    (dict(router_noise_std=-0.1), "router_noise_std must be a number >= 0"),
    (dict(router_aux_loss_coef=float("nan")), "router_aux_loss_coef"),
    (dict(superclass_loss_coef=-1), "superclass_loss_coef"),
    (dict(hidden_dropout_prob=1.0), "hidden_dropout_prob must be in [0, 1), got 1.0"),
    (dict(drop_path_rate=1.5), "drop_path_rate must be in [0, 1)"),
    (dict(layer_norm_eps=0), "layer_norm_eps must be a number > 0"),
    (dict(normalize_router_weights="yes"), "Field 'normalize_router_weights' expected bool, got str (value: 'yes')"),
    (dict(layerscale_value="1e-5"), "Field 'layerscale_value' with value '1e-5'"),
    (dict(router_type="switch", routing_level="token"), "router_type must be one of ('top_k', 'expert_choice', 'soft'), got 'switch'"),
    (dict(router_type="expert_choice"), "router_type='expert_choice' routes tokens: it needs routing_level='token'"),
    (dict(router_type="soft", routing_level="token", num_slots=0), "num_slots must be a positive integer or None, got 0"),
    (dict(router_group_size=17), "router_group_size=17 groups tokens: it needs routing_level='token'"),
    (dict(router_group_size=0, routing_level="token"), "router_group_size must be None or a positive integer, got 0"),
    (dict(capacity_multiple_of=0), "capacity_multiple_of must be None or a positive integer, got 0"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size must be a positive integer, got 0"),
    (dict(shared_expert_intermediate_size=-8), "shared_expert_intermediate_size"),
    (dict(out_indices=[9]), "out_indices"),
    # the options for exact parity with Google's V-MoE (docs/vmoe-parity-spec.md §10)
    (dict(representation_size=0), "representation_size must be None or a positive integer, got 0"),
    (dict(representation_size="512"), "Field 'representation_size' with value '512'"),
    (dict(router_group_remainder="drop", routing_level="token", router_group_size=17),
     "router_group_remainder must be one of ('error', 'partial', 'pad'), got 'drop'"),
    (dict(router_aux_loss_layer_reduction="max"),
     "router_aux_loss_layer_reduction must be one of ('mean', 'sum'), got 'max'"),
    (dict(router_load_loss_coef=-0.005), "router_load_loss_coef must be a number >= 0, got -0.005"),
    (dict(router_load_loss_coef=float("nan")), "router_load_loss_coef must be a number >= 0, got nan"),
    (dict(expert_dispatch_dtype="float16", routing_level="token"),
     "expert_dispatch_dtype must be None or one of ('bfloat16',), got 'float16'"),
    (dict(expert_dispatch_dtype="bfloat16"),
     "expert_dispatch_dtype='bfloat16' rounds the dispatched tokens: it needs routing_level='token', got 'image'"),
    (dict(use_cls_token=False), "use_cls_token=False leaves no class token to pool: it needs pooling='mean', got 'cls'"),
    (dict(use_cls_token=False, pooling="cls_mean"), "got 'cls_mean'"),
    (dict(use_cls_token=False, pooling="mean", router_input="cls"), "router_input='cls' needs use_cls_token=True"),
    (dict(use_cls_token="no"), "Field 'use_cls_token' expected bool, got str (value: 'no')"),
    (dict(out_features=["stage9"]), "out_features"),
]


@pytest.mark.parametrize("overrides, message", INVALID, ids=[str(o) for o, _ in INVALID])
def test_invalid_config_raises_value_error_naming_it(overrides, message):
    with pytest.raises((ValueError, StrictDataclassFieldValidationError)) as err:
        tiny_config(**overrides)
    assert message in str(err.value)


def test_fields_changed_after_construction_are_checked_when_a_model_is_built():
    config = tiny_config()
    config.num_experts_per_tok = 7
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(k=7\)"):
        VMoEForImageClassification(config)
    config = tiny_config()
    config.moe_layers = (0, 9)
    with pytest.raises(ValueError, match="block index 9"):
        VMoEForImageClassification(config)


def test_grouped_mm_width_check():
    odd = dict(hidden_size=36, num_attention_heads=2, intermediate_size=68)
    # asked for explicitly: a ValueError naming the widths
    with pytest.raises(ValueError, match=r"multiples of 8, got \{'hidden_size': 36, 'moe_intermediate_size': 68\}"):
        tiny_config(**odd).check_vmoe(experts_implementation="grouped_mm")
    # by default: the model silently uses vmoe_cpu (eager, with its CPU inference fast paths)
    model = VMoEForImageClassification(tiny_config(routing_level="token", **odd))
    assert model.config._experts_implementation == "vmoe_cpu"
    with pytest.raises(ValueError, match="experts_implementation='grouped_mm' needs expert widths"):
        model.set_experts_implementation("grouped_mm")
    model.set_experts_implementation("batched_mm")
    assert model.config._experts_implementation == "batched_mm"
    # a dense model has no experts: any width is fine
    tiny_config(moe_layers=(), **odd).check_vmoe(experts_implementation="grouped_mm")
    # default backend: on CPU-only machines vmoe_cpu (eager with its inference fast paths, the fastest there,
    # docs/performance.md) for every routing level; grouped_mm when a GPU is present
    expected = "grouped_mm" if torch.cuda.is_available() else "vmoe_cpu"
    assert VMoEForImageClassification(tiny_config(routing_level="token")).config._experts_implementation == expected
    assert VMoEForImageClassification(tiny_config()).config._experts_implementation == expected


def _roundtrip_configs():
    return [
        tiny_config(),
        tiny_config(routing_level="token", num_experts_per_tok=2, num_shared_experts=2,
                    shared_expert_intermediate_size=16, capacity_factor=1.25, eval_capacity_factor=2.0),
        tiny_config(superclass_ids=[0, 1, 2, 3, 0], train_routing="superclass", out_indices=[2, 4],
                    layerscale_value=1e-5, pooling="cls_mean", image_size=(32, 48), moe_layers="every:2"),
        tiny_config(routing_level="token", num_experts_per_tok=2, router_group_size=34, router_group_remainder="pad",
                    capacity_multiple_of=4, representation_size=12, use_cls_token=False, pooling="mean",
                    router_aux_loss_layer_reduction="sum", router_load_loss_coef=0.005, router_noise_std=0.125,
                    expert_dispatch_dtype="bfloat16"),
    ]


def test_parity_options_default_to_todays_behaviour():
    config = tiny_config()
    assert (config.use_cls_token, config.representation_size, config.router_group_remainder,
            config.router_aux_loss_layer_reduction, config.router_load_loss_coef,
            config.expert_dispatch_dtype) == (True, None, "error", "mean", 0.0, None)


@pytest.mark.parametrize("index", range(4))
def test_dict_and_json_roundtrip(index, tmp_path):
    config = _roundtrip_configs()[index]
    as_dict = config.to_dict()
    assert VMoEConfig.from_dict(as_dict).to_dict() == as_dict
    again = VMoEConfig(**json.loads(config.to_json_string()))
    assert again.to_dict() == as_dict
    assert again.moe_layers == config.moe_layers and isinstance(again.moe_layers, tuple)
    assert again.out_features == config.out_features and again.out_indices == config.out_indices
    config.to_json_file(tmp_path / "c.json")
    assert VMoEConfig.from_json_file(tmp_path / "c.json").to_dict() == as_dict
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is VMoEConfig
    skip = ("_name_or_path", "auto_map")
    assert {k: v for k, v in loaded.to_dict().items() if k not in skip} == {
        k: v for k, v in as_dict.items() if k not in skip
    }


def test_old_field_name_expert_intermediate_size_gives_the_same_config(tmp_path):
    """`expert_intermediate_size` (the routed expert width's earlier name) loads: as a keyword, through from_dict and
    from an old config.json; it also reads and sets `moe_intermediate_size`, type-checked like the field."""
    new = tiny_config(routing_level="token", moe_intermediate_size=48, num_shared_experts=1)
    expected = new.to_dict()
    assert new.expert_intermediate_size == 48 and new.shared_expert_intermediate_size == 48  # derived from it
    assert tiny_config(routing_level="token", expert_intermediate_size=48, num_shared_experts=1).to_dict() == expected
    old_dict = {("expert_intermediate_size" if k == "moe_intermediate_size" else k): v for k, v in expected.items()}
    assert "moe_intermediate_size" not in old_dict
    assert VMoEConfig.from_dict(old_dict).to_dict() == expected
    assert VMoEConfig(**old_dict).to_dict() == expected
    assert VMoEConfig(**expected).to_dict() == expected
    # an old config.json, loaded by the class and by AutoConfig
    tiny_config().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.update(old_dict)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    skip = ("_name_or_path", "auto_map", "transformers_version")
    for load in (VMoEConfig.from_pretrained, AutoConfig.from_pretrained):
        loaded = load(tmp_path)
        assert loaded.moe_intermediate_size == 48 and loaded.shared_expert_intermediate_size == 48
        assert {k: v for k, v in loaded.to_dict().items() if k not in skip} == {
            k: v for k, v in expected.items() if k not in skip
        }
    model = VMoEForImageClassification(loaded)  # the model reads the width under either name
    assert model.vmoe.encoder.layer[-1].mlp.experts.up_proj.shape[1] == 48
    # the old name reads and writes the field, with the field's type check
    new.expert_intermediate_size = 24
    assert new.moe_intermediate_size == 24 and new.to_dict()["moe_intermediate_size"] == 24
    with pytest.raises(StrictDataclassFieldValidationError):
        new.expert_intermediate_size = "wide"
    # `{**config.to_dict(), old_name: value}` overrides, as the old name did
    assert VMoEConfig(**{**expected, "expert_intermediate_size": 32}).moe_intermediate_size == 32


def test_saved_config_writes_moe_intermediate_size_only(tmp_path):
    config = tiny_config(expert_intermediate_size=48)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["moe_intermediate_size"] == 48 and "expert_intermediate_size" not in saved
    assert "expert_intermediate_size" not in json.loads(config.to_json_string())
    assert "expert_intermediate_size" not in config.to_diff_dict()
    assert VMoEConfig.from_pretrained(tmp_path).moe_intermediate_size == 48


def test_invalid_json_config_fails_on_load(tmp_path):
    config = tiny_config()
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["num_experts_per_tok"] = 9
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(k=9\)"):
        AutoConfig.from_pretrained(tmp_path)


def test_keys_to_ignore_at_inference_cover_extra_outputs():
    keys = VMoEConfig.keys_to_ignore_at_inference
    for name in ("aux_loss", "router_logits", "hidden_states", "attentions", "expert_counts", "superclass_loss",
                 "superclass_accuracy"):
        assert name in keys
