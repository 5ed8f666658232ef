#!/usr/bin/env python
"""Collect the round-3 runs (run_round3.py) into results.json, tables.md and plots: round 2's collector
(`../round2/collect.py`) pointed at this round's root and plan, plus what PROTOCOL.md adds: training accuracy on
the 2,000 `trainprobe/` images beside validation accuracy, the machine facts of every run, and the drift rule (a
GAIN / LOSS must also exceed how much the paired difference moves when seed 42 is re-run on another machine or
instruction set, read from `--drift_root`).

    python benchmarks/evidence/round3/collect.py [--root /work/evd3] [--drift_root /work/evd3-drift]
        [--groups A3,B3,C] [--skip_routing] [--skip_reload] [--out benchmarks/evidence/round3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run_round3 as r3  # noqa: E402  (imports round 2's runner as r3.r2)


def _round2_collector():
    spec = importlib.util.spec_from_file_location("collect_round2", HERE.parent / "round2" / "collect.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


c2 = _round2_collector()
c2.BASELINES.update({
    "A3-moe-conf": "A3-dense", "A3-moe-lfb": "A3-dense",
    "B3-moe-conf": "B3-dense", "B3-moe-conf-drop": "B3-dense", "B3-token-shared": "B3-dense",
})
c2.EXTRA_PAIRS += [("A3-moe-conf", "A3-moe-lfb"), ("B3-moe-conf-drop", "B3-moe-conf")]
c2.ROUND, c2.SC_STEP = "round 3", "A3-sc"
DRIFT_RULE = ("and |mean| > drift, the move of the seed-42 paired difference when both arms are re-run from the "
              "same commit on another machine or instruction set")
c2.GAIN_RULE = f"{c2.GAIN_RULE}, {DRIFT_RULE}"  # the tables state the rule in force


def train_accuracy(results: dict) -> None:
    """Top-1 of every classifier on `trainprobe/` (2,000 of its training images, eval transform)."""
    r1 = c2._round1()
    from hf_vmoe import VMoEForImageClassification, VMoEImageProcessor

    for name, run in results["runs"].items():
        if "per_class_iou" in run:
            continue
        run_dir = r3.r2.RUNS / name
        model = VMoEForImageClassification.from_pretrained(run_dir)
        run["train_top1"] = r1.evaluate_classifier(model, r3.r2.TIN / "trainprobe",
                                                   VMoEImageProcessor.from_pretrained(run_dir))["top1"]


def machine_facts(log: dict) -> dict:
    """Run name -> the CPU, capability, versions and commit of its last attempt."""
    return {rec["name"]: {**rec.get("machine", {}), "commit": (rec.get("git") or {}).get("commit")}
            for rec in log.get("runs", []) if rec.get("machine")}


def apply_drift(results: dict, drift_results: dict | None) -> None:
    """drift = |d(seed 42, re-run) - d(seed 42, original)| per comparison; a GAIN / LOSS whose |mean| does not exceed
    it becomes "no decision (within drift)", one without a re-run "... (pending drift)"."""
    rerun = {}
    for r in (drift_results or {}).get("runs", {}).values():
        rerun.setdefault(r["variant"], {})[r["seed"]] = r["metric"]
    original = {}
    for r in results["runs"].values():
        original.setdefault(r["variant"], {})[r["seed"]] = r["metric"]
    for c in results.get("comparisons", []):
        if c["metric"] != "metric":
            continue
        a, b = rerun.get(c["variant"], {}), rerun.get(c["baseline"], {})
        if 42 in a and 42 in b and 42 in original.get(c["variant"], {}) and 42 in original.get(c["baseline"], {}):
            c["drift"] = abs((a[42] - b[42]) - (original[c["variant"]][42] - original[c["baseline"]][42]))
        decided = c["verdict"] in ("GAIN", "LOSS")
        if decided and "drift" not in c:
            c["verdict"] += " (pending drift)"
        elif decided and abs(c["mean"]) <= c["drift"]:
            c["verdict"] = "no decision (within drift)"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("EVD3", "/work/evd3")))
    parser.add_argument("--drift_root", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--groups", default="A3,B3,C")
    parser.add_argument("--skip_routing", action="store_true")
    parser.add_argument("--skip_reload", action="store_true", help="only the runs' own metrics (fast)")
    args = parser.parse_args()
    args.merge = False
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    drift = None
    if args.drift_root is not None:
        r3.r2.configure(args.drift_root, r3.plan)
        drift = c2.collect(argparse.Namespace(**{**vars(args), "skip_routing": True, "skip_reload": True}))
    r3.r2.configure(args.root, r3.plan)
    log = c2.merged_log(None)
    results = c2.collect(args, None, log)
    if not args.skip_reload:
        train_accuracy(results)
    results["machine"] = machine_facts(log)
    results["gain_rule"] = c2.GAIN_RULE
    apply_drift(results, drift)
    if drift is not None:
        results["drift_runs"] = {n: {"metric": r["metric"], "seed": r["seed"]} for n, r in drift["runs"].items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    text = c2.tables(results)
    extra = [f"- {n}: train top-1 {100 * r['train_top1']:.1f}% / validation {100 * r['metric']:.1f}%"
             for n, r in results["runs"].items() if "train_top1" in r]
    drifts = [f"- {c['variant']} vs {c['baseline']}: drift {100 * c['drift']:.2f} points (seed 42 re-run)"
              for c in results.get("comparisons", []) if "drift" in c]
    if extra:
        text += "\n### Training vs validation accuracy\n\n" + "\n".join(extra) + "\n"
    if drifts:
        text += "\n### Drift\n\n" + "\n".join(drifts) + "\n"
    (args.out / "tables.md").write_text(text)
    c2.plots(results, args.out)
    (args.out / "runs_log.json").write_text(json.dumps(log, indent=1))
    print(text)


if __name__ == "__main__":
    main()
