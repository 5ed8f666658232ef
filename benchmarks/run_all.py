"""Run every speed / memory benchmark (each in a fresh process) and write benchmarks/RESULTS.md.

    python benchmarks/run_all.py            # full run, about 10-15 minutes on a quiet 2-core machine
    python benchmarks/run_all.py --quick    # smoke run, a few minutes, noisy figures
    python benchmarks/run_all.py --only inference moe_layer
    python benchmarks/run_all.py --gather   # rewrite RESULTS.md from benchmarks/results/ (after bench_mobile.py)
    BENCH_THREADS=1 python benchmarks/run_all.py   # pin torch to one thread on a shared machine

JSON results and per-benchmark markdown go to benchmarks/results/; RESULTS.md gathers the markdown and a goals
table. `bench_export.py` (ONNX / torch.export), `bench_mobile.py` (batch 1, every runtime) and `bench_quantization.py`
(int8 accuracy) are not part of this run; the last results of the latter two are gathered into RESULTS.md.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BENCHES = {  # name -> (script, result file stem)
    "inference": ("bench_inference.py", "inference"),
    "moe_layer": ("bench_moe_layer.py", "moe_layer"),
    "train": ("bench_train.py", "train_step"),
    "memory": ("bench_memory.py", "memory"),
    "compile": ("bench_compile.py", "compile"),
    "small_experts": ("bench_small_experts.py", "small_experts"),
}

# Run on their own (they need the onnx / executorch extras and a quiet machine); their last results are gathered.
SEPARATE_RUNS = {
    "mobile": "python benchmarks/bench_mobile.py",
    "quantization": "python benchmarks/bench_quantization.py",
}


def goals_table() -> str:
    def load(stem):
        path = RESULTS / f"{stem}.json"
        return json.loads(path.read_text()) if path.exists() else None

    rows = []
    inf, train, comp = load("inference"), load("train_step"), load("compile")
    if inf:
        g = inf["goals"]
        rows.append(("image routing / dense ViT throughput, batch 32", ">= 0.97", g["image_vs_dense_batch32"]))
        rows.append(("image routing / dense ViT throughput, batch 1", ">= 0.97", g["image_vs_dense_batch1"]))
        rows.append(("token routing (E=8, k=2, all blocks) / ViT MLP 1536, batch 32", ">= 0.85",
                     g["token_vs_dense2x_batch32"]))
        if "token_vs_dense2x_batch1" in g:
            rows.append(("token routing (E=8, k=2, all blocks) / ViT MLP 1536, batch 1", ">= 0.80",
                         g["token_vs_dense2x_batch1"]))
            rows.append(("expert choice / ViT MLP 1536 per FLOP, batch 32", ">= 0.85", g["expert_choice_per_flop_batch32"]))
            rows.append(("Soft MoE / ViT MLP 1536 per FLOP, batch 32", ">= 0.85", g["soft_per_flop_batch32"]))
        rows.append(("Mobile V-MoE-Tiny eager, fraction of matmul peak, batch 32", ">= 0.70",
                     g["eager_fraction_of_peak_batch32"]))
    if comp and "32" in comp.get("image", {}):
        frac = comp["image"]["32"]["fraction_of_peak"]
        rows.append(("Mobile V-MoE-Tiny compiled, fraction of matmul peak, batch 32", ">= 0.70",
                     {"value": frac, "met": frac >= 0.70}))
    if train:
        rows.append(("image routing train step / dense", "<= 1.10", train["goals"]["image_train_step_vs_dense"]))
    mobile = load("mobile")
    if mobile:
        ratios = {rt: row["latency"]["ratio_moe_over_dense"]["median"] for rt, row in mobile["runtimes"].items()
                  if "ratio_moe_over_dense" in row.get("latency", {})}
        if ratios:
            worst = max(ratios, key=ratios.get)
            rows.append((f"Mobile V-MoE-Tiny / ViT-Tiny latency, batch 1, 1 thread, worst runtime ({worst})", "<= 1.03",
                         {"value": ratios[worst], "met": ratios[worst] <= 1.03}))
    lines = ["| goal | target | measured | status |", "|---|---|---|---|"]
    for name, target, g in rows:
        lines.append(f"| {name} | {target} | {g['value']:.3f} | {'met' if g['met'] else 'NOT met'} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", choices=list(BENCHES), default=None)
    parser.add_argument("--gather", action="store_true", help="run nothing, only rewrite RESULTS.md")
    args = parser.parse_args(argv)
    names = [] if args.gather else args.only or list(BENCHES)
    timings = {}
    for name in names:
        script, _ = BENCHES[name]
        cmd = [sys.executable, str(HERE / script)] + (["--quick"] if args.quick else [])
        print(f"=== {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=HERE)
        timings[name] = time.perf_counter() - start
    sections = []
    for stem in [stem for _, stem in BENCHES.values()] + list(SEPARATE_RUNS):
        md = RESULTS / f"{stem}.md"
        if md.exists():
            sections.append(md.read_text().strip())
    text = "\n\n".join([
        "# Benchmark results",
        "Written by `python benchmarks/run_all.py`" + (" --quick (smoke run: noisy figures)" if args.quick else "")
        + ". Method and discussion: the README (Performance). Throughput ratios are ours / dense (higher is better); time "
          "ratios are MoE / dense (lower is better); all are medians of per-round ratios of interleaved runs.",
        "## Goals",
        goals_table(),
        *sections,
    ])
    (HERE / "RESULTS.md").write_text(text + "\n")
    print(f"wrote {HERE / 'RESULTS.md'} ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")


if __name__ == "__main__":
    main()
