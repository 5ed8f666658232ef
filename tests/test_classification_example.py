"""examples/run_image_classification.py end to end: dense baseline -> super-classes -> Mobile V-MoE."""

import json

import numpy as np
import pytest
from conftest import load_example
from PIL import Image

from hf_vmoe import VMoEForImageClassification
from hf_vmoe.cli import main as cli_main
from hf_vmoe.recipes.superclasses import load_superclass_map

CLASSES = ["blue", "green", "grey", "red"]  # imagefolder sorts class folders


def load_script():
    return load_example("run_image_classification")


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "grey": (120, 120, 120)}
    for split, count in (("train", 6), ("validation", 3)):
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels)
                if name == "grey" and i == 0:
                    image = image.convert("L")  # a grayscale file: the script must convert it to RGB
                image.save(folder / f"{i}.png")
    return root


def common_args(root, out):
    return ["--train_dir", str(root / "train"), "--validation_dir", str(root / "validation"), "--output_dir", str(out),
            "--image_size", "32", "--patch_size", "8", "--do_train", "--do_eval", "--max_steps", "3",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--learning_rate", "1e-3",
            "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm",
            "true", "--seed", "0"]


def test_three_stage_recipe(imagefolder, tmp_path):
    script = load_script()
    dense_dir, moe_dir = tmp_path / "dense", tmp_path / "moe"
    # 1. dense baseline (+ super-classes from its confusion matrix on held-out training images)
    script.main(["--preset", "vit-3x64", "--compute_superclasses", "2"] + common_args(imagefolder, dense_dir))
    results = json.loads((dense_dir / "all_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and "train_loss" in results
    dense = VMoEForImageClassification.from_pretrained(dense_dir)
    assert not dense.config.is_moe and [dense.config.id2label[i] for i in range(4)] == CLASSES
    superclasses = json.loads((dense_dir / "superclasses.json").read_text())
    assert sorted(len(g["classes"]) for g in superclasses["groups"]) == [2, 2]
    # 10% of each class's 6 training images, at least one: 4 held-out images, not the 12 validation ones
    assert np.asarray(superclasses["confusion_matrix"]).sum() == 4

    # 2. the same through the CLI, on the held-out split
    cli_file = tmp_path / "superclasses.csv"
    assert cli_main(["superclasses", "from-model", "--model", str(dense_dir), "--validation-dir",
                     str(imagefolder / "validation"), "--num-experts", "2", "-o", str(cli_file)]) == 0
    cli_ids = load_superclass_map(cli_file, class_names=CLASSES)
    assert sorted(np.bincount(cli_ids).tolist()) == [2, 2]  # (same images -> same map: test_user_frictions.py)

    # 3. Mobile V-MoE with super-class routing, initialised from the dense baseline
    trainer = script.main(
        ["--preset", "mobile-vmoe-3x64", "--config_overrides", "num_experts=2,normalize_router_weights=true",
         "--superclasses_file", str(dense_dir / "superclasses.json"), "--init_from_dense", str(dense_dir)]
        + common_args(imagefolder, moe_dir)
    )
    moe = VMoEForImageClassification.from_pretrained(moe_dir)
    assert moe.config.is_moe and moe.config.num_experts == 2
    assert moe.config.superclass_ids == superclasses["superclass_ids"]
    assert moe.config.train_routing == "router"  # the script's default: the super-class loss guides the router
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert "router_superclass_accuracy" in logs[0] and "expert_load_max" in logs[0]
    eval_log = [h for h in trainer.state.log_history if "eval_accuracy" in h][-1]
    assert "eval_router_superclass_accuracy" in eval_log
    assert (moe_dir / "preprocessor_config.json").exists() and (moe_dir / "README.md").exists()


def test_bad_arguments(imagefolder, tmp_path):
    script = load_script()
    with pytest.raises(ValueError, match="exactly one"):
        script.main(common_args(imagefolder, tmp_path))
    with pytest.raises(ValueError, match="not key=value"):
        script.parse_overrides("num_experts")
    assert script.parse_overrides("num_experts=4,moe_layers=last:2,drop_path_rate=0.1,qkv_bias=false") == {
        "num_experts": 4, "moe_layers": "last:2", "drop_path_rate": 0.1, "qkv_bias": False}


@pytest.mark.slow
def test_tiny_imagenet_subset_few_steps(real_data, tmp_path):
    root = real_data / "tiny-imagenet-200-subset"
    if not root.is_dir():
        pytest.skip("tiny-imagenet-200-subset not present")
    script = load_script()
    args = ["--train_dir", str(root / "train"), "--validation_dir", str(root / "validation"),
            "--output_dir", str(tmp_path), "--preset", "mobile-vmoe-3x64", "--image_size", "64", "--patch_size", "8",
            "--config_overrides", "num_experts=4", "--do_train", "--do_eval", "--max_steps", "2",
            "--max_train_samples", "64", "--max_eval_samples", "64", "--per_device_train_batch_size", "16",
            "--per_device_eval_batch_size", "32", "--report_to", "none", "--use_cpu", "--save_strategy", "no",
            "--disable_tqdm", "true"]
    script.main(args)
    results = json.loads((tmp_path / "all_results.json").read_text())
    model = VMoEForImageClassification.from_pretrained(tmp_path)
    assert model.config.num_labels == 200 and 0.0 <= results["eval_accuracy"] <= 1.0
