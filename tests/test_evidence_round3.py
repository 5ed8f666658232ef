"""Round-3 evidence scripts on small fakes: the full-Tiny-ImageNet preparation (counts, the extra classes dropped,
manifest, split kept on a re-run, refused when the images change) and the runner's pinned kernels and claims."""

import importlib.util
import json
import os
import platform
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROUND3 = ROOT / "benchmarks" / "evidence" / "round3"


def load(path: Path):
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def prep(monkeypatch):
    module = load(ROUND3 / "prepare_data.py")
    for name, value in (("NUM_CLASSES", 3), ("TRAIN_PER_CLASS", 6), ("VAL_PER_CLASS", 2), ("HELDOUT_PER_CLASS", 2),
                        ("PROBE_PER_CLASS", 1)):
        monkeypatch.setattr(module, name, value)
    return module


def fake_clone(root: Path, wnids=("n001", "n002", "n003"), train=6, val=2) -> Path:
    tin = root / "tiny-imagenet-200"
    (tin / "val" / "images").mkdir(parents=True)
    (tin / "wnids.txt").write_text("\n".join([*wnids, "n02480855"]) + "\n")
    lines = []
    for w in (*wnids, "n02480855"):  # the extra class has images too: it must be dropped
        (tin / "train" / w / "images").mkdir(parents=True)
        for i in range(train):
            (tin / "train" / w / "images" / f"{w}_{i}.JPEG").write_bytes(f"{w}-{i}".encode())
        for i in range(val):
            name = f"val_{w}_{i}.JPEG"
            (tin / "val" / "images" / name).write_bytes(f"val-{w}-{i}".encode())
            lines.append(f"{name}\t{w}\t0\t0\t63\t63")
    (tin / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_prepare_builds_the_split_and_checks_it_again(prep, tmp_path):
    src, record = fake_clone(tmp_path / "clone"), tmp_path / "data.json"
    out = prep.build(src, tmp_path / "evd3", record_path=record)
    counts = {part: len(list((out / part).glob("*/*.JPEG"))) for part in ("train", "heldout", "validation",
                                                                          "trainprobe")}
    assert counts == {"train": 12, "heldout": 6, "validation": 6, "trainprobe": 3}
    assert sorted(p.name for p in (out / "train").iterdir()) == ["n001", "n002", "n003"]  # n02480855 dropped
    held = {p.name for p in (out / "heldout").glob("*/*.JPEG")}
    assert not held & {p.name for p in (out / "train").glob("*/*.JPEG")}  # held out of every training arm
    assert {p.name for p in (out / "trainprobe").glob("*/*.JPEG")} <= {p.name for p in (out / "train").glob("*/*")}
    manifest = (out / "MANIFEST.sha256").read_text().splitlines()
    assert len(manifest) == 3 * 6 + 3 * 2
    data = json.loads(record.read_text())
    assert data["images"] == {"train": 18, "validation": 6} and data["dropped_classes"][0] == "n02480855"
    # the same images give the same split; changed images are refused, not silently re-split
    prep.build(src, tmp_path / "evd3b", record_path=record)
    assert {p.name for p in (tmp_path / "evd3b" / "tin200" / "heldout").glob("*/*.JPEG")} == held
    (src / "tiny-imagenet-200" / "train" / "n001" / "images" / "n001_0.JPEG").write_bytes(b"changed")
    with pytest.raises(SystemExit, match="differ"):
        prep.build(src, tmp_path / "evd3c", record_path=record)


def test_prepare_refuses_wrong_counts(prep, tmp_path):
    src = fake_clone(tmp_path / "clone", train=5)
    with pytest.raises(SystemExit, match="classes without 6 images"):
        prep.build(src, tmp_path / "evd3", record_path=tmp_path / "data.json")


def test_runner_pins_the_kernels_and_shares_a_root(tmp_path, monkeypatch):
    runner = load(ROUND3 / "run_round3.py")
    r2 = runner.r2
    for name in ("EVD2", "RUNS", "LOG", "CHOICES", "TIN", "plan", "RUN_ENV"):  # restored after the test
        monkeypatch.setattr(r2, name, getattr(r2, name))
    r2.configure(tmp_path, runner.plan, runner.ISA["avx2"])
    facts = r2.machine_facts({**os.environ, **r2.RUN_ENV})
    assert facts["pinned_env"]["ATEN_CPU_CAPABILITY"] == "avx2"
    assert facts["torch"] and facts["transformers"] and facts["cpu"] and facts["cpu_capability"]
    if platform.machine() in ("x86_64", "AMD64"):
        assert facts["cpu_capability"] == "AVX2"  # the pin reaches torch (x86 machines have AVX2)
    plan = {r.name: r for r in runner.plan()}
    assert {"A3-dense-s42", "A3-moe-conf-s44", "A3-moe-lfb-s43", "C-token-s42", "B3-moe-conf-drop-s42"} <= set(plan)
    assert "router_bias_update_rate=0.001,router_aux_loss_coef=0.0" in plan["A3-moe-lfb-s42"].argv
    run = plan["A3-dense-s42"]
    assert r2.claim(run) and not r2.claimed_elsewhere(run)
    boot = r2._boot_id()
    r2._claim_path(run).write_text(f"{boot} {os.getppid()}")  # a live process of another runner holds it
    assert not r2.claim(run) and r2.claimed_elsewhere(run)
    r2._claim_path(run).write_text(f"{boot} 999999999")  # a runner that is gone: its claim is taken over
    assert r2.claim(run)
    r2._claim_path(run).write_text(f"another-boot {os.getppid()}")  # from before a restart: pid reused, stale
    assert r2.claim(run)
