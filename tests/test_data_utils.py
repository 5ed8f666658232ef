"""hf_vmoe.integrations.data: the helpers shared by the example scripts."""

import evaluate
import pytest
import torch
from conftest import load_example
from datasets import Dataset

from hf_vmoe import VMoEConfig
from hf_vmoe.integrations.callbacks import AugmentationEpochCallback
from hf_vmoe.integrations.data import AugmentedDataset, metric_path, parse_config_overrides, parse_moe_layers_arg


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


def jitter(batch, rngs):  # each row: its value plus one draw of its generator (module level: spawned workers)
    return {"x": [torch.tensor(x + rng.random()) for x, rng in zip(batch["x"], rngs)], "y": batch["y"]}


def test_augmentations_depend_on_seed_epoch_and_image_only():
    data = AugmentedDataset(Dataset.from_dict({"x": [0.0, 10.0, 20.0, 30.0], "y": [0, 1, 2, 3]}), jitter, seed=7)
    first = data.__getitems__([0, 1, 2, 3])
    assert [row["y"] for row in first] == [0, 1, 2, 3] and len(data) == 4
    # an image's draw does not depend on the batch it comes in, nor on its place there (workers, a resumed epoch)
    assert data.__getitems__([3, 1])[0]["x"] == first[3]["x"] and data[1]["x"] == first[1]["x"]
    assert len({float(row["x"]) % 10 for row in first}) == 4  # each image its own draw
    data.set_epoch(1)
    assert all(data[i]["x"] != first[i]["x"] for i in range(4))  # a new draw each epoch
    data.set_epoch(0)
    assert data[2]["x"] == first[2]["x"]
    assert AugmentedDataset(data.dataset, jitter, seed=8)[2]["x"] != first[2]["x"]

    AugmentationEpochCallback(data).on_epoch_begin(None, type("State", (), {"epoch": 4.5})(), None)  # resumed
    assert data.epoch == 4

    # a persistent worker, started in epoch 0, draws epoch 1's augmentations in epoch 1
    # spawned, not forked: a fork beside JAX's threads (the parity tests) can deadlock
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=1, persistent_workers=True, collate_fn=list,
                                         multiprocessing_context="spawn")
    expected = []
    for epoch in (0, 1):
        data.set_epoch(epoch)
        expected.append([data[i]["x"] for i in range(4)])
        assert [row["x"] for batch in loader for row in batch] == expected[-1]
    assert expected[0] == [row["x"] for row in first] and expected[1] != expected[0]
    with pytest.raises(ValueError, match="zip"):  # a transform that loses rows is an error, not a shorter batch
        AugmentedDataset(data.dataset, lambda batch, rngs: {"x": batch["x"][:1], "y": batch["y"]}, seed=0).__getitems__([0, 1])
