"""examples/run_semantic_segmentation.py end to end on a generated ADE20K-format folder (real JPEG / PNG files with
the ADE20K value convention: 0 = other, 1..150 = classes), plus the helpers it uses."""

import json
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch
from conftest import load_example
from PIL import Image
from transformers import ViTConfig, ViTModel

from hf_vmoe.integrations.data import (
    SegmentationTransform,
    ade20k_id2label,
    find_ade_pairs,
    mean_iou_metric_path,
    read_id2label,
    reduce_ade_labels,
)

TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,patch_size=8,num_experts=4"


def _load_script():
    return load_example("run_semantic_segmentation")


def make_ade_folder(root: Path, n_train=6, n_val=3, classes=(0, 1, 3, 13, 150)) -> Path:
    """ADEChallengeData2016 layout with images of a few coloured regions and matching label PNGs."""
    rng = np.random.default_rng(0)
    root = root / "ADEChallengeData2016"
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            h, w = int(rng.integers(36, 56)), int(rng.integers(36, 56))
            label = np.zeros((h, w), np.uint8)
            for value in classes:
                y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
                label[y : y + int(rng.integers(8, h // 2 + 8)), x : x + int(rng.integers(8, w // 2 + 8))] = value
            colours = {v: rng.integers(0, 255, 3) for v in classes}
            image = np.stack([colours[v] for v in label.reshape(-1)]).reshape(h, w, 3).astype(np.uint8)
            name = f"ADE_{split[:3]}_{i:08d}"
            Image.fromarray(image).save(root / "images" / split / f"{name}.jpg")
            Image.fromarray(label).save(root / "annotations" / split / f"{name}.png")
    return root


def _common_args(data: Path, out: Path, steps=3):
    return [
        "--train_dir", str(data), "--validation_dir", str(data), "--reduce_labels",
        "--output_dir", str(out), "--do_train", "--do_eval", "--max_steps", str(steps),
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--crop_size", "32",
        "--learning_rate", "1e-3", "--use_cpu", "--report_to", "none", "--save_strategy", "no",
        "--dataloader_num_workers", "0", "--seed", "0",
    ]


def _check_results(out: Path, num_labels: int):
    results = json.loads((out / "eval_results.json").read_text())
    for key in ("eval_mean_iou", "eval_mean_accuracy", "eval_overall_accuracy", "eval_loss"):
        assert key in results, key
    assert 0.0 <= results["eval_overall_accuracy"] <= 1.0
    assert sum(k.startswith("eval_iou_") for k in results) == num_labels
    assert (out / "model.safetensors").exists()
    return results


def test_example_linear_head_from_scratch(tmp_path):
    data = make_ade_folder(tmp_path)
    out = tmp_path / "out"
    script = _load_script()
    args = _common_args(data, out) + [
        "--config_overrides", TINY + ",num_shared_experts=1,num_experts_per_tok=2", "--moe_layers", "1",
        "--routing_level", "token",
    ]
    trainer = script.main(args)
    _check_results(out, 150)
    config = json.loads((out / "config.json").read_text())
    assert config["routing_level"] == "token" and config["num_shared_experts"] == 1 and config["moe_layers"] == [1]
    assert config["id2label"]["0"] == "wall" and len(config["id2label"]) == 150
    assert trainer.state.global_step == 3
    # the training loss includes the aux loss and is finite
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(np.isfinite(losses))


def test_example_upernet_upcycled(tmp_path):
    data = make_ade_folder(tmp_path)
    dense_dir = tmp_path / "dense"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(dense_dir)
    (data / "classes.txt").write_text("0 other\n1 wall\n2 building\n3 sky\n")  # picked up as id2label
    out = tmp_path / "out"
    script = _load_script()
    args = _common_args(data, out) + [
        "--upcycle_from", str(dense_dir), "--head", "upernet", "--upernet_hidden_size", "16",
        "--routing_level", "token", "--num_experts", "4", "--num_experts_per_tok", "1",
        "--num_shared_experts", "1", "--moe_layers", "last:2",
    ]
    # labels above 3 would be out of range: keep 1..3 only
    for png in (data / "annotations").rglob("*.png"):
        arr = np.array(Image.open(png))
        Image.fromarray(np.where(arr > 3, 0, arr).astype(np.uint8)).save(png)
    trainer = script.main(args)
    _check_results(out, 3)
    from hf_vmoe.integrations.upernet import VMoEUperNetForSemanticSegmentation

    assert isinstance(trainer.model, VMoEUperNetForSemanticSegmentation)
    reloaded = VMoEUperNetForSemanticSegmentation.from_pretrained(out)
    assert reloaded.config.backbone_config.model_type == "vmoe"
    assert reloaded.config.id2label == {0: "wall", 1: "building", 2: "sky"}


def test_helpers(tmp_path):
    labels = ade20k_id2label()
    assert len(labels) == 150 and labels[0] == "wall" and labels[149] == "flag"
    np.testing.assert_array_equal(reduce_ade_labels(np.array([0, 1, 150])), [255, 0, 149])
    np.testing.assert_array_equal(reduce_ade_labels(np.array([255, 254])), [255, 253])  # ignored stays ignored
    (tmp_path / "classes.txt").write_text("0 void\n1 sky\n2 road\n")
    assert read_id2label(tmp_path / "classes.txt") == {0: "sky", 1: "road"}
    assert read_id2label(tmp_path / "classes.txt", reduce_labels=False) == {0: "void", 1: "sky", 2: "road"}
    data = make_ade_folder(tmp_path, n_train=2, n_val=1)
    assert len(find_ade_pairs(data, "training")) == 2
    with pytest.raises(ValueError, match="ADE20K-layout"):
        find_ade_pairs(tmp_path / "nowhere", "training")
    image_path, label_path = find_ade_pairs(data, "validation")[0]
    image, label = Image.open(image_path), Image.open(label_path)
    train_tf = SegmentationTransform(size=24, train=True, reduce_labels=True, scale_range=(0.5, 0.5))
    pixels, target = train_tf(image, label, np.random.default_rng(0))
    assert pixels.shape == (3, 24, 24) and target.shape == (24, 24) and target.dtype == torch.int64
    values = set(target.unique().tolist())
    assert values <= {255, 0, 2, 12, 149}  # reduced ADE values + padding/other as 255
    assert 255 in values  # scale 0.5 pads the crop
    eval_tf = SegmentationTransform(size=(20, 28), train=False, reduce_labels=False)
    pixels, target = eval_tf(image, label)
    assert pixels.shape == (3, 20, 28) and set(target.unique().tolist()) <= {0, 1, 3, 13, 150}
    with pytest.raises(ValueError, match="scale_range"):
        SegmentationTransform(scale_range=(2.0, 1.0))


def test_mean_iou_metric_offline():
    metric = evaluate.load(mean_iou_metric_path())
    pred = [np.array([[0, 1], [1, 1]]), np.array([[2, 2, 0], [0, 0, 255]])]
    ref = [np.array([[0, 1], [0, 255]]), np.array([[2, 2, 0], [0, 1, 255]])]
    result = metric.compute(predictions=pred, references=ref, num_labels=3, ignore_index=255)
    # class 0: intersection 3, union 5; class 1: 1 / 3; class 2: 2 / 2
    np.testing.assert_allclose(result["per_category_iou"], [0.6, 1 / 3, 1.0])
    assert result["mean_iou"] == pytest.approx((0.6 + 1 / 3 + 1) / 3)
    assert result["overall_accuracy"] == pytest.approx(6 / 8)
    np.testing.assert_allclose(result["per_category_accuracy"], [0.75, 0.5, 1.0])
    reduced = metric.compute(predictions=[np.array([[0, 1]])], references=[np.array([[1, 0]])], num_labels=2,
                             ignore_index=255, reduce_labels=True)
    assert reduced["overall_accuracy"] == 1.0  # reference 1 -> 0, reference 0 -> ignored
    with pytest.raises(ValueError, match="outside"):
        metric.compute(predictions=[np.array([[5]])], references=[np.array([[0]])], num_labels=2, ignore_index=255)


@pytest.mark.slow
def test_example_on_real_ade20k_and_camvid(real_data, tmp_path):
    ade = real_data / "ade20k-sample" / "ADEChallengeData2016"
    camvid = real_data / "camvid-ade"
    if not ade.is_dir() or not camvid.is_dir():
        pytest.skip("ADE20K sample or CamVid missing")
    script = _load_script()
    common = ["--do_eval", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
              "--crop_size", "64", "--use_cpu", "--report_to", "none", "--save_strategy", "no",
              "--config_overrides", TINY + ",num_shared_experts=1", "--moe_layers", "last:1"]
    # ADE20K: only a validation split in the sample; train and evaluate on it
    out = tmp_path / "ade"
    script.main(common + ["--train_dir", str(ade), "--train_split", "validation", "--validation_dir", str(ade),
                          "--reduce_labels", "--do_train", "--max_steps", "2", "--output_dir", str(out)])
    results = _check_results(out, 150)
    assert results["eval_samples"] if "eval_samples" in results else True
    out = tmp_path / "camvid"
    script.main(common + ["--train_dir", str(camvid), "--validation_dir", str(camvid), "--reduce_labels",
                          "--do_train", "--max_steps", "2", "--max_train_samples", "8", "--max_eval_samples", "4",
                          "--output_dir", str(out)])
    _check_results(out, 11)
    assert json.loads((out / "config.json").read_text())["id2label"]["0"] == "sky"
