"""hf_vmoe.integrations.data: the helpers shared by the example scripts."""

import evaluate
import pytest
from conftest import load_example

from hf_vmoe import VMoEConfig
from hf_vmoe.integrations.data import metric_path, parse_config_overrides, parse_moe_layers_arg


def test_config_overrides_types():
    assert parse_config_overrides("num_experts=4,moe_layers=last:2,drop_path_rate=0.1,qkv_bias=false") == {
        "num_experts": 4, "moe_layers": "last:2", "drop_path_rate": 0.1, "qkv_bias": False}
    assert parse_config_overrides("capacity_factor=None,layerscale_value=null,normalize_router_weights=True") == {
        "capacity_factor": None, "layerscale_value": None, "normalize_router_weights": True}
    assert parse_config_overrides("layerscale_value=1e-5, router_input = cls") == {
        "layerscale_value": 1e-5, "router_input": "cls"}
    assert parse_config_overrides(None) == {} and parse_config_overrides("") == {}
    with pytest.raises(ValueError, match="'num_experts' is not key=value"):
        parse_config_overrides("num_experts")
    with pytest.raises(ValueError, match="'=4' is not key=value"):
        parse_config_overrides("=4")


def test_moe_layers_none_means_a_dense_model():
    # moe_layers=None would mean the default (the last two blocks): "none" must stay the string
    overrides = parse_config_overrides("moe_layers=none")
    assert overrides == {"moe_layers": "none"}
    assert VMoEConfig(**overrides).moe_layers == ()
    # both Trainer scripts read --config_overrides the same way
    assert load_example("run_image_classification").parse_overrides("moe_layers=none") == {"moe_layers": "none"}


def test_moe_layers_arg():
    assert parse_moe_layers_arg("9,11") == (9, 11)
    assert parse_moe_layers_arg("-1") == (-1,)
    assert parse_moe_layers_arg("last:2") == "last:2" and parse_moe_layers_arg("none") == "none"
    with pytest.raises(ValueError, match="'9,x'"):
        parse_moe_layers_arg("9,x")


def test_metric_path_loads_offline():
    metric = evaluate.load(metric_path("accuracy"))
    assert metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="'f1'"):
        metric_path("f1")


def test_size_dict():
    from hf_vmoe.integrations.data import size_dict

    assert size_dict(224) == {"height": 224, "width": 224}
    assert size_dict([64, 48]) == {"height": 64, "width": 48}
