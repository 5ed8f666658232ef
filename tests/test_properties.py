"""Property tests (hypothesis) over random tiny configs: every valid one builds, runs forward and backward for both
heads and round-trips save/load with identical outputs; every invalid one raises a ValueError."""

import tempfile

import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_vmoe import VMoEConfig, VMoEForImageClassification, VMoEForSemanticSegmentation

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@st.composite
def valid_configs(draw):
    layers = draw(st.integers(1, 3))
    heads = draw(st.sampled_from([1, 2]))
    hidden = heads * draw(st.sampled_from([4, 8]))
    patch = draw(st.sampled_from([4, 8]))
    grid = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    num_labels = draw(st.integers(2, 4))
    num_experts = draw(st.integers(1, 4))
    level = draw(st.sampled_from(["image", "token"]))
    moe_layers = draw(st.lists(st.integers(0, layers - 1), unique=True, max_size=layers))
    shared_router = draw(st.booleans()) if level == "image" else False
    kwargs = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=draw(st.sampled_from([8, 12, 16])),
        image_size=(patch * grid[0], patch * grid[1]),
        patch_size=patch,
        num_labels=num_labels,
        routing_level=level,
        num_experts=num_experts,
        num_experts_per_tok=draw(st.integers(1, num_experts)),
        moe_layers=moe_layers,
        moe_intermediate_size=draw(st.sampled_from([None, 4, 8, 12])),
        num_shared_experts=draw(st.integers(0, 2)),
        shared_expert_intermediate_size=draw(st.sampled_from([None, 4, 6])),
        shared_router=shared_router,
        router_input=draw(st.sampled_from(["cls", "mean"])),
        normalize_router_weights=draw(st.booleans()),
        capacity_factor=draw(st.sampled_from([None, 0.25, 1.0, 2.0])),
        eval_capacity_factor=draw(st.sampled_from([None, 0.5, 4.0])),
        batch_priority_routing=draw(st.booleans()),
        router_noise_std=draw(st.sampled_from([0.0, 0.5])),
        router_importance_loss_coef=draw(st.sampled_from([0.0, 0.01])),
        pooling=draw(st.sampled_from(["cls", "mean", "cls_mean"])),
        layerscale_value=draw(st.sampled_from([None, 0.1])),
        drop_path_rate=draw(st.sampled_from([0.0, 0.1])),
        hidden_act=draw(st.sampled_from(["gelu", "relu", "silu"])),
    )
    if level == "image" and draw(st.booleans()):
        kwargs["superclass_ids"] = draw(st.lists(st.integers(0, num_experts - 1), min_size=num_labels,
                                                 max_size=num_labels))
        if shared_router and draw(st.booleans()):
            kwargs["train_routing"] = "superclass"
    return kwargs


@settings(max_examples=12, **SETTINGS)
@given(kwargs=valid_configs(), batch=st.integers(1, 3))
def test_valid_configs_build_train_and_round_trip(kwargs, batch):
    config = VMoEConfig(**kwargs)
    height, width = config.image_size
    x = torch.randn(batch, 3, height, width)
    for cls in (VMoEForImageClassification, VMoEForSemanticSegmentation):
        model = cls(VMoEConfig(**kwargs)).train()
        if cls is VMoEForImageClassification:
            labels = torch.randint(0, config.num_labels, (batch,))
        else:
            labels = torch.randint(0, config.num_labels, (batch, height, width))
            if batch * (height // config.patch_size) * (width // config.patch_size) == 1:
                model.decode_head.norm.eval()  # BatchNorm cannot train on a single value per channel
        out = model(x, labels=labels)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        if config.is_moe:
            assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
        model.eval()
        with torch.no_grad():
            expected = model(x).logits
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            loaded = cls.from_pretrained(folder).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x).logits, expected)


def _mutations(base):
    layers, experts, labels = base["num_hidden_layers"], base["num_experts"], base["num_labels"]
    return [
        dict(num_experts_per_tok=experts + 1),
        dict(num_experts=0),
        dict(num_experts=-3),
        dict(num_experts=2.5),
        dict(moe_layers=[layers]),
        dict(moe_layers=[-layers - 1]),
        dict(moe_layers=[0, 0]),
        dict(moe_layers="last:99"),
        dict(moe_layers="sometimes"),
        dict(routing_level="pixel"),
        dict(routing_level=None),
        dict(router_input="max"),
        dict(pooling="attention"),
        dict(train_routing="random"),
        dict(superclass_ids=[0] * (labels + 1)),
        dict(superclass_ids=[experts] * labels),
        dict(superclass_ids=[0] * labels, routing_level="token"),
        dict(train_routing="superclass"),
        dict(routing_level="token", shared_router=True),
        dict(capacity_factor=0.0),
        dict(capacity_factor=-1),
        dict(eval_capacity_factor="big"),
        dict(num_shared_experts=-1),
        dict(hidden_size=base["hidden_size"] + 1, num_attention_heads=2),
        dict(image_size=base["patch_size"] * 2 + 1),
        dict(patch_size=0),
        dict(num_hidden_layers=0),
        dict(intermediate_size=0),
        dict(moe_intermediate_size=-4),
        dict(router_aux_loss_coef=-0.1),
        dict(router_z_loss_coef=float("nan")),
        dict(router_noise_std=-1.0),
        dict(hidden_dropout_prob=1.5),
        dict(drop_path_rate=-0.1),
        dict(layer_norm_eps=0.0),
        dict(hidden_act="swish2"),
        dict(normalize_router_weights=None),
        dict(out_indices=[layers + 5]),
    ]


@settings(max_examples=60, **SETTINGS)
@given(kwargs=valid_configs(), data=st.data())
def test_invalid_configs_raise_value_error(kwargs, data):
    kwargs.pop("train_routing", None)
    kwargs.pop("superclass_ids", None)
    mutation = data.draw(st.sampled_from(_mutations(kwargs)))
    bad = {**kwargs, **mutation}
    try:
        VMoEConfig(**bad)
    except (ValueError, StrictDataclassFieldValidationError) as err:  # ranges and combinations; types (@strict)
        message = str(err)
        # the message names a field involved in the mutation
        assert any(name in message for name in mutation), (mutation, message)
    else:
        raise AssertionError(f"no error for {mutation}")
