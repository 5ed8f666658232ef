#!/usr/bin/env python
"""Round-2 data (issue 15): Tiny-ImageNet-200, all 200 classes, with 10% of train held out per class.

Builds, under $EVD2/tin200 (default /tmp/evd2/tin200), two imagefolders of symlinks into the shared data
(nothing is copied):

    train/<wnid>/*.JPEG     90 images per class (18,000): what every A / B run trains on
    heldout/<wnid>/*.JPEG   10 images per class (2,000): the dense model's confusion matrix -> super-classes
                            (never trained on, never reported as the result)
    validation/<wnid>/*.JPEG  all 50 validation images per class (10,000): the reported numbers
    trainprobe/<wnid>/*.JPEG  10 of each class's 90 TRAINING images (2,000; a subset of train/): the epoch-choice
                            scouting run evaluates on it, so its per-epoch "eval" accuracy is the training accuracy
                            (eval transform) that the epoch rule in PROTOCOL.md reads

(validation is linked too, not passed in place: `datasets`' imagefolder infers labels only when the files of all
splits lie at the same path depth, and drops the label column silently otherwise.)
The held-out images are chosen per class with `random.Random(f"{seed}-{wnid}")` (seed 0) from the sorted file
names, so the split is the same on every machine; `heldout_files.txt` beside this script lists them and is
checked on every run (a mismatch is an error, not a silent new split).

    python benchmarks/evidence/round2/prepare_data.py [--data ../shared/data] [--evd2 /tmp/evd2] [--seed 0]

Why symlinks and not a script flag: `examples/run_image_classification.py` has no option (yet) to hold out part
of --train_dir per class; with one, this folder layout is still what it would produce.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
LIST = HERE / "heldout_files.txt"
PER_CLASS_HELDOUT = 10


def default_data() -> Path:
    return Path(os.environ.get("HF_VMOE_REAL_DATA", ROOT.parent / "shared/data"))


def split(src: Path, seed: int) -> dict[str, list[str]]:
    """wnid -> sorted held-out file names."""
    out = {}
    for cls in sorted(p.name for p in (src / "train").iterdir() if p.is_dir()):
        files = sorted(f.name for f in (src / "train" / cls).iterdir() if f.suffix.upper() == ".JPEG")
        if len(files) < 2 * PER_CLASS_HELDOUT:
            raise SystemExit(f"{cls}: only {len(files)} training images")
        out[cls] = sorted(random.Random(f"{seed}-{cls}").sample(files, PER_CLASS_HELDOUT))
    return out


def build(data: Path, evd2: Path, seed: int = 0, write_list: bool = False) -> Path:
    src = data / "tiny-imagenet-200-subset"
    if not (src / "train").is_dir():
        raise SystemExit(f"{src}/train not found (set HF_VMOE_REAL_DATA or --data)")
    held = split(src, seed)
    listing = "".join(f"{cls}/{f}\n" for cls, files in held.items() for f in files)
    if write_list or not LIST.is_file():
        LIST.write_text(listing)
    elif LIST.read_text() != listing:
        raise SystemExit(f"the held-out split differs from {LIST}: different data or seed")
    out = evd2 / "tin200"
    counts = {"train": 0, "heldout": 0, "validation": 0, "trainprobe": 0}
    for cls, held_files in held.items():
        held_set = set(held_files)
        for part in counts:
            (out / part / cls).mkdir(parents=True, exist_ok=True)
        files = [("heldout" if f.name in held_set else "train", f) for f in sorted((src / "train" / cls).iterdir())]
        files += [("validation", f) for f in sorted((src / "validation" / cls).iterdir())]
        train_files = [f for part, f in files if part == "train"]
        probe = sorted(random.Random(f"{seed}-{cls}-trainprobe").sample(train_files, PER_CLASS_HELDOUT))
        files += [("trainprobe", f) for f in probe]
        for part, f in files:
            link = out / part / cls / f.name
            if not link.is_symlink():
                link.symlink_to(f.resolve())
            counts[part] += 1
    for part, n in counts.items():
        found = sum(1 for _ in (out / part).glob("*/*.JPEG"))
        if found != n:
            raise SystemExit(f"{out / part} has {found} files, expected {n} (stale folder? delete it and rerun)")
    print(f"{out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" images, {len(held)} classes")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=default_data())
    parser.add_argument("--evd2", type=Path, default=Path(os.environ.get("EVD2", "/tmp/evd2")))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write_list", action="store_true", help="rewrite heldout_files.txt")
    args = parser.parse_args()
    build(args.data, args.evd2, args.seed, args.write_list)


if __name__ == "__main__":
    main()
