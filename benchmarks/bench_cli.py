"""Wall time of `hf-vmoe --help` and of each verb's `--help`, each a fresh process, against `import hf_vmoe`.

    python benchmarks/bench_cli.py               # 7 runs of each, median; writes benchmarks/results/cli.{json,md}
    python benchmarks/bench_cli.py --runs 15

Each command runs `python -m hf_vmoe_cli ...` (what the `hf-vmoe` console script runs) with this checkout's src/
first on the path. The `import hf_vmoe` row is what every command paid when the console script lived inside the
package: its `__init__` registers the Auto classes, which imports torch and transformers' modeling code.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from common import REPO, machine_info, machine_line, md_table, write_results

VERBS = ["demo", "presets", "flops", "analyze", "convert-vmoe", "export", "card", "superclasses"]


def wall_times(args: list[str], runs: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs of each command (the median is reported)")
    args = parser.parse_args(argv)
    commands = {"hf-vmoe --help": ["-m", "hf_vmoe_cli", "--help"]}
    commands |= {f"hf-vmoe {verb} --help": ["-m", "hf_vmoe_cli", verb, "--help"] for verb in VERBS}
    commands["python -c 'import hf_vmoe' (for comparison)"] = ["-c", "import hf_vmoe"]
    results = {}
    for name, command in commands.items():
        times = wall_times(command, args.runs)
        results[name] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
        print(f"{name}: median {results[name]['median_s']:.3f} s", flush=True)
    info = machine_info()
    rows = [(name, f"{r['median_s']:.3f}", f"{r['min_s']:.3f} - {r['max_s']:.3f}") for name, r in results.items()]
    helps = [r["median_s"] for name, r in results.items() if name.startswith("hf-vmoe")]
    markdown = "\n\n".join([
        "# `hf-vmoe --help` wall time",
        f"Machine: {machine_line(info)}. Each command is a fresh process, run {args.runs} times; seconds.",
        md_table(["command", "median (s)", "min - max (s)"], rows),
        f"Slowest `--help`: {max(helps):.3f} s (goal: well under 1 s). Produced by `python benchmarks/bench_cli.py`.",
    ])
    write_results("cli", {"machine": info, "runs": args.runs, "results": results}, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
