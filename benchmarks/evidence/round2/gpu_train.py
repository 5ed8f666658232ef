"""Round 2, A on a GPU (issue 15, item 6): the paper's ViT-Tiny size, `vit-12x192` vs `mobile-vmoe-12x192`.

Same split as the CPU runs (200 Tiny-ImageNet classes: train 18,000 / held-out 2,000 / validation 10,000; see
PROTOCOL.md), 64 px with patch 4 (16 x 16 = 256 patches, the token count of 224 px with patch 14), E=10, k=1, MoE in
the last 2 of 12 blocks, one shared image router. Arms: dense; Mobile V-MoE with the super-class router on the
same seed's dense confusion super-classes (`conf`), on the WordNet super-classes (`wordnet`), and learned
(`learned`). The same optimiser and schedule for every arm (AdamW, lr 1e-3, weight decay 0.05 off biases and
norms, 5% warm-up then cosine, gradient clipping 1.0: the Trainer's defaults as the CPU runs use them), the same
augmentation as `examples/run_image_classification.py` (random-resized crop 0.35-1, ratio 3/4-4/3, bicubic; flip),
the same seed and data order for every arm of a seed. Differences from the CPU runs, all for speed on one GPU:
batch 128 (not 64), bfloat16 autocast (the routers stay float32), the whole data set decoded once into GPU memory
and augmented there, a plain training loop instead of the Trainer.

    here:    python benchmarks/evidence/round2/gpu_train.py pack        # -> runs/gpu_data/tin200.npz (46 MiB)
    device:  python benchmarks/evidence/round2/gpu_train.py run --out $OUT/gpu_a   (carry runs/gpu_data)
    smoke:   python benchmarks/evidence/round2/gpu_train.py run --smoke --out /tmp/gpu_smoke      # CPU, seconds

Round 3 reuses this script (`../round3/gpu_train.py`): its own pack (`pack(..., per_class=...)`) and the arms
`--moe-arms conf,lfb` on every seed (`lfb`: the learned router with loss-free balancing, its bias updated after
each optimizer step by `update_router_biases`).

`pack` stores the split's JPEGs losslessly re-encoded with `jpegtran -optimize -copy none` (same pixels, 17% fewer
bytes: the run tool carries at most 64 MiB) in one uncompressed `.npz`. `run` trains the dense arms of every seed at
once (one process each), builds each seed's super-classes from its dense model's soft confusion matrix on the
held-out images, then trains every MoE arm at once; a process that would not finish by the deadline stops at the
end of an epoch and is recorded as incomplete. Results: `<out>/<arm>-s<seed>.json` and `<out>/summary.json`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT / "src"))
PACK = ROOT / "runs" / "gpu_data" / "tin200.npz"
SPLITS = ("train", "heldout", "validation")


def pack(evd2: Path, out: Path = PACK, per_class: dict | None = None) -> None:
    """The split's JPEGs, losslessly re-encoded, concatenated into one uncompressed `.npz` (a zip of 30,000 small
    files spends 4.5 MiB on its headers) with their offsets, splits, labels and the class names. `per_class`
    ({split: n}): only the first n images (by file name) of each class of that split."""
    import numpy as np

    root = evd2 / "tin200"
    if not (root / "train").is_dir():
        raise SystemExit(f"{root}/train missing: run prepare_data.py first (EVD2={evd2})")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    index = {c: i for i, c in enumerate(classes)}
    lossless = shutil.which("jpegtran") is not None
    blobs, split_ids, labels = [], [], []
    for split_id, split in enumerate(SPLITS):
        files = sorted((root / split).glob("*/*.JPEG"))
        if per_class and split in per_class:
            files = [f for c in classes for f in sorted((root / split / c).glob("*.JPEG"))[: per_class[split]]]
        for f in files:
            blobs.append(subprocess.run(["jpegtran", "-copy", "none", "-optimize", str(f)], check=True,
                                        capture_output=True).stdout if lossless else f.read_bytes())
            split_ids.append(split_id)
            labels.append(index[f.parent.name])
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "wb") as fh:
        np.savez(fh, jpeg=np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets=offsets,
                 split=np.array(split_ids, dtype=np.int8), label=np.array(labels, dtype=np.int16),
                 classes=np.array(classes))
    tmp.replace(out)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {len(blobs)} images, "
          f"{'jpegtran-optimised' if lossless else 'as is'})")


def load_split(path: Path, smoke: bool):
    """{split: (uint8 images (N, 3, 64, 64), int64 labels (N,))} and the class names (sorted, as imagefolder)."""
    import numpy as np
    import torch
    from PIL import Image

    packed = np.load(path)
    jpeg, offsets, classes = packed["jpeg"], packed["offsets"], [str(c) for c in packed["classes"]]
    data = {}
    for split_id, split in enumerate(SPLITS):
        rows = np.flatnonzero(packed["split"] == split_id)
        if smoke:  # two images per class
            rows = rows[:: max(1, len(rows) // (2 * len(classes)))]
        images = np.stack([np.asarray(Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
                           for i in rows])
        data[split] = (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                       torch.from_numpy(packed["label"][rows].astype(np.int64)))
    return data, classes


def random_resized_crop(images, generator, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)):
    """The example script's augmentation on a GPU batch: a random-resized crop (bicubic) and a horizontal flip
    per image, as one `grid_sample` over per-image affine grids. images: (B, 3, H, W) float."""
    import torch
    import torch.nn.functional as F

    b, device = images.shape[0], images.device
    u = torch.rand(b, 4, generator=generator, device=device)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = log_r.exp()
    w = (area * aspect).sqrt().clamp(max=1.0)  # crop size as a fraction of the image
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (u[:, 2] * 2 - 1) * (1 - w)  # crop centre in [-1, 1] coordinates, the crop inside the image
    cy = (u[:, 3] * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, generator=generator, device=device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)


def build_config(arm: str, classes: list, superclass_ids, smoke: bool):
    from hf_vmoe.recipes.presets import get_preset
    from hf_vmoe.recipes.superclasses import set_superclasses

    preset = "vit-12x192" if arm == "dense" else "mobile-vmoe-12x192"
    overrides = dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=1, intermediate_size=128) if smoke else {}
    config = get_preset(preset, image_size=64, patch_size=4, num_labels=len(classes),
                        id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)}, **overrides)
    if superclass_ids is not None:
        set_superclasses(config, superclass_ids, train_routing="router")
    if arm == "lfb":  # the learned router with loss-free balancing and no balancing loss (round 3's A3-moe-lfb)
        config.router_bias_update_rate, config.router_aux_loss_coef = 1e-3, 0.0
    return config


def train(args) -> int:
    """One arm of one seed (a subprocess of `run`)."""
    import numpy as np
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from hf_vmoe import VMoEForImageClassification, update_router_biases
    from hf_vmoe.image_processing_vmoe import VMoEImageProcessor

    t0 = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    data, classes = load_split(Path(args.data), args.smoke)
    superclass_ids = json.loads(Path(args.superclasses).read_text())["superclass_ids"] if args.superclasses else None
    config = build_config(args.arm, classes, superclass_ids, args.smoke)
    torch.manual_seed(args.seed)
    model = VMoEForImageClassification(config).to(device)
    processor = VMoEImageProcessor()
    mean = torch.tensor(processor.image_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, device=device).view(1, 3, 1, 1)
    (x_train, y_train), (x_val, y_val) = [(x.to(device), y.to(device)) for x, y in (data["train"], data["validation"])]

    no_decay = {n for n, p in model.named_parameters() if p.ndim < 2 or "norm" in n.lower() or n.endswith("bias")}
    groups = [{"params": [p for n, p in model.named_parameters() if n not in no_decay], "weight_decay": 0.05},
              {"params": [p for n, p in model.named_parameters() if n in no_decay], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total = steps_per_epoch * args.epochs
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(0.05 * total), total)
    generator = torch.Generator(device=device).manual_seed(args.seed)  # same data order for every arm of a seed
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def evaluate(x, y):
        model.eval()
        correct, experts, counts = 0, [], 0
        with torch.inference_mode(), autocast:
            for i in range(0, len(x), 1000):
                out = model(pixel_values=(x[i:i + 1000].float() / 255 - mean) / std,
                            output_router_logits=config.is_moe)
                correct += int((out.logits.argmax(-1) == y[i:i + 1000]).sum())
                if config.is_moe:
                    experts.append(out.router_logits[0].float().argmax(-1))  # the router's super-class guess
                    counts = counts + out.expert_counts[0].float()  # the experts used (the loss-free bias included)
        model.train()
        return correct / len(x), (torch.cat(experts) if experts else None), counts

    record = {"arm": args.arm, "seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size,
              "lr": args.lr, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "curve": [], "complete": False}
    model.train()
    start = time.time()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=generator, device=device)
        loss_sum = torch.zeros((), device=device)
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            x = (random_resized_crop(x_train[idx].float() / 255, generator) - mean) / std
            with autocast:
                loss = model(pixel_values=x, labels=y_train[idx]).loss  # task + routing losses
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            update_router_biases(model)  # loss-free balancing (the lfb arm); nothing for the other arms
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
        acc = evaluate(x_val, y_val)[0] if (epoch + 1) % 5 == 0 or epoch + 1 == args.epochs else None
        elapsed = time.time() - start
        record["curve"].append({"epoch": epoch + 1, "train_loss": float(loss_sum) / steps_per_epoch,
                                "eval_accuracy": acc, "seconds": round(elapsed, 1)})
        print(json.dumps({"arm": args.arm, "seed": args.seed, **record["curve"][-1]}), flush=True)
        if args.deadline and epoch + 1 < args.epochs and time.time() + elapsed / (epoch + 1) > args.deadline:
            record["stopped"] = f"deadline: would not finish epoch {epoch + 2} in time"
            break
    else:
        record["complete"] = True
    acc, experts, counts = evaluate(x_val, y_val)
    record.update(eval_accuracy=acc, train_seconds=round(time.time() - start, 1), wall_seconds=round(time.time() - t0, 1))
    if config.router_bias_update_rate:  # loss-free balancing: the selection bias it learned
        record["router_bias"] = [round(float(v), 5) for v in model.vmoe.encoder.router.e_score_correction_bias]
    if experts is not None:
        load = counts / counts.sum()
        record["expert_load"] = [round(float(v), 4) for v in load]
        if superclass_ids is not None:
            target = torch.tensor(superclass_ids, device=device)[y_val]
            record["router_superclass_accuracy"] = float((experts == target).float().mean())
    if args.arm == "dense":  # the held-out soft confusion matrix -> this seed's super-classes
        from hf_vmoe.recipes.superclasses import soft_confusion_matrix, superclasses_from_confusion, save_superclasses

        x_h, y_h = (t.to(device) for t in data["heldout"])
        model.eval()
        with torch.inference_mode(), autocast:
            probs = torch.cat([model(pixel_values=(x_h[i:i + 1000].float() / 255 - mean) / std).logits.float().softmax(-1)
                               for i in range(0, len(x_h), 1000)])
        cm = soft_confusion_matrix(y_h.cpu().numpy(), probs.double().cpu().numpy())
        ids = superclasses_from_confusion(cm, 10, seed=0)
        save_superclasses(Path(args.out) / f"superclasses-s{args.seed}.json", ids, classes, confusion=cm)
    Path(args.out, f"{args.arm}-s{args.seed}.json").write_text(json.dumps(record, indent=1))
    return 0


def run(args) -> int:
    """Every arm: the dense arms of all seeds at once, then every MoE arm at once; then a summary."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget
    seeds = [int(s) for s in args.seeds.split(",")]
    base = [sys.executable, __file__, "train", "--data", args.data, "--out", str(out), "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr)]
    base += ["--smoke"] if args.smoke else []

    def launch(jobs):
        procs = []
        for arm, seed, extra in jobs:
            log = open(out / f"{arm}-s{seed}.log", "w")
            procs.append((arm, seed, subprocess.Popen([*base, "--arm", arm, "--seed", str(seed), *extra],
                                                      stdout=log, stderr=subprocess.STDOUT)))
        for arm, seed, p in procs:
            print(f"{arm}-s{seed}: exit {p.wait()}", flush=True)

    launch([("dense", s, ["--deadline", str(time.time() + 0.42 * args.budget)]) for s in seeds])
    wordnet = str(HERE / "wordnet_superclasses.json")
    jobs = [("conf", s, ["--superclasses", str(out / f"superclasses-s{s}.json")]) for s in seeds
            if (out / f"superclasses-s{s}.json").is_file()]
    if args.moe_arms is None:  # round 2: WordNet super-classes and the learned router on the first seed only
        jobs += [("wordnet", seeds[0], ["--superclasses", wordnet]), ("learned", seeds[0], [])]
    else:
        jobs = [job for job in jobs if "conf" in args.moe_arms.split(",")]
        jobs += [(arm, s, []) for arm in args.moe_arms.split(",") if arm != "conf" for s in seeds]
    launch([(arm, seed, [*extra, "--deadline", str(deadline)]) for arm, seed, extra in jobs])
    summary = {}
    for f in sorted(out.glob("*-s*.json")):
        if f.name.startswith("superclasses"):
            continue
        r = json.loads(f.read_text())
        summary[f.stem] = {k: r.get(k) for k in ("eval_accuracy", "complete", "train_seconds",
                                                 "router_superclass_accuracy", "expert_load")}
    for s in seeds:
        dense = summary.get(f"dense-s{s}", {}).get("eval_accuracy")
        for arm in ("conf", "wordnet", "learned", "lfb"):
            r = summary.get(f"{arm}-s{s}")
            if r and dense is not None and r["eval_accuracy"] is not None:
                r["minus_dense_points"] = round(100 * (r["eval_accuracy"] - dense), 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--evd2", default=os.environ.get("EVD2", "/tmp/evd2"))
    for name in ("run", "train"):
        p = sub.add_parser(name)
        p.add_argument("--data", default=str(PACK))
        p.add_argument("--out", required=True)
        p.add_argument("--epochs", type=int, default=30)
        p.add_argument("--batch-size", type=int, default=128)
        p.add_argument("--lr", type=float, default=1e-3)
        p.add_argument("--smoke", action="store_true", help="two images per class, a 3 x 64 model: a CPU check")
        if name == "run":
            p.add_argument("--seeds", default="42,43,44")
            p.add_argument("--budget", type=float, default=420, help="seconds for everything")
            p.add_argument("--moe-arms", default=None,
                           help="MoE arms run on every seed (e.g. conf,lfb); default: round 2's arms")
        else:
            p.add_argument("--arm", choices=("dense", "conf", "wordnet", "learned", "lfb"), required=True)
            p.add_argument("--seed", type=int, required=True)
            p.add_argument("--superclasses", default=None)
            p.add_argument("--deadline", type=float, default=None)
    args = parser.parse_args(argv)
    if args.cmd == "pack":
        pack(Path(args.evd2))
        return 0
    return run(args) if args.cmd == "run" else train(args)


if __name__ == "__main__":
    sys.exit(main())
