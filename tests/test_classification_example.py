"""examples/run_image_classification.py end to end: dense baseline -> super-classes -> Mobile V-MoE."""

import hashlib
import json

import numpy as np
import pytest
import torch
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


def train_images(trainer):
    """A digest of each training image of a run, in order (its transform removed)."""
    return [hashlib.sha1(np.asarray(image).tobytes()).hexdigest()[:12]
            for image in trainer.train_dataset.dataset.with_format(None)["image"]]


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
    dense_trainer = script.main(["--preset", "vit-3x64", "--compute_superclasses", "2",
                                 "--superclass_confusion", "hard"]  # argmax counts: the report's top-1 is its trace
                                + common_args(imagefolder, dense_dir))
    results = json.loads((dense_dir / "all_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and "train_loss" in results
    assert results["train_samples"] == 20 and results["total_epochs"] == results["epoch"]
    dense = VMoEForImageClassification.from_pretrained(dense_dir)
    assert not dense.config.is_moe and [dense.config.id2label[i] for i in range(4)] == CLASSES
    superclasses = json.loads((dense_dir / "superclasses.json").read_text())
    assert sorted(len(g["classes"]) for g in superclasses["groups"]) == [2, 2]
    # 10% of each class's 6 training images, at least one: 4 held-out images, not the 12 validation ones
    assert np.asarray(superclasses["confusion_matrix"]).sum() == 4
    assert superclasses["heldout"] == {"share": 0.1, "seed": 0, "num_images": 4, "num_train": 20}
    # the dense model's held-out top-1 and the classes it predicts, in the map and in all_results.json
    report = superclasses["confusion_report"]
    cm = np.asarray(superclasses["confusion_matrix"])
    assert report["num_images"] == 4 and report["top1"] == np.trace(cm) / 4 == results["superclass_heldout_top1"]
    assert report["classes_predicted"] == (cm.sum(axis=0) > 0).sum() == results["superclass_classes_predicted"]
    card = (dense_dir / "README.md").read_text()
    assert "A dense Vision Transformer" in card and "experts per MoE block" not in card

    # 2. the same through the CLI, on the held-out split
    cli_file = tmp_path / "superclasses.csv"
    assert cli_main(["superclasses", "from-model", "--model", str(dense_dir), "--validation-dir",
                     str(imagefolder / "validation"), "--num-experts", "2", "-o", str(cli_file)]) == 0
    cli_ids = load_superclass_map(cli_file, class_names=CLASSES)
    assert sorted(np.bincount(cli_ids).tolist()) == [2, 2]  # (same images -> same map: test_recipe_usability.py)
    cli_json = tmp_path / "superclasses_cli.json"
    assert cli_main(["superclasses", "from-model", "--model", str(dense_dir), "--validation-dir",
                     str(imagefolder / "validation"), "--num-experts", "2", "-o", str(cli_json)]) == 0
    cli_map = json.loads(cli_json.read_text())
    assert cli_map["confusion_report"]["num_images"] == 12  # the 12 validation images
    assert cli_map["heldout"] == superclasses["heldout"]  # what the dense model was not trained on

    # 3. Mobile V-MoE with super-class routing, initialised from the dense baseline
    trainer = script.main(
        ["--preset", "mobile-vmoe-3x64", "--config_overrides", "num_experts=2,normalize_router_weights=true",
         "--superclasses_file", str(dense_dir / "superclasses.json"), "--init_from_dense", str(dense_dir),
         "--drop_upcycling_ratio", "0.5"]
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
    # the same training images as the dense run, and the epochs counted with the dense phase
    assert train_images(trainer) == train_images(dense_trainer) and len(train_images(trainer)) == 20
    moe_results = json.loads((moe_dir / "all_results.json").read_text())
    assert moe_results["train_samples"] == results["train_samples"] == 20
    assert moe_results["dense_epochs"] == results["epoch"]
    assert moe_results["total_epochs"] == results["epoch"] + moe_results["epoch"]
    card = (moe_dir / "README.md").read_text()
    total = f"{moe_results['total_epochs']:g}"
    assert f"| total epochs (dense phase included) | {total} |" in card
    assert f"The dense model had trained {results['epoch']:g} epochs: {total} epochs in all" in card
    assert "every expert a copy of its MLP with a different 50% of its hidden units re-initialised" in card


def test_vimoe_preset_split_from_the_dense_run_holds_the_dense_weights(imagefolder, tmp_path):
    """The B3 token arm's recipe in one command: --preset vimoe-3x64 --init_from_dense DIR --expert_init split_shared.
    The start holds the dense weights; it is the dense model once the combine weight is 1."""
    script = load_script()
    dense_dir, moe_dir = tmp_path / "dense", tmp_path / "moe"
    script.main(["--preset", "vit-3x64"] + common_args(imagefolder, dense_dir))
    dense = VMoEForImageClassification.from_pretrained(dense_dir).eval()
    args = ["--preset", "vimoe-3x64", "--init_from_dense", str(dense_dir), "--expert_init", "split_shared"]
    start = script.build_model(script.ModelArguments(preset="vimoe-3x64", init_from_dense=str(dense_dir),
                                                     expert_init="split_shared", image_size=32, patch_size=8), CLASSES)
    start.config.normalize_router_weights = True  # k=1 with a combine weight of 1: shared + routed = the dense MLP
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(start.eval()(x).logits, dense(x).logits, atol=1e-5, rtol=0)
    script.main(args + common_args(imagefolder, moe_dir))
    moe = VMoEForImageClassification.from_pretrained(moe_dir)
    assert moe.config.routing_level == "token" and moe.config.num_shared_experts == 1
    assert "a shared expert made of the first half of its MLP's hidden units" in (moe_dir / "README.md").read_text()
    with pytest.raises(ValueError, match="--expert_init split_shared .* give --init_from_dense"):
        script.main(["--preset", "vimoe-3x64", "--expert_init", "split_shared"] + common_args(imagefolder, tmp_path))


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(imagefolder, tmp_path):
    """Augmentations are drawn per (seed, epoch, image) (`AugmentedDataset`): a run resumed mid-epoch from a
    checkpoint crops and flips as the uninterrupted run did, so it ends with the same weights, bit for bit."""
    script = load_script()

    def run(out, *extra):  # 24 images, batch 8: 3 steps per epoch; a checkpoint after step 4 (epoch 2's first)
        return script.main(common_args(imagefolder, out) + ["--preset", "vimoe-3x64", "--max_steps", "7",
                                                            "--save_strategy", "steps", "--save_steps", "4", *extra])

    whole = run(tmp_path / "whole").model
    resumed = run(tmp_path / "resumed", "--resume_from_checkpoint", str(tmp_path / "whole" / "checkpoint-4"))
    assert not (tmp_path / "resumed" / "checkpoint-4").exists()  # it did resume: steps 5-7 only
    resumed = resumed.model
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_moe_run_refuses_another_training_set_than_the_dense_run(imagefolder, tmp_path):
    script = load_script()
    superclasses = tmp_path / "superclasses.json"
    superclasses.write_text(json.dumps({"superclass_ids": [0, 0, 1, 1], "heldout": {
        "share": 0.1, "seed": 0, "num_images": 4, "num_train": 20}}))
    args = ["--preset", "mobile-vmoe-3x64", "--config_overrides", "num_experts=2", "--superclasses_file",
            str(superclasses)] + common_args(imagefolder, tmp_path / "moe")
    with pytest.raises(ValueError, match="gives 4 and 12: give the dense run's"):
        script.main(args + ["--max_train_samples", "16"])


def test_bad_arguments(imagefolder, tmp_path):
    script = load_script()
    with pytest.raises(ValueError, match="exactly one"):
        script.main(common_args(imagefolder, tmp_path))
    with pytest.raises(ValueError, match="--drop_upcycling_ratio 0.5 .* give --init_from_dense"):
        script.main(["--preset", "mobile-vmoe-3x64", "--drop_upcycling_ratio", "0.5"] + common_args(imagefolder, tmp_path))
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
