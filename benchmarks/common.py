"""Shared helpers for the speed / memory benchmarks: the compared models, machine info, interleaved timing,
matmul peak, analytic FLOPs, and result writing (JSON + a markdown summary in benchmarks/results/).

Timing method (the machine may be shared and noisy): the two models of a comparison run alternately in one process,
each pair (ours, reference) is timed back to back, and the reported ratio is the median of the per-pair ratios.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REPO = HERE.parent
if str(REPO / "src") not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

import transformers  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import hf_vmoe  # noqa: E402
from hf_vmoe import VMoEConfig, VMoEForImageClassification  # noqa: E402
from hf_vmoe.recipes.flops import count_flops  # noqa: E402

hf_logging.set_verbosity_error()

if os.environ.get("BENCH_THREADS"):  # e.g. BENCH_THREADS=1 on a machine shared with other jobs
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
# BENCH_DEVICE=cuda BENCH_DTYPE=bfloat16 runs the speed benchmarks on a GPU (memory uses CPU RSS: CPU only)
DEVICE = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("BENCH_DTYPE", "float32"))

NUM_LABELS = 1000
IMAGE_SIZE = 224


# ---------------------------------------------------------------------------------------------------------------
# The compared models
# ---------------------------------------------------------------------------------------------------------------


def image_config(**overrides) -> VMoEConfig:
    """Mobile V-MoE-Tiny: ViT-Tiny (12 x 192, 3 heads, MLP 768), image routing, 10 experts, k=1, last 2 blocks."""
    kwargs = dict(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, num_labels=NUM_LABELS,
        routing_level="image", num_experts=10, num_experts_per_tok=1, moe_layers="last:2",
    )
    kwargs.update(overrides)
    return VMoEConfig(**kwargs)


def token_config(**overrides) -> VMoEConfig:
    """Token routing in every block: 8 experts of width 768, k=2 (active FLOPs of a dense MLP 1536)."""
    kwargs = dict(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, num_labels=NUM_LABELS,
        routing_level="token", num_experts=8, num_experts_per_tok=2, moe_layers="all",
    )
    kwargs.update(overrides)
    return VMoEConfig(**kwargs)


def dense_vit(intermediate_size: int = 768) -> ViTForImageClassification:
    """transformers' ViT with the same dims (sdpa attention, like ours)."""
    config = ViTConfig(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=intermediate_size,
        num_labels=NUM_LABELS, image_size=IMAGE_SIZE, patch_size=16,
    )
    return ViTForImageClassification(config).to(DEVICE, DTYPE)


def vmoe(config: VMoEConfig, experts_implementation: str | None = None) -> VMoEForImageClassification:
    torch.manual_seed(0)
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    model = VMoEForImageClassification(config)
    if experts_implementation is not None:
        model.set_experts_implementation(experts_implementation)
    return model.to(DEVICE, DTYPE)  # the router computes its logits in float32 whatever the dtype


def pixels(batch: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    return x.to(DEVICE, DTYPE)


# ---------------------------------------------------------------------------------------------------------------
# Analytic FLOPs (multiply-add = 2 FLOPs), per image, forward
# ---------------------------------------------------------------------------------------------------------------


def vmoe_flops(config: VMoEConfig, batch_size: int = 32) -> int:
    """Active forward FLOPs per image of a VMoE config (`hf_vmoe.recipes.flops`; batch size matters for expert choice)."""
    return count_flops(config, batch_size=batch_size).flops


def vit_flops(mlp: int = 768) -> int:
    """Forward FLOPs per image of transformers' ViT with these dims: our dense twin counts the same matmuls."""
    return count_flops(image_config(moe_layers="none", intermediate_size=mlp)).flops


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved(fns: dict, reps: int, warmup: int = 1, min_seconds: float = 0.0) -> dict:
    """Run every callable in `fns` once per round, `reps` rounds (after `warmup` rounds), in a new random order each
    round (seeded). Returns {name: [seconds per round]}.

    A fixed alternation (ABC, CBA, ...) always runs the same model after the same neighbour and runs two models twice
    in a row; on this 2-core CPU that biased ratios by up to 10% at batch 32 (which model came after which changes
    what the allocator and the caches hold), so the order is shuffled."""
    names = list(fns)
    rng = random.Random(0)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    start = time.perf_counter()
    round_idx = 0
    while round_idx < reps or time.perf_counter() - start < min_seconds:
        order = rng.sample(names, len(names))
        for name in order:
            times[name].append(timed(fns[name]))
        round_idx += 1
    return times


def ratio_stats(ours: list, ref: list) -> dict:
    """Throughput ratio ours / reference = t_ref / t_ours per pair; median and quartiles."""
    ratios = sorted(r / o for o, r in zip(ours, ref))
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return {"median": statistics.median(ratios), "q1": q[0], "q3": q[2], "pairs": len(ratios)}


def summary(times: list) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "n": len(times)}


def matmul_peak(size: int = 2048, reps: int = 10) -> dict:
    """Measured matmul peak of this machine in the benchmark dtype (fp32 by default; all threads torch uses): best
    GFLOP/s of `reps` square matmuls."""
    if DEVICE.type == "cuda":
        size = max(size, 8192)
    a = torch.randn(size, size, dtype=DTYPE, device=DEVICE)
    b = torch.randn(size, size, dtype=DTYPE, device=DEVICE)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(reps))
    return {"size": size, "gflops": 2 * size**3 / best / 1e9, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------------------------
# Machine info and result files
# ---------------------------------------------------------------------------------------------------------------


def machine_info() -> dict:
    model_name = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
            elif line.startswith("Flags:") and "avx2" in line.split():  # x86: int8 kernels differ with VNNI
                model_name += " (VNNI)" if "vnni" in line else " (no VNNI)"
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=False).stdout.strip()
        commit = commit + ("+dirty" if dirty else "")
    except OSError:
        commit = "unknown"
    info = {
        "cpu": model_name,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_vmoe": hf_vmoe.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "git_commit": commit,
    }
    try:
        load = os.getloadavg()
        info["loadavg_1m"] = round(load[0], 2)
    except OSError:
        pass
    info["device"], info["dtype"] = str(DEVICE), str(DTYPE).replace("torch.", "")
    if DEVICE.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(DEVICE)
    return info


def machine_line(info: dict) -> str:
    device = f"{info['gpu']} ({info['dtype']}), host " if "gpu" in info else f"{info.get('dtype', 'float32')}, "
    return (device + f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), torch {info['torch']}, "
            f"transformers {info['transformers']}, {info['date']}, commit {info['git_commit']}, "
            f"load {info.get('loadavg_1m', '?')}")


def write_results(name: str, data: dict, markdown: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(markdown)
    print(f"wrote {path}")
    return path


def md_table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(c) for c in row) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def goal(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return ("met" if ok else "NOT met") + f" ({'>=' if higher_is_better else '<='} {target})"
