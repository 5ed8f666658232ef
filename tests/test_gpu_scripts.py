"""The GPU scripts (benchmarks/gpu_check.py, benchmarks/evidence/round2/gpu_train.py and round 3's wrapper) on the CPU: what can be
checked without a GPU (packing, augmentation, one training arm in smoke mode, the refusal without CUDA)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_train = load(ROOT / "benchmarks" / "evidence" / "round2" / "gpu_train.py")
gpu_train3 = load(ROOT / "benchmarks" / "evidence" / "round3" / "gpu_train.py")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A 10-class imagefolder split like prepare_data.py's (3 train / 1 held-out / 1 validation image per class)."""
    root = tmp_path_factory.mktemp("evd2")
    rng = np.random.default_rng(0)
    images = {}
    for split, count in (("train", 3), ("heldout", 1), ("validation", 1)):
        for c in range(10):
            folder = root / "tin200" / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                path = folder / f"n{c:08d}_{i}.JPEG"
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
                images[path] = np.asarray(Image.open(path).convert("RGB"))
    out = root / "tin200.npz"
    gpu_train.pack(root, out)
    return out, images


def test_pack_keeps_every_pixel_and_label(packed):
    out, images = packed
    data, classes = gpu_train.load_split(out, smoke=False)
    assert classes == [f"n{c:08d}" for c in range(10)]
    for split_id, split in enumerate(gpu_train.SPLITS):
        files = sorted(p for p in images if p.parts[-3] == split)
        x, y = data[split]
        assert x.shape == (len(files), 3, 64, 64) and x.dtype == torch.uint8
        for i, path in enumerate(files):
            assert np.array_equal(x[i].permute(1, 2, 0).numpy(), images[path]), path
            assert classes[int(y[i])] == path.parent.name


def test_random_resized_crop_at_full_scale_is_the_image_or_its_mirror():
    images = torch.rand(6, 3, 16, 16)
    out = gpu_train.random_resized_crop(images, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for image, crop in zip(images, out):
        assert min((crop - image).abs().max(), (crop - image.flip(-1)).abs().max()) < 1e-5
    flips = [bool((crop - image.flip(-1)).abs().max() < 1e-5) for image, crop in zip(images, out)]
    assert any(flips) and not all(flips)
    small = gpu_train.random_resized_crop(images, torch.Generator().manual_seed(0), scale=(0.1, 0.1))
    assert small.shape == images.shape and not torch.allclose(small, images)  # a 10% crop, enlarged


def test_one_dense_arm_trains_and_writes_its_superclasses(packed, tmp_path):
    out, _ = packed
    argv = ["train", "--data", str(out), "--out", str(tmp_path), "--epochs", "1", "--smoke", "--arm", "dense",
            "--seed", "0", "--batch-size", "8"]
    assert gpu_train.main(argv) == 0
    record = json.loads((tmp_path / "dense-s0.json").read_text())
    assert record["complete"] and 0 <= record["eval_accuracy"] <= 1 and len(record["curve"]) == 1
    ids = json.loads((tmp_path / "superclasses-s0.json").read_text())["superclass_ids"]
    assert sorted(set(ids)) == list(range(10)) and len(ids) == 10
    moe = ["train", "--data", str(out), "--out", str(tmp_path), "--epochs", "1", "--smoke", "--arm", "conf",
           "--seed", "0", "--batch-size", "8", "--superclasses", str(tmp_path / "superclasses-s0.json")]
    assert gpu_train.main(moe) == 0
    record = json.loads((tmp_path / "conf-s0.json").read_text())
    assert 0 <= record["router_superclass_accuracy"] <= 1 and abs(sum(record["expert_load"]) - 1) < 1e-3


def test_pack_keeps_the_first_images_of_each_class_when_capped(packed, tmp_path):
    _, images = packed
    out = tmp_path / "capped.npz"
    gpu_train.pack(packed[0].parent, out, per_class={"train": 2})  # the fixture's split, 2 training images per class
    data, classes = gpu_train.load_split(out, smoke=False)
    kept = sorted(p for p in images if p.parts[-3] == "train" and int(p.stem.rpartition("_")[2]) < 2)
    x, y = data["train"]
    assert len(x) == len(kept) == 2 * len(classes)
    for i, path in enumerate(kept):
        assert np.array_equal(x[i].permute(1, 2, 0).numpy(), images[path]), path
    assert len(data["validation"][0]) == len(classes)  # uncapped splits keep every image


def test_round3_run_trains_dense_conf_and_loss_free_arms(packed, tmp_path):
    """Round 3's wrapper: round 2's runner on its pack with the A3 arms, every arm on every seed (smoke mode)."""
    out, _ = packed
    assert gpu_train3.main(["run", "--data", str(out), "--out", str(tmp_path), "--epochs", "1", "--smoke",
                            "--seeds", "0", "--batch-size", "8", "--budget", "600"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"dense-s0", "conf-s0", "lfb-s0"}
    assert all(r["complete"] for r in summary.values())
    assert "minus_dense_points" in summary["lfb-s0"] and "minus_dense_points" in summary["conf-s0"]
    bias = json.loads((tmp_path / "lfb-s0.json").read_text())["router_bias"]
    assert len(bias) == 10 and any(b != 0 for b in bias)  # the loss-free bias was updated every step


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_without_cuda(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out",
                             str(tmp_path / "x.json")], capture_output=True, text=True)
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr
    assert not (tmp_path / "x.json").exists()
