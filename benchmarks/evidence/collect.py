#!/usr/bin/env python
"""Collect the issue-8 evidence runs (see run_evidence.sh) into results.json, tables.md and PNG plots.

For every finished run in $EVD/runs it reloads the saved model and measures, on the validation split:
classification top-1 / top-5 (and top-1 on the training images, for the generalisation gap), total / active
parameters and FLOPs (analytic `hf_vmoe.recipes.flops.count_flops`, checked against `measure_flops`), router super-class
accuracy (the router decides alone), expert load per MoE router; for segmentation the script's own eval metrics
(mIoU, per-class IoU). It plots the training curves from each run's trainer_state.json and runs the project's
routing analysis (examples/analyze_routing.py) on every MoE model.

    python benchmarks/evidence/collect.py [--evd /tmp/evd] [--skip_routing]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hf_vmoe import (
    VMoEForImageClassification,
    VMoEForSemanticSegmentation,
    VMoEImageProcessor,
)
from hf_vmoe.recipes.flops import count_flops, count_params, measure_flops

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

CLS_RUNS = {
    "cls-dense": "Dense ViT 6x96",
    "cls-moe-superclass": "Mobile V-MoE, image routing, super-class guided router",
    "cls-moe-superclass-loss": "Mobile V-MoE, super-class loss on the router, router-routed in training (ablation)",
    "cls-moe-router": "Mobile V-MoE, image routing, end-to-end learned router",
    "cls-token-shared": "Token routing + shared expert (ViMoE style)",
}
SEEDS = {"": 42, "-s2": 43, "-s3": 44}  # run-name suffix -> seed (run_evidence.sh SUF / SEED)
SEG_RUNS = {
    "seg-dense": "Dense ViT 6x96",
    "seg-token": "Token MoE (E=4 full-width experts, k=1)",
    "seg-token-shared": "Token MoE + shared expert (E=4 half-width + 1 half-width shared, k=1)",
}


def log_history(run_dir: Path) -> list[dict]:
    path = run_dir / "trainer_state.json"
    return json.loads(path.read_text())["log_history"] if path.is_file() else []


def image_batches(folder: Path, label2id: dict, processor, batch_size=128):
    files = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files += [(f, label2id[sub.name]) for f in sorted(sub.rglob("*.JPEG"))]
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images = [Image.open(f).convert("RGB") for f, _ in chunk]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        yield pixels, torch.tensor([lab for _, lab in chunk])


@torch.no_grad()
def evaluate_classifier(model, folder: Path, processor) -> dict:
    model.eval()
    cfg = model.config
    label2id = {k: int(v) for k, v in cfg.label2id.items()}
    top1 = top5 = n = 0
    sc_correct = sc_n = 0
    loads = None
    routes, labels_all = [], []
    for pixels, labels in image_batches(folder, label2id, processor):
        out = model(pixel_values=pixels, labels=labels, output_router_logits=cfg.is_moe)
        logits = out.logits
        top = logits.topk(5, dim=-1).indices
        top1 += int((top[:, 0] == labels).sum())
        top5 += int((top == labels[:, None]).any(-1).sum())
        n += len(labels)
        if cfg.is_moe:
            counts = out.expert_counts.double().cpu()  # (router calls, E)
            loads = counts if loads is None else loads + counts
            if out.superclass_accuracy is not None:
                sc_correct += float(out.superclass_accuracy) * len(labels)
                sc_n += len(labels)
            if cfg.routing_level == "image":
                first = out.router_logits[0] if isinstance(out.router_logits, (tuple, list)) else out.router_logits
                routes.append(first.argmax(-1).cpu())
                labels_all.append(labels)
    result = {"top1": top1 / n, "top5": top5 / n, "num_images": n}
    if loads is not None:
        share = loads / loads.sum(-1, keepdim=True)
        e = share.shape[-1]
        ent = -(share * share.clamp_min(1e-12).log()).sum(-1) / np.log(e)
        result["expert_share_per_router"] = [[round(float(x), 4) for x in row] for row in share]
        result["expert_load_max_over_mean"] = [round(float(row.max() * e), 3) for row in share]
        result["expert_load_entropy"] = [round(float(x), 4) for x in ent]
    if sc_n:
        result["router_superclass_accuracy"] = sc_correct / sc_n
    if routes and cfg.superclass_ids is None:
        result["image_routes"] = torch.cat(routes).tolist()
        result["image_route_labels"] = torch.cat(labels_all).tolist()
    return result


@torch.no_grad()
def oracle_routing_top1(model, folder: Path, processor) -> float:
    """Top-1 when every validation image is sent to its TRUE super-class's expert (the routing used in training
    with `train_routing="superclass"`): the model in train mode, which here changes nothing else (no dropout,
    drop path or router noise in these configs). A diagnostic upper bound, not a deployable number."""
    cfg = model.config
    assert not (cfg.hidden_dropout_prob or cfg.attention_probs_dropout_prob or cfg.drop_path_rate or cfg.router_noise_std)
    label2id = {k: int(v) for k, v in cfg.label2id.items()}
    saved = cfg.train_routing
    cfg.train_routing = "superclass"  # also for a model trained with router routing (the ablation)
    model.train()
    correct = n = 0
    try:
        for pixels, labels in image_batches(folder, label2id, processor):
            logits = model(pixel_values=pixels, labels=labels).logits
            correct += int((logits.argmax(-1) == labels).sum())
            n += len(labels)
    finally:
        model.eval()
        cfg.train_routing = saved
    return correct / n


def matched_superclass_accuracy(routes, labels, superclass_ids, num_experts) -> float:
    """Share of images whose expert equals their label's super-class after the best expert<->super-class
    matching (Hungarian): how close an end-to-end learned router comes to the confusion-based partition."""
    from scipy.optimize import linear_sum_assignment

    table = np.zeros((num_experts, num_experts))
    for r, y in zip(routes, labels):
        table[r, superclass_ids[y]] += 1
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / table.sum())


def cost(model, head) -> dict:
    cfg = getattr(model.config, "backbone_config", None) or model.config
    analytic = count_flops(cfg, head=head)
    total, active = count_params(cfg, head=head)
    measured = measure_flops(model, batch_size=2)
    real_total = sum(p.numel() for p in model.parameters())
    extra = real_total - total  # a segmentation decode head (counted once, always active)
    return {
        "params_total": real_total,
        "params_active": active + extra,
        "flops_backbone_analytic": analytic.flops,
        "flops_measured": measured,
        "tokens": analytic.num_tokens,
    }


def run_routing(run_dir: Path, out_dir: Path, data_dir: str, extra: list[str]) -> dict | None:
    cmd = [sys.executable, str(ROOT / "examples/analyze_routing.py"), str(run_dir), "--data_dir", data_dir,
           "--output_dir", str(out_dir), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    report = json.loads((out_dir / "report.json").read_text())
    shown = [os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c for c in cmd[2:]]
    return {"command": " ".join(["python", "examples/analyze_routing.py", *shown]),
            "layers": {k: {m: v for m, v in d.items() if isinstance(v, (int, float))}
                       for k, d in report["layers"].items()},
            "recommendation": report.get("recommendation")}


def plot_curves(runs: dict, names: dict, metric: str, metric_label: str, path: Path):
    """One colour per variant; seed 42 solid, 43 dashed, 44 dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.6))
    colours = {key: f"C{i}" for i, key in enumerate(names)}
    for run, hist in runs.items():
        suffix = next((s for s in SEEDS if s and run.endswith(s)), "")
        variant = run[: len(run) - len(suffix)]
        style = {"": "-", "-s2": "--", "-s3": ":"}[suffix]
        label = names[variant] if not suffix else "_nolegend_"  # one legend entry per variant
        train = [(h["epoch"], h["loss"]) for h in hist if "loss" in h and "eval_loss" not in h]
        ev = [(h["epoch"], h["eval_loss"], h.get(metric)) for h in hist if "eval_loss" in h]
        if train:
            x, y = zip(*train)
            y = np.convolve(y, np.ones(5) / 5, mode="valid") if len(y) > 5 else y
            axes[0].plot(x[len(x) - len(y):], y, style, color=colours[variant], label=label)
        if ev:
            x, l, m = zip(*ev)
            axes[1].plot(x, l, style, marker="o", ms=3, color=colours[variant], label=label)
            if all(v is not None for v in m):
                axes[2].plot(x, m, style, marker="o", ms=3, color=colours[variant], label=label)
    axes[0].set_title("training loss (task + routing losses, 5-log moving avg)")
    axes[1].set_title("validation loss")
    axes[2].set_title(f"validation {metric_label}")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8,
               title="seed 42 solid, 43 dashed, 44 dotted", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--evd", default=os.environ.get("EVD", "/tmp/evd"))
    parser.add_argument("--data", default=os.environ.get("HF_VMOE_REAL_DATA", str(ROOT.parent / "shared/data")))
    parser.add_argument("--skip_routing", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    runs = Path(args.evd) / "runs"
    results = {"classification": {}, "segmentation": {}}
    superclasses = None
    sc_path = runs / "superclasses.json"
    if sc_path.is_file():
        superclasses = json.loads(sc_path.read_text())
        results["superclasses"] = superclasses

    cls_hist = {}
    for key, suf in [(k, s) for k in CLS_RUNS for s in SEEDS]:
        run_dir = runs / (key + suf)
        if not (run_dir / "model.safetensors").is_file():
            continue
        print("classification:", key + suf, flush=True)
        model = VMoEForImageClassification.from_pretrained(run_dir)
        processor = VMoEImageProcessor.from_pretrained(run_dir)
        hist = log_history(run_dir)
        cls_hist[key + suf] = hist
        r = {"name": CLS_RUNS[key], "variant": key, "seed": SEEDS[suf], **cost(model, "classification")}
        r["val"] = evaluate_classifier(model, Path(args.evd) / "tin20/validation", processor)
        r["train_eval_transform"] = {k: v for k, v in evaluate_classifier(
            model, Path(args.evd) / "tin20/train", processor).items() if k in ("top1", "top5")}
        if model.config.superclass_ids is not None:
            r["val"]["top1_oracle_superclass_routing"] = oracle_routing_top1(
                model, Path(args.evd) / "tin20/validation", processor)
        routes = r["val"].pop("image_routes", None)
        route_labels = r["val"].pop("image_route_labels", None)
        if routes is not None and superclasses is not None:
            ids = superclasses.get("superclass_ids")
            if ids is not None:
                r["val"]["router_matched_superclass_accuracy"] = matched_superclass_accuracy(
                    routes, route_labels, ids, model.config.num_experts)
        r["final_train_loss"] = next((h["loss"] for h in reversed(hist) if "loss" in h), None)
        r["final_eval_loss"] = next((h["eval_loss"] for h in reversed(hist) if "eval_loss" in h), None)
        r["train_runtime_s"] = next((h["train_runtime"] for h in reversed(hist) if "train_runtime" in h), None)
        r["eval_history"] = [{k: v for k, v in h.items() if k.startswith("eval_") or k == "epoch"}
                             for h in hist if "eval_loss" in h]
        if model.config.is_moe and not args.skip_routing and not suf:
            r["routing_analysis"] = run_routing(run_dir, HERE / f"routing_{key}", str(Path(args.evd) / "tin20/validation"), [])
        results["classification"][key + suf] = r

    seg_hist = {}
    for key, suf in [(k, s) for k in SEG_RUNS for s in SEEDS]:
        run_dir = runs / (key + suf)
        if not (run_dir / "model.safetensors").is_file():
            continue
        print("segmentation:", key + suf, flush=True)
        model = VMoEForSemanticSegmentation.from_pretrained(run_dir)
        hist = log_history(run_dir)
        seg_hist[key + suf] = hist
        r = {"name": SEG_RUNS[key], "variant": key, "seed": SEEDS[suf], **cost(model, None)}
        ev = json.loads((run_dir / "eval_results.json").read_text())
        r["eval"] = ev
        r["final_train_loss"] = next((h["loss"] for h in reversed(hist) if "loss" in h), None)
        r["train_runtime_s"] = next((h["train_runtime"] for h in reversed(hist) if "train_runtime" in h), None)
        r["eval_history"] = [{k: v for k, v in h.items() if k in ("epoch", "eval_loss", "eval_mean_iou")}
                             for h in hist if "eval_loss" in h]
        results["segmentation"][key + suf] = r

    seg = results["segmentation"]
    moe_seg = [k for k in SEG_RUNS if k != "seg-dense" and k in seg]
    if moe_seg and not args.skip_routing:
        best = max(moe_seg, key=lambda k: np.mean([r["eval"]["eval_mean_iou"] for r in seg.values() if r["variant"] == k]))
        results["best_segmentation_moe"] = best
        for key in moe_seg:  # seed 42 of every MoE variant; the best one is the one the docs show
            seg[key]["routing_analysis"] = run_routing(
                runs / key, HERE / f"routing_{key}", str(Path(args.data) / "camvid-ade"), ["--reduce_labels"])

    if cls_hist:
        plot_curves(cls_hist, CLS_RUNS, "eval_accuracy", "top-1 accuracy", HERE / "cls_curves.png")
    if seg_hist:
        plot_curves(seg_hist, SEG_RUNS, "eval_mean_iou", "mIoU", HERE / "seg_curves.png")
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    (HERE / "tables.md").write_text(tables(results))
    print(tables(results))


def _agg(values, fmt="{:.1%}") -> str:
    """'mean (seed 42 / 43 / ...)' or the single value."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return fmt.format(float(np.mean(values))) + " (" + " / ".join(fmt.format(v) for v in values) + ")"


def _layer_stat(r: dict, name: str) -> str:
    layers = (r.get("routing_analysis") or {}).get("layers") or {}
    return ", ".join(f"L{k}: {v[name]:.2f}" for k, v in sorted(layers.items(), key=lambda kv: int(kv[0]))) or "-"


def _by_variant(runs: dict) -> dict:
    out = {}
    for r in runs.values():
        out.setdefault(r["variant"], []).append(r)
    for rs in out.values():
        rs.sort(key=lambda r: r["seed"])
    return out


def tables(results) -> str:
    lines = []
    cls = _by_variant(results["classification"])
    if cls:
        lines += [("| variant | seeds | val top-1 | val top-5 | train top-1 | params total | params active | FLOPs/img "
                  "(measured) | router super-class acc (val) | expert load max/mean (val, per router) |"),
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for rs in cls.values():
            r = rs[0]
            sc = _agg([x["val"].get("router_superclass_accuracy") for x in rs])
            msc = _agg([x["val"].get("router_matched_superclass_accuracy") for x in rs])
            sc_text = sc if sc != "-" else (f"{msc} (best matching)" if msc != "-" else "-")
            loads = [", ".join(f"{v:.2f}" for v in x["val"]["expert_load_max_over_mean"]) for x in rs
                     if x["val"].get("expert_load_max_over_mean")]
            lines.append(
                f"| {r['name']} | {len(rs)} | {_agg([x['val']['top1'] for x in rs])} | "
                f"{_agg([x['val']['top5'] for x in rs])} | {_agg([x['train_eval_transform']['top1'] for x in rs])} | "
                f"{r['params_total'] / 1e6:.3f}M | {r['params_active'] / 1e6:.3f}M | {r['flops_measured'] / 1e6:.1f}M | "
                f"{sc_text} | {' / '.join(loads) if loads else '-'} |")
        lines += ["", "Diagnostics (final logged values; the training loss includes the routing losses):", "",
                  ("| variant | final train loss | final val loss | val top-1 with oracle super-class routing | "
                  "routing specialization per MoE layer (seed 42) | expert load entropy (seed 42) |"),
                  "|---|---|---|---|---|---|"]
        for rs in cls.values():
            lines.append(
                f"| {rs[0]['name']} | {_agg([x['final_train_loss'] for x in rs], '{:.2f}')} | "
                f"{_agg([x['final_eval_loss'] for x in rs], '{:.2f}')} | "
                f"{_agg([x['val'].get('top1_oracle_superclass_routing') for x in rs])} | "
                f"{_layer_stat(rs[0], 'specialization')} | {_layer_stat(rs[0], 'load_entropy')} |")
        lines.append("")
    seg = _by_variant(results["segmentation"])
    if seg:
        lines += [("| variant | seeds | mIoU (final) | mIoU (mean of last 3 epochs) | pixel acc | params total | params active | FLOPs/img (measured) | "
                  "routing specialization per MoE layer (seed 42) | expert load entropy per MoE layer (seed 42) |"),
                  "|---|---|---|---|---|---|---|---|---|---|"]
        names = None
        for rs in seg.values():
            r = rs[0]
            last3 = [float(np.mean([h["eval_mean_iou"] for h in x["eval_history"][-3:]])) for x in rs]
            lines.append(f"| {r['name']} | {len(rs)} | {_agg([x['eval']['eval_mean_iou'] for x in rs])} | {_agg(last3)} | "
                         f"{_agg([x['eval']['eval_overall_accuracy'] for x in rs])} | "
                         f"{r['params_total'] / 1e6:.3f}M | {r['params_active'] / 1e6:.3f}M | "
                         f"{r['flops_measured'] / 1e6:.1f}M | {_layer_stat(r, 'specialization')} | "
                         f"{_layer_stat(r, 'load_entropy')} |")
            names = [k[len("eval_iou_"):] for k in r["eval"] if k.startswith("eval_iou_")]
        lines += ["", "Per-class IoU (mean over seeds):", "", "| variant | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for rs in seg.values():
            lines.append(f"| {rs[0]['name']} | " + " | ".join(
                f"{np.mean([x['eval'][f'eval_iou_{n}'] for x in rs]):.1%}" for n in names) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
