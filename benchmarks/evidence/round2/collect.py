#!/usr/bin/env python
"""Collect the round-2 runs (run_round2.py) into results.json, tables.md and plots, by PROTOCOL.md's analysis.

For every finished training of the plan it reads the run's own final metrics (all_results.json / eval_results.json)
and the wall time of each attempt from $EVD2/runs_log.json; for classification it reloads the model and measures on
the 10,000 validation images top-1 / top-5, the router's super-class accuracy (router deciding alone), top-1 with
oracle super-class routing (a diagnostic, uses the label), expert load per router (max share x E, entropy), and,
for a learned router, its agreement with the same seed's confusion super-classes after the best matching. Then:

* per variant: mean and every seed; per comparison (variant vs its baseline, same seed = same data order and
  augmentation): the paired differences, their mean, sample std, standard error and the pre-registered verdict
  (PROTOCOL.md: GAIN / LOSS only with >= 3 pairs, every difference of the same sign and |mean| > 2 x std / sqrt(n));
* routing specialisation per MoE layer (examples/analyze_routing.py) on the seed-42 model of every MoE variant;
* plots: validation curves per group, the paired differences, the scouting run's training-accuracy curve.

    python benchmarks/evidence/round2/collect.py [--evd2 /tmp/evd2] [--out benchmarks/evidence/round2]
        [--groups A,B,C] [--skip_routing] [--skip_reload] [--merge]
    # new seeds on a machine without the earlier run folders: --merge keeps what --out already holds
    # test on the timing probes:  --groups probe --out /tmp/evd2/collect_probe
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run_round2 as rr  # noqa: E402  (the plan: names, groups, seeds, what)


def _round1():
    """benchmarks/evidence/collect.py (round 1): its evaluation helpers are reused as they are."""
    spec = importlib.util.spec_from_file_location("collect_round1", HERE.parent / "collect.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# variant -> the variant it is compared with (same seed); the first arm named is the baseline of its group
BASELINES = {
    "A-moe-conf": "A-dense", "A-moe-learned": "A-dense", "A-moe-wordnet": "A-dense",
    "B-moe-conf": "B-dense", "B-moe-learned": "B-dense", "B-token-shared": "B-dense", "B-moe-conf-exact": "B-dense",
    "C-token": "C-dense-cont", "C-token-shared": "C-dense-cont", "C-upernet-token": "C-upernet-dense",
    "probe-moe-router": "probe-dense",
}
EXTRA_PAIRS = [("A-moe-wordnet", "A-moe-conf"), ("B-moe-conf", "B-moe-learned")]
GAIN_RULE = "GAIN/LOSS: n >= 3 pairs, all differences of one sign, |mean| > 2 * std / sqrt(n); else no decision"
ROUND = "round 2"      # plot titles
SC_STEP = "A-sc"       # the super-class step whose groups a learned router is matched against


def variant_of(name: str) -> str:
    return re.sub(r"-s\d+$", "", name)


def wall_times(log: dict) -> dict:
    out: dict = {}
    for rec in log.get("runs", []):
        entry = out.setdefault(rec["name"], {"attempts": 0, "wall_s": 0.0, "status": None, "commands": []})
        entry["attempts"] += 1
        entry["wall_s"] += rec.get("wall_s") or 0.0
        entry["status"] = rec.get("status")
        entry["commands"].append(rec.get("command"))
    return out


def history(run_dir: Path) -> list:
    path = run_dir / "trainer_state.json"
    return json.loads(path.read_text())["log_history"] if path.is_file() else []


def paired(values_a: dict, values_b: dict) -> dict | None:
    """values_x: seed -> metric. Differences a - b over the common seeds."""
    seeds = sorted(set(values_a) & set(values_b))
    if not seeds:
        return None
    d = np.array([values_a[s] - values_b[s] for s in seeds], dtype=float)
    n = len(d)
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    se = sd / math.sqrt(n) if n > 1 else float("nan")
    verdict = "no decision"
    if n < 3:
        verdict = f"scouting (n={n}), not decided"
    elif (d > 0).all() and d.mean() > 2 * se:
        verdict = "GAIN"
    elif (d < 0).all() and -d.mean() > 2 * se:
        verdict = "LOSS"
    return {"seeds": seeds, "diffs": d.round(5).tolist(), "mean": float(d.mean()), "std": sd, "se": se, "n": n,
            "verdict": verdict}


def run_routing(run_dir: Path, out_dir: Path, data_dir: str, extra: list) -> dict | None:
    script = rr.SCRIPTS_ROOT / "examples/analyze_routing.py"
    cmd = [sys.executable, str(script), str(run_dir), "--data_dir", data_dir, "--output_dir", str(out_dir), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=rr.SCRIPTS_ROOT, check=False)
    if proc.returncode:
        print(proc.stderr[-1500:], file=sys.stderr)
        return None
    report = json.loads((out_dir / "report.json").read_text())
    return {"command": " ".join(cmd[1:]),
            "layers": {k: {m: v for m, v in d.items() if isinstance(v, (int, float))}
                       for k, d in report["layers"].items()},
            "recommendation": report.get("recommendation")}


def measure_classifier(r1, run_dir: Path, superclasses_file: Path | None) -> dict:
    import torch

    from hf_vmoe import VMoEForImageClassification, VMoEImageProcessor

    model = VMoEForImageClassification.from_pretrained(run_dir)
    processor = VMoEImageProcessor.from_pretrained(run_dir)
    val = r1.evaluate_classifier(model, rr.TIN / "validation", processor)
    routes, labels = val.pop("image_routes", None), val.pop("image_route_labels", None)
    if model.config.superclass_ids is not None:
        val["top1_oracle_superclass_routing"] = r1.oracle_routing_top1(model, rr.TIN / "validation", processor)
    if routes is not None and superclasses_file is not None and superclasses_file.is_file():
        ids = json.loads(superclasses_file.read_text()).get("superclass_ids")
        if ids is not None and model.config.num_experts == max(ids) + 1:
            val["router_matched_superclass_accuracy"] = r1.matched_superclass_accuracy(
                routes, labels, ids, model.config.num_experts)
    cost = r1.cost(model, "classification")
    del model
    torch.set_num_threads(1)
    return {"val": val, **cost}


def merged_log(previous_log: dict | None) -> dict:
    """$EVD2/runs_log.json, after the records of an earlier collection (--merge) that it does not hold."""
    log = json.loads(rr.LOG.read_text()) if rr.LOG.is_file() else {"runs": []}
    if previous_log:
        seen = {(r["name"], r.get("start")) for r in log["runs"]}
        log = {**log, "runs": [r for r in previous_log.get("runs", []) if (r["name"], r.get("start")) not in seen]
               + log["runs"]}
    return log


def collect(args, previous: dict | None = None, log: dict | None = None) -> dict:
    """previous: an earlier results.json (--merge); its runs that are not on this machine are kept as they are."""
    r1 = None if args.skip_reload else _round1()
    log = log if log is not None else merged_log(None)
    walls = wall_times(log)
    groups = args.groups.split(",")
    plan = [r for r in rr.plan() if r.group in groups]
    results = {"choices": rr.load_choices() or (previous or {}).get("choices"), "gain_rule": GAIN_RULE,
               "runs": {}, "steps": {}}
    for run in plan:
        if not rr.is_done(run):
            continue
        if run.kind == "step":
            results["steps"][run.name] = {"output": run.output, **walls.get(run.name, {})}
            continue
        if run.kind == "scout":
            continue
        out = {"name": run.name, "variant": variant_of(run.name), "group": run.group, "tier": run.tier,
               "seed": run.seed, "what": run.what, **walls.get(run.name, {})}
        res = json.loads((run.out_dir / "all_results.json").read_text())
        out["final"] = {k: v for k, v in res.items() if not k.startswith("eval_iou_") and not k.startswith("eval_accuracy_")}
        hist = history(run.out_dir)
        out["eval_history"] = [{k: v for k, v in h.items() if k in ("epoch", "eval_loss", "eval_accuracy",
                                                                  "eval_mean_iou")} for h in hist if "eval_loss" in h]
        out["train_runtime_s"] = res.get("train_runtime")
        is_seg = "eval_mean_iou" in res
        if is_seg:  # primary metric (PROTOCOL.md): the mean of the last 3 per-epoch mIoUs (epoch-to-epoch noise)
            out["per_class_iou"] = {k[len("eval_iou_"):]: v for k, v in res.items() if k.startswith("eval_iou_")}
            ious = [h["eval_mean_iou"] for h in out["eval_history"] if "eval_mean_iou" in h]
            out["mean_iou_last3"] = float(np.mean(ious[-3:])) if ious else res["eval_mean_iou"]
            out["metric"] = out["mean_iou_last3"]
        else:
            out["metric"] = res.get("eval_accuracy")
            if r1 is not None:
                sc = rr.RUNS / f"{SC_STEP}-s{run.seed}" / "superclasses.json"
                out.update(measure_classifier(r1, run.out_dir, sc))
        cfg = json.loads((run.out_dir / "config.json").read_text())
        cfg = cfg.get("backbone_config", cfg)
        moe = bool(cfg.get("moe_layers"))
        if moe and not args.skip_routing and (run.seed in (42, 0)):
            data = str(rr.TIN / "validation") if not is_seg else str(rr.DATA / "camvid-ade")
            extra = ["--max_samples", "2000"] if not is_seg else ["--reduce_labels"]
            out["routing_analysis"] = run_routing(run.out_dir, args.out / f"routing_{run.name}", data, extra)
        results["runs"][run.name] = out
        print("collected", run.name, out["metric"], flush=True)
    if previous:  # runs collected earlier, on a machine whose run folders are gone
        planned = {r.name for r in plan}
        for key in ("runs", "steps"):
            for name, rec in previous.get(key, {}).items():
                if name in planned and name not in results[key]:
                    results[key][name] = rec
        results["runs"] = {r.name: results["runs"][r.name] for r in plan if r.name in results["runs"]}

    # per variant and paired comparisons
    by_variant: dict = {}
    for r in results["runs"].values():
        by_variant.setdefault(r["variant"], {})[r["seed"]] = r
    results["variants"] = {v: {"seeds": sorted(rs), "metric": [rs[s]["metric"] for s in sorted(rs)],
                               "mean": float(np.mean([rs[s]["metric"] for s in rs]))} for v, rs in by_variant.items()}
    comps = [(v, b) for v, b in BASELINES.items() if v in by_variant and b in by_variant]
    comps += [(a, b) for a, b in EXTRA_PAIRS if a in by_variant and b in by_variant]
    results["comparisons"] = []
    for a, b in comps:
        for metric in ("metric", "top5"):
            va = {s: (r["metric"] if metric == "metric" else (r.get("val") or {}).get("top5"))
                  for s, r in by_variant[a].items()}
            vb = {s: (r["metric"] if metric == "metric" else (r.get("val") or {}).get("top5"))
                  for s, r in by_variant[b].items()}
            va = {s: x for s, x in va.items() if x is not None}
            vb = {s: x for s, x in vb.items() if x is not None}
            p = paired(va, vb)
            if p:
                results["comparisons"].append({"variant": a, "baseline": b, "metric": metric, **p})
    return results


# --------------------------------------------------------------------------------------------------------------------
# Tables and plots
# --------------------------------------------------------------------------------------------------------------------


def pct(x, digits=1):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def agg(values, fmt=pct):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(float(np.mean(values)))} ({' / '.join(fmt(v) for v in values)})"


def tables(results: dict) -> str:
    lines = []
    ch = results.get("choices") or {}
    if ch:
        lines += [f"Epoch choice: epochs_a = {ch.get('epochs_a')}, m_b = {ch.get('m_b')}, plateau at epoch "
                  f"{ch.get('plateau_epoch')} ({ch.get('rule')}).", ""]
    by_group: dict = {}
    for r in results["runs"].values():
        by_group.setdefault(r["group"], {}).setdefault(r["variant"], []).append(r)
    for group, variants in by_group.items():
        seg = any("per_class_iou" in r for rs in variants.values() for r in rs)
        lines += [f"### Group {group}", ""]
        if seg:
            lines += ["| variant | seeds | mIoU % (final) | mIoU % (last 3 evals, primary) | pixel acc % | wall min (sum) |",
                      "|---|---|---|---|---|---|"]
        else:
            lines += ["| variant | seeds | val top-1 % | val top-5 % | router super-class acc % | oracle-routing top-1 % "
                      "| learned router vs super-classes (matched) % | expert load max/mean | params total / active | "
                      "wall min (sum) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for v, rs in variants.items():
            rs = sorted(rs, key=lambda r: r["seed"])
            seeds = "/".join(str(r["seed"]) for r in rs)
            wall = sum(r.get("wall_s") or 0 for r in rs) / 60
            if seg:
                lines.append(f"| {v} | {seeds} | {agg([r['final']['eval_mean_iou'] for r in rs])} | "
                             f"{agg([r.get('mean_iou_last3') for r in rs])} | "
                             f"{agg([r['final'].get('eval_overall_accuracy') for r in rs])} | {wall:.0f} |")
            else:
                val = [r.get("val") or {} for r in rs]
                loads = " / ".join(", ".join(f"{x:.2f}" for x in (v_.get("expert_load_max_over_mean") or [])) or "-"
                                   for v_ in val)
                r0 = rs[0]
                params = (f"{r0['params_total'] / 1e6:.3f}M / {r0['params_active'] / 1e6:.3f}M"
                          if "params_total" in r0 else "-")
                lines.append(
                    f"| {v} | {seeds} | {agg([r['metric'] for r in rs])} | {agg([x.get('top5') for x in val])} | "
                    f"{agg([x.get('router_superclass_accuracy') for x in val])} | "
                    f"{agg([x.get('top1_oracle_superclass_routing') for x in val])} | "
                    f"{agg([x.get('router_matched_superclass_accuracy') for x in val])} | {loads} | {params} | "
                    f"{wall:.0f} |")
        lines.append("")
        spec = [(r["name"], r.get("routing_analysis")) for rs in variants.values() for r in rs
                if r.get("routing_analysis")]
        if spec:
            lines += ["Routing specialisation per MoE layer (I(class; expert) / H(expert)), load entropy:", ""]
            for name, ra in spec:
                layers = ra.get("layers") or {}
                lines.append(f"- {name}: " + ", ".join(
                    f"L{k}: {d.get('specialization', float('nan')):.2f} (load entropy "
                    f"{d.get('load_entropy', float('nan')):.2f})" for k, d in sorted(layers.items(),
                                                                                    key=lambda kv: int(kv[0]))))
            lines.append("")
    comps = results.get("comparisons") or []
    if comps:
        lines += ["### Paired differences (variant - baseline, same seed; points)", "",
                  f"Verdict rule (pre-registered): {GAIN_RULE}.", "",
                  "| variant | baseline | metric | n | per seed | mean | std | 2 x SE | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in comps:
            per = " / ".join(f"{s}: {100 * d:+.2f}" for s, d in zip(c["seeds"], c["diffs"]))
            lines.append(f"| {c['variant']} | {c['baseline']} | {c['metric']} | {c['n']} | {per} | "
                         f"{100 * c['mean']:+.2f} | {pct(c['std'], 2)} | {pct(2 * c['se'], 2)} | {c['verdict']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plots(results: dict, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_group: dict = {}
    for r in results["runs"].values():
        by_group.setdefault(r["group"], []).append(r)
    styles = {42: "-", 43: "--", 44: ":", 0: "-"}
    for group, rs in by_group.items():
        fig, ax = plt.subplots(figsize=(8, 5))
        variants = sorted({r["variant"] for r in rs})
        for i, v in enumerate(variants):
            for r in sorted((r for r in rs if r["variant"] == v), key=lambda r: r["seed"]):
                key = "eval_mean_iou" if "per_class_iou" in r else "eval_accuracy"
                pts = [(h["epoch"], h[key]) for h in r["eval_history"] if key in h]
                if pts:
                    x, y = zip(*pts)
                    ax.plot(x, y, styles.get(r["seed"], "-."), marker="o", ms=3, color=f"C{i}",
                            label=v if r["seed"] == min(x_["seed"] for x_ in rs if x_["variant"] == v) else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation mIoU" if group == "C" else "validation top-1")
        ax.set_title(f"{ROUND}, group {group} (seed 42 solid, 43 dashed, 44 dotted)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"curves_{group}.png", dpi=110)
        plt.close(fig)
    comps = [c for c in results.get("comparisons") or [] if c["metric"] == "metric"]
    if comps:
        fig, ax = plt.subplots(figsize=(8, 0.5 * len(comps) + 1.5))
        for i, c in enumerate(comps):
            ax.scatter([100 * d for d in c["diffs"]], [i] * len(c["diffs"]), color="C0", s=18, zorder=3)
            if c["n"] > 1:
                ax.errorbar(100 * c["mean"], i, xerr=200 * c["se"], fmt="s", color="C3", capsize=4, zorder=4)
            else:
                ax.scatter([100 * c["mean"]], [i], marker="s", color="C3", zorder=4)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(comps)))
        ax.set_yticklabels([f"{c['variant']} - {c['baseline']} ({c['verdict']})" for c in comps], fontsize=8)
        ax.set_xlabel("paired difference, points (dots: seeds; square: mean +- 2 SE)")
        fig.tight_layout()
        fig.savefig(out / "paired_differences.png", dpi=110)
        plt.close(fig)
    curve = (results.get("choices") or {}).get("scout_curve_train_accuracy")
    if curve:
        fig, ax = plt.subplots(figsize=(7, 4))
        x, y = zip(*curve)
        ax.plot(x, [100 * v for v in y], marker="o", ms=3)
        e = results["choices"].get("plateau_epoch")
        if e:
            ax.axvline(e, color="C3", ls="--", label=f"stops rising: epoch {e}")
            ax.legend()
        ax.set_xlabel("epoch (constant learning rate)")
        ax.set_ylabel("training accuracy % (2,000 train images, eval transform)")
        ax.set_title("A-scout: the epoch choice")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "scout_curve.png", dpi=110)
        plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--groups", default="A,B,C")
    parser.add_argument("--skip_routing", action="store_true")
    parser.add_argument("--skip_reload", action="store_true", help="only the runs' own metrics (fast)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the runs (and log records) of the results.json / runs_log.json already in --out "
                             "that are not under $EVD2: add new seeds without the earlier run folders")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    previous = previous_log = None
    if args.merge:
        if not (args.out / "results.json").is_file():
            parser.error(f"--merge: no earlier results.json in {args.out}")
        previous = json.loads((args.out / "results.json").read_text())
        if (args.out / "runs_log.json").is_file():
            previous_log = json.loads((args.out / "runs_log.json").read_text())
    log = merged_log(previous_log)
    results = collect(args, previous, log)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "tables.md").write_text(tables(results))
    plots(results, args.out)
    (args.out / "runs_log.json").write_text(json.dumps(log, indent=1))
    if rr.CHOICES.is_file() and not args.merge:
        shutil.copy(rr.CHOICES, args.out / "choices.json")
    print(tables(results))


if __name__ == "__main__":
    main()
