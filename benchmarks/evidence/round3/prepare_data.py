#!/usr/bin/env python
"""Round-3 data: the full Tiny-ImageNet-200 (500 training and 50 validation images per class, 64 px), from a
clone of the public repository rangeetpan/IMagenet (folder `tiny-imagenet-200/`).

    git clone https://github.com/rangeetpan/IMagenet /somewhere/IMagenet    # once, ~220 MB
    python benchmarks/evidence/round3/prepare_data.py --source /somewhere/IMagenet [--evd3 /work/evd3]

Checks the source (200 classes: the clone's wnids.txt lists two extra classes, n02480855 and n10148035, which are
dropped; 100,000 training and 10,000 validation images), writes a sha256
manifest of every image used (`$EVD3/tin200/MANIFEST.sha256`) and builds imagefolders of symlinks (nothing is
copied; the images are never committed):

    train/<wnid>/*.JPEG       450 per class (90,000): what every A3 / B3 run trains on, dense and MoE alike
    heldout/<wnid>/*.JPEG     50 per class (10,000): the dense model's confusion matrix -> super-classes; held out
                              of every arm, so the dense baseline and the MoE train on the same images
    validation/<wnid>/*.JPEG  50 per class (10,000, the official validation set, labels from
                              val/val_annotations.txt): every reported number
    trainprobe/<wnid>/*.JPEG  10 of each class's 450 training images (2,000): training accuracy (eval transform)
                              reported beside validation accuracy

The held-out and probe images are drawn per class with `random.Random(f"{seed}-{wnid}")` from the sorted file
names (seed 0), so the split is the same on every machine. `data.json` beside this script records the source
repository's commit, the counts and the manifest's own sha256; a later call checks them (a mismatch is an error,
not a silent new split).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECORD = HERE / "data.json"
EXTRA_CLASSES = ("n02480855", "n10148035")  # in the clone, not in Tiny-ImageNet-200
TRAIN_PER_CLASS, VAL_PER_CLASS = 500, 50
HELDOUT_PER_CLASS, PROBE_PER_CLASS = 50, 10


NUM_CLASSES = 200


def source_images(src: Path) -> dict[str, dict[str, list[Path]]]:
    """{"train": {wnid: [files]}, "validation": {wnid: [files]}}, checked against the expected counts."""
    tin = src / "tiny-imagenet-200"
    if not (tin / "train").is_dir() or not (tin / "val" / "val_annotations.txt").is_file():
        raise SystemExit(f"{tin}: no train/ or val/val_annotations.txt: --source must be a clone of "
                         "rangeetpan/IMagenet (with its tiny-imagenet-200/ folder)")
    wnids = sorted(set(tin.joinpath("wnids.txt").read_text().split()) - set(EXTRA_CLASSES))
    if len(wnids) != NUM_CLASSES:
        raise SystemExit(f"expected {NUM_CLASSES} classes in {tin / 'wnids.txt'} (without {EXTRA_CLASSES}), "
                         f"found {len(wnids)}")
    train = {w: sorted((tin / "train" / w / "images").glob("*.JPEG")) for w in wnids}
    val: dict[str, list[Path]] = {w: [] for w in wnids}
    for line in tin.joinpath("val/val_annotations.txt").read_text().splitlines():
        name, wnid = line.split("\t")[:2]
        if wnid in val:
            val[wnid].append(tin / "val" / "images" / name)
    for part, per_class, table in (("train", TRAIN_PER_CLASS, train), ("validation", VAL_PER_CLASS, val)):
        bad = {w: len(f) for w, f in table.items() if len(f) != per_class}
        if bad:
            raise SystemExit(f"{part}: classes without {per_class} images: {dict(list(bad.items())[:5])}")
        missing = [f for files in table.values() for f in files if not f.is_file()]
        if missing:
            raise SystemExit(f"{part}: {len(missing)} listed images missing, e.g. {missing[0]}")
    return {"train": train, "validation": {w: sorted(f) for w, f in val.items()}}


def manifest(images: dict, src: Path) -> str:
    lines = []
    for part in ("train", "validation"):
        for files in images[part].values():
            for f in files:
                lines.append(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(src)}\n")
    return "".join(sorted(lines, key=lambda line: line[66:]))


def build(src: Path, evd3: Path, seed: int = 0, write_record: bool = False, record_path: Path = RECORD) -> Path:
    images = source_images(src)
    listing = manifest(images, src)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True).stdout.strip()
    record = {"source": "github.com/rangeetpan/IMagenet, folder tiny-imagenet-200/", "commit": commit or None,
              "dropped_classes": list(EXTRA_CLASSES), "classes": NUM_CLASSES,
              "images": {"train": NUM_CLASSES * TRAIN_PER_CLASS, "validation": NUM_CLASSES * VAL_PER_CLASS},
              "manifest_sha256": hashlib.sha256(listing.encode()).hexdigest(), "split_seed": seed,
              "split": {"train": NUM_CLASSES * (TRAIN_PER_CLASS - HELDOUT_PER_CLASS),
                        "heldout": NUM_CLASSES * HELDOUT_PER_CLASS, "validation": NUM_CLASSES * VAL_PER_CLASS,
                        "trainprobe": NUM_CLASSES * PROBE_PER_CLASS}}
    if write_record or not record_path.is_file():
        record_path.write_text(json.dumps(record, indent=1) + "\n")
    else:
        known = json.loads(record_path.read_text())
        if known["manifest_sha256"] != record["manifest_sha256"] or known["split_seed"] != seed:
            raise SystemExit(f"the images or the split differ from {record_path} (manifest {record['manifest_sha256']})")
    out = evd3 / "tin200"
    out.mkdir(parents=True, exist_ok=True)
    (out / "MANIFEST.sha256").write_text(listing)
    counts = dict.fromkeys(record["split"], 0)
    for wnid, files in images["train"].items():
        held = set(random.Random(f"{seed}-{wnid}").sample([f.name for f in files], HELDOUT_PER_CLASS))
        train = [f for f in files if f.name not in held]
        probe = set(random.Random(f"{seed}-{wnid}-trainprobe").sample([f.name for f in train], PROBE_PER_CLASS))
        parts = [("heldout" if f.name in held else "train", f) for f in files]
        parts += [("trainprobe", f) for f in train if f.name in probe]
        parts += [("validation", f) for f in images["validation"][wnid]]
        for part, f in parts:
            (out / part / wnid).mkdir(parents=True, exist_ok=True)
            link = out / part / wnid / f.name
            if not link.is_symlink():
                link.symlink_to(f.resolve())
            counts[part] += 1
    for part, n in counts.items():
        found = sum(1 for _ in (out / part).glob("*/*.JPEG"))
        if found != n or n != record["split"][part]:
            raise SystemExit(f"{out / part} has {found} files, expected {record['split'][part]} (stale folder? "
                             "delete it and rerun)")
    print(f"{out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" images; source commit {commit}; "
          f"manifest sha256 {record['manifest_sha256']}")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="a clone of rangeetpan/IMagenet")
    parser.add_argument("--evd3", type=Path, default=Path(os.environ.get("EVD3", "/work/evd3")))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write_record", action="store_true", help="rewrite data.json")
    args = parser.parse_args()
    build(args.source, args.evd3, args.seed, args.write_record)


if __name__ == "__main__":
    main()
