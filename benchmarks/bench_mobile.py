"""On-device style latency: Mobile V-MoE-Tiny vs transformers' dense ViT-Tiny, batch 1, one thread, every runtime.

    python benchmarks/bench_mobile.py                    # full run (about 10-15 minutes on 2 cores; needs the
                                                         # onnx and executorch extras)
    python benchmarks/bench_mobile.py --quick            # a smoke run: few rounds, noisy figures
    python benchmarks/bench_mobile.py --runtimes eager onnxruntime-fp32   # a subset

Models: `mobile-vmoe-tiny` (hf_vmoe.recipes.presets: ViT-Tiny 12 x 192, 224 px, 16 px patches, the last 2 MLPs replaced by
E=10 experts of the dense MLP's width, k=1 per image, one shared router) and `ViTForImageClassification` with the
same dims (transformers, sdpa attention): the same active size (MoE active FLOPs = dense + the router's 2 x 192 x 10).
Random weights (latency does not depend on them); the router weights are spread so the 8 benchmark images go to
different experts. int8 files are calibrated on random images here (accuracy is measured on real images by
bench_quantization.py).

Runtimes: PyTorch eager, torch.compile (inductor), ONNX Runtime float32 / int8 (dynamic, weights and experts int8),
ExecuTorch float32 / int8 (XNNPACK; PT2E static int8, experts weight-only int8).

Method: the files are exported once (their size on disk is reported; eager/compiled report the safetensors file).
Then, per runtime, one fresh process loads both models and runs each once per round on the same image, in a new
seeded random order each round (`common.interleaved`, as the other speed benchmarks), after warm-up: median
latency of each and the median of the per-round ratios MoE / dense. Peak memory: one more fresh process per
(runtime, model) that loads the model and runs 20 calls; its peak RSS (VmHWM, the kernel's per-process `ru_maxrss`
figure without the parent's pre-exec peak) and the increase over the same process just before loading (the runtime
libraries imported).
Machine, date and load average are recorded; the machine may be shared (timings noisy).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

RUNTIMES = ("eager", "compiled", "onnxruntime-fp32", "onnxruntime-int8", "executorch-fp32", "executorch-int8")
MODELS = ("mobile_vmoe_tiny", "vit_tiny")
GOAL_RATIO = 1.03


def _rss_mb() -> float:
    """Peak resident set of this process so far, MiB: VmHWM from /proc/self/status (Linux). `ru_maxrss` would
    carry the parent's peak into a freshly started child (Linux records the pre-exec memory's high-water mark in
    it), so it is only the fallback where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------------------------
# Parent: build models, export files, run one worker process per runtime
# ---------------------------------------------------------------------------------------------------------------


def build_models():
    import torch

    import common
    from hf_vmoe import VMoEForImageClassification
    from hf_vmoe.recipes.presets import get_preset

    torch.manual_seed(0)
    config = get_preset("mobile-vmoe-tiny", num_labels=common.NUM_LABELS)
    moe = VMoEForImageClassification(config).eval()
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(0, 1.0)
    torch.manual_seed(0)
    dense = common.dense_vit().eval()
    return {"mobile_vmoe_tiny": moe, "vit_tiny": dense}


def images(n: int = 8):
    import torch

    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def export_all(models, folder: Path, runtimes, calibration_images: int) -> dict:
    """Files per (runtime, model): {runtime: {model: {"path", "file_mb", "export_s"} or {"error"}}}."""
    import torch

    from hf_vmoe.integrations.export import export_executorch, export_onnx

    calib = torch.randn(calibration_images, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    example = images(1)
    files = {}
    for runtime in runtimes:
        files[runtime] = {}
        for name, model in models.items():
            t0 = time.perf_counter()
            try:
                if runtime in ("eager", "compiled"):
                    target = folder / name
                    if not target.exists():
                        model.save_pretrained(target)
                    path = target / "model.safetensors"
                elif runtime == "onnxruntime-fp32":
                    path = export_onnx(model, folder / f"{name}.onnx", example, dynamic_batch=False)
                elif runtime == "onnxruntime-int8":
                    path = export_onnx(model, folder / f"{name}-int8.onnx", example, dynamic_batch=False,
                                       quantize="int8", quantization="dynamic", calibration=calib[:8])
                elif runtime == "executorch-fp32":
                    path = export_executorch(model, folder / f"{name}.pte", example)
                else:
                    path = export_executorch(model, folder / f"{name}-int8.pte", example, quantize="int8",
                                             calibration=calib)
                files[runtime][name] = {"path": str(path if runtime not in ("eager", "compiled") else path.parent),
                                        "file_mb": path.stat().st_size / 2**20,
                                        "export_s": time.perf_counter() - t0}
            except Exception as err:  # noqa: BLE001  (recorded, the other runtimes still run)
                files[runtime][name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
            print(f"[export] {runtime} {name}: {files[runtime][name]}", flush=True)
    return files


def run_worker(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(HERE))
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": f"worker exited {proc.returncode}: {proc.stderr[-3000:]}"}


# ---------------------------------------------------------------------------------------------------------------
# Worker: one runtime, one or both models
# ---------------------------------------------------------------------------------------------------------------


def load_runner(runtime: str, name: str, path: str):
    """A callable taking a (1, 3, 224, 224) float tensor, running one forward."""
    import torch

    if runtime in ("eager", "compiled"):
        from transformers import ViTForImageClassification

        from hf_vmoe import VMoEForImageClassification

        cls = VMoEForImageClassification if name == "mobile_vmoe_tiny" else ViTForImageClassification
        model = cls.from_pretrained(path).eval()
        if runtime == "compiled":
            model = torch.compile(model)

        def call(x):
            with torch.inference_mode():
                return model(pixel_values=x).logits

        return call
    if runtime.startswith("onnxruntime"):
        from hf_vmoe.integrations.export import OnnxVMoE

        session = OnnxVMoE(path, intra_op_num_threads=1)
        return lambda x: session(x)
    from hf_vmoe.integrations.export import ExecuTorchVMoE

    program = ExecuTorchVMoE(path, num_threads=1)
    return lambda x: program(x)


def _import_runtime(runtime: str) -> None:
    """Import what the runtime needs before the memory baseline is taken."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import hf_vmoe  # noqa: F401
    import hf_vmoe.integrations.export  # noqa: F401

    if runtime.startswith("onnxruntime"):
        import onnxruntime  # noqa: F401
    if runtime.startswith("executorch"):
        from executorch.runtime import Runtime

        Runtime.get()


def worker(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--mode", choices=("latency", "memory"), required=True)
    parser.add_argument("--runtime", required=True)
    parser.add_argument("--model", action="append", nargs=2, metavar=("NAME", "PATH"), required=True)
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _import_runtime(args.runtime)
    xs = [x[None].contiguous() for x in images()]
    if args.mode == "memory":
        (name, path), = args.model
        before = _rss_mb()
        t0 = time.perf_counter()
        run = load_runner(args.runtime, name, path)
        for i in range(20):
            run(xs[i % len(xs)])
        print("RESULT " + json.dumps({"peak_rss_mb": _rss_mb(), "baseline_rss_mb": before,
                                      "increase_mb": _rss_mb() - before, "load_and_20_calls_s": time.perf_counter() - t0}))
        return
    import common

    runners = {name: load_runner(args.runtime, name, path) for name, path in args.model}
    # each model is called once per round and cycles through the same images: round r runs both on image r mod 8
    calls = {name: (lambda run=run, image=itertools.cycle(xs): run(next(image))) for name, run in runners.items()}
    times = common.interleaved(calls, reps=args.rounds, warmup=args.warmup)
    result = {name: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "rounds": len(t)}
              for name, t in times.items()}
    if set(MODELS) <= set(runners):
        ratios = sorted(m / d for m, d in zip(times["mobile_vmoe_tiny"], times["vit_tiny"]))
        q = statistics.quantiles(ratios, n=4)
        result["ratio_moe_over_dense"] = {"median": statistics.median(ratios), "q1": q[0], "q3": q[2]}
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def markdown(data: dict) -> str:
    import common

    lines = [
        "## Mobile: batch 1, one thread, every runtime (Mobile V-MoE-Tiny vs ViT-Tiny)",
        "",
        f"Machine: {common.machine_line(data['machine'])}; onnxruntime {data['versions'].get('onnxruntime')}, "
        f"executorch {data['versions'].get('executorch')}. Written by `python benchmarks/bench_mobile.py`"
        + (" --quick (smoke run: noisy figures)" if data["quick"] else "") + f"; {data['rounds']} interleaved rounds "
        "per runtime. Latency ratio = median of per-round MoE / dense ratios (lower is better); peak RSS = the "
        "runtime process after loading the model and 20 calls (increase over the process before loading).",
        "",
        "| runtime | Mobile V-MoE-Tiny ms | ViT-Tiny ms | ratio MoE / dense (median [q1, q3]) | goal <= 1.03 "
        "| file MB (MoE / dense) | peak RSS MB (MoE / dense) | RSS increase MB (MoE / dense) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for runtime, row in data["runtimes"].items():
        lat = row.get("latency", {})
        files, mem = row.get("files", {}), row.get("memory", {})

        def cell(d, key, name, fmt="{:.1f}"):
            v = d.get(name, {}).get(key) if isinstance(d.get(name), dict) else None
            return fmt.format(v) if isinstance(v, (int, float)) else "error"

        if "ratio_moe_over_dense" in lat:
            r = lat["ratio_moe_over_dense"]
            ratio = f"{r['median']:.3f} [{r['q1']:.3f}, {r['q3']:.3f}]"
            goal = "met" if r["median"] <= GOAL_RATIO else "NOT met"
        else:
            ratio, goal = "error", "-"
        lines.append(
            f"| {runtime} | {cell(lat, 'median_ms', 'mobile_vmoe_tiny')} | {cell(lat, 'median_ms', 'vit_tiny')} "
            f"| {ratio} | {goal} | {cell(files, 'file_mb', 'mobile_vmoe_tiny')} / {cell(files, 'file_mb', 'vit_tiny')} "
            f"| {cell(mem, 'peak_rss_mb', 'mobile_vmoe_tiny', '{:.0f}')} / {cell(mem, 'peak_rss_mb', 'vit_tiny', '{:.0f}')} "
            f"| {cell(mem, 'increase_mb', 'mobile_vmoe_tiny', '{:.0f}')} / {cell(mem, 'increase_mb', 'vit_tiny', '{:.0f}')} |"
        )
    errors = [f"- {rt} {what}: {err}" for rt, row in data["runtimes"].items() for what, err in row.get("errors", {}).items()]
    if errors:
        lines += ["", "Errors:", *errors]
    lines += ["", "Notes: eager/compiled file size is the safetensors checkpoint. int8: ONNX Runtime dynamic "
              "quantization (MatMul weights int8, activations quantized per call), ExecuTorch PT2E static int8 "
              "(XNNPACK quantizer, calibrated on random images here); in both the experts' stacked weights are "
              "weight-only int8 (gathered per image, dequantized after the gather) and the router stays float32."]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        return worker(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per runtime (default 150)")
    parser.add_argument("--runtimes", nargs="*", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--keep-files", help="export into this folder and keep the files")
    parser.add_argument("--out", default="mobile", help="result name under benchmarks/results/")
    args = parser.parse_args(argv)
    rounds = args.rounds or (6 if args.quick else 150)
    warmup = 2 if args.quick else 5

    import torch

    torch.set_num_threads(1)
    import common

    machine = common.machine_info()
    versions = {}
    for module in ("onnxruntime", "executorch", "onnx"):
        try:
            import importlib.metadata as md

            versions[module] = md.version(module)
        except Exception:  # noqa: BLE001
            versions[module] = None
    models = build_models()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep_files or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        files = export_all(models, folder, args.runtimes, 8 if args.quick else args.calibration_images)
        export_s = time.perf_counter() - t0
        del models
        results = {}
        for runtime in args.runtimes:
            row = {"files": files[runtime], "errors": {}}
            ok = {n: f["path"] for n, f in files[runtime].items() if "path" in f}
            for n, f in files[runtime].items():
                if "error" in f:
                    row["errors"][f"export {n}"] = f["error"]
            if len(ok) == len(MODELS):
                spec = [a for n in MODELS for a in ("--model", n, ok[n])]
                lat = run_worker(["--mode", "latency", "--runtime", runtime, "--rounds", str(rounds),
                                  "--warmup", str(warmup), *spec], timeout=3600)
                if "error" in lat:
                    row["errors"]["latency"] = lat.pop("error")
                row["latency"] = lat
            row["memory"] = {}
            for n, path in ok.items():
                mem = run_worker(["--mode", "memory", "--runtime", runtime, "--model", n, path], timeout=3600)
                if "error" in mem:
                    row["errors"][f"memory {n}"] = mem.pop("error")
                row["memory"][n] = mem
            results[runtime] = row
            print(f"[{runtime}] {json.dumps({k: v for k, v in row.items() if k != 'files'})}", flush=True)
    machine["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    data = {"machine": machine, "versions": versions, "quick": args.quick, "rounds": rounds, "batch_size": 1,
            "threads": 1, "export_seconds": export_s, "goal_ratio": GOAL_RATIO, "runtimes": results,
            "models": {"mobile_vmoe_tiny": "hf_vmoe preset mobile-vmoe-tiny (12x192, E=10, k=1, last 2 blocks)",
                       "vit_tiny": "transformers ViTForImageClassification 12x192, MLP 768, sdpa"}}
    common.write_results(args.out, data, markdown(data))


if __name__ == "__main__":
    main()
