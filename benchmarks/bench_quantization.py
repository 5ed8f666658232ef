"""int8 accuracy on real images: a trained Mobile V-MoE exported to ExecuTorch and ONNX Runtime, float32 vs int8.

    python benchmarks/bench_quantization.py                       # trains the demo model first if it is missing
    python benchmarks/bench_quantization.py --model /tmp/demo/mobile-vmoe --out benchmarks/results/quantization.json

Data: scikit-learn's digits (1,797 real 8x8 scans, 10 classes, bundled with scikit-learn), split exactly like
`hf-vmoe demo` (stratified 60/20/20, seed 0): int8 calibration images come from the training split, every figure
from the test split. The model is the demo's Mobile V-MoE (6 x 64, E=5, k=1, image routing; `hf-vmoe demo
--output-dir DIR` writes it to DIR/mobile-vmoe in about two minutes on one thread).

For every runtime / precision / router setting it reports top-1 accuracy, agreement of the predicted class with
float32 PyTorch eager, router agreement (share of test images sent to the same expert as in float32 eager), the
max |logit| difference and the file size.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
if str(HERE.parent / "src") not in sys.path:
    sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402


def digits_splits(processor, seed: int = 0):
    """(pixel_values, labels) for the demo's train and test splits."""
    from hf_vmoe.demo import load_digit_images, stratified_split

    images, labels, _ = load_digit_images()
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].float().contiguous()
    train_idx, _, test_idx = stratified_split(labels, seed=seed)
    labels = torch.as_tensor(labels)
    return (pixel_values[train_idx], labels[train_idx]), (pixel_values[test_idx], labels[test_idx])


def calibration_subset(pixel_values: torch.Tensor, labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """`n` training images, classes interleaved (a fixed random order)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    return pixel_values[order[:n]].contiguous()


def load_model(model_dir: str):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    import hf_vmoe  # noqa: F401

    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    return model, processor


def eager_outputs(model, pixel_values: torch.Tensor, batch: int = 256):
    logits, experts = [], []
    with torch.inference_mode():
        for chunk in pixel_values.split(batch):
            out = model(pixel_values=chunk, output_router_logits=model.config.is_moe)
            logits.append(out.logits)
            if model.config.is_moe:
                experts.append(out.router_logits[0].argmax(-1))
    return torch.cat(logits), (torch.cat(experts) if experts else None)


def run_program(runner, pixel_values: torch.Tensor, per_image: bool):
    logits, experts = [], []
    chunks = pixel_values.split(1) if per_image else [pixel_values]
    for chunk in chunks:
        out = runner.run(chunk)
        logits.append(torch.as_tensor(out[0]))
        if len(out) > 1:
            experts.append(torch.as_tensor(out[1]).argmax(-1))
    return torch.cat(logits), (torch.cat(experts) if experts else None)


def measure(model, variants, test_x, test_y, calib, workdir: Path) -> list[dict]:
    from hf_vmoe.integrations.export import ExecuTorchVMoE, OnnxVMoE, export_executorch, export_onnx

    ref_logits, ref_experts = eager_outputs(model, test_x)
    ref_pred = ref_logits.argmax(-1)
    rows = [{
        "runtime": "pytorch eager", "precision": "float32", "router": "float32",
        "experts": "float32", "top1": float((ref_pred == test_y).float().mean()), "prediction_agreement": 1.0,
        "router_agreement": 1.0 if ref_experts is not None else None, "max_abs_logit_diff": 0.0,
    }]
    print(rows[0], flush=True)
    for runtime, quantize, mode, quantize_router, quantize_experts in variants:
        t0 = time.perf_counter()
        name = (f"{runtime}-{quantize or 'fp32'}-{mode or ''}-{'qrouter' if quantize_router else 'frouter'}-"
                f"{'qexperts' if quantize_experts else 'fexperts'}")
        with_router = bool(model.config.is_moe)
        if runtime == "executorch":
            path = export_executorch(model, workdir / f"{name}.pte", quantize=quantize, calibration=calib,
                                     quantize_experts=quantize_experts, with_router_logits=with_router)
            runner, per_image = ExecuTorchVMoE(path), True
        else:
            path = export_onnx(model, workdir / f"{name}.onnx", quantize=quantize, quantization=mode or "dynamic",
                               calibration=calib, quantize_router=quantize_router, quantize_experts=quantize_experts,
                               with_router_logits=with_router)
            runner, per_image = OnnxVMoE(path), False
        export_s = time.perf_counter() - t0
        logits, experts = run_program(runner, test_x, per_image)
        pred = logits.argmax(-1)
        row = {
            "runtime": runtime,
            "precision": quantize or "float32",
            "onnx_quantization": mode if runtime == "onnxruntime" and quantize else None,
            "router": "int8" if (quantize and quantize_router) else "float32",
            "experts": ("int8 weights" if quantize_experts else "float32") if quantize else "float32",
            "top1": float((pred == test_y).float().mean()),
            "prediction_agreement": float((pred == ref_pred).float().mean()),
            "router_agreement": float((experts == ref_experts).float().mean()) if experts is not None else None,
            "max_abs_logit_diff": float((logits - ref_logits).abs().max()),
            "file_mb": path.stat().st_size / 2**20,
            "export_seconds": export_s,
        }
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = [
        "## int8 accuracy on real images (scikit-learn digits, test split)",
        "",
        f"Model: {result['model']}; {result['test_images']} test images, {result['calibration_images']} calibration "
        f"images from the training split. Machine: {result['machine']}. "
        "Written by `python benchmarks/bench_quantization.py`.",
        "",
        "| runtime | precision | router | experts | top-1 | top-1 - fp32 eager (points) | same class as fp32 | same expert as fp32 "
        "| max abs logit diff | file MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = result["rows"][0]["top1"]
    for r in result["rows"]:
        precision = r["precision"] + (f" ({r['onnx_quantization']})" if r.get("onnx_quantization") else "")
        agree = "-" if r["router_agreement"] is None else f"{100 * r['router_agreement']:.1f}%"
        size = f"{r['file_mb']:.2f}" if "file_mb" in r else "-"
        lines.append(
            f"| {r['runtime']} | {precision} | {r['router']} | {r['experts']} | {100 * r['top1']:.2f}% | {100 * (r['top1'] - base):+.2f} "
            f"| {100 * r['prediction_agreement']:.1f}% | {agree} | {r['max_abs_logit_diff']:.3g} | {size} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/demo/mobile-vmoe", help="a trained VMoE folder (the demo's)")
    parser.add_argument("--train-dir", default="/tmp/demo", help="where to run `hf-vmoe demo` if --model is missing")
    parser.add_argument("--calibration-images", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runtimes", nargs="*", default=["executorch", "onnxruntime"])
    parser.add_argument("--out", default=str(HERE / "results" / "quantization.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not Path(args.model, "config.json").exists():
        from hf_vmoe.demo import main as demo_main

        print(f"{args.model} not found: training the demo model into {args.train_dir}", flush=True)
        demo_main(["--output-dir", args.train_dir, "--threads", str(args.threads)])
        args.model = str(Path(args.train_dir) / "mobile-vmoe")
    model, processor = load_model(args.model)
    (train_x, train_y), (test_x, test_y) = digits_splits(processor)
    calib = calibration_subset(train_x, train_y, args.calibration_images)
    variants = []
    if "executorch" in args.runtimes:
        variants += [("executorch", None, None, False, False), ("executorch", "int8", None, False, True),
                     ("executorch", "int8", None, False, False)]
    if "onnxruntime" in args.runtimes:  # dynamic mode never quantizes the router (a Gemm): no router-int8 row
        variants += [("onnxruntime", None, None, False, False), ("onnxruntime", "int8", "dynamic", False, True),
                     ("onnxruntime", "int8", "dynamic", False, False), ("onnxruntime", "int8", "static", False, True),
                     ("onnxruntime", "int8", "static", True, True)]
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(model, variants, test_x, test_y, calib, Path(tmp))
    c = model.config
    import onnxruntime

    import common

    result = {
        "model": f"{args.model}: VMoE {c.num_hidden_layers}x{c.hidden_size}, {c.image_size}px, {c.routing_level} "
                 f"routing, E={c.num_experts}, k={c.num_experts_per_tok}, moe_layers={list(c.moe_layers)}",
        "data": "sklearn.datasets.load_digits, hf-vmoe demo split (seed 0)",
        "test_images": len(test_y),
        "calibration_images": len(calib),
        "rows": rows,
        "machine": f"{common.machine_info()['cpu']}, {os.cpu_count()} cores, {args.threads} thread(s), "
                   f"torch {torch.__version__}, "
                   f"executorch {importlib.metadata.version('executorch')}, "
                   f"onnxruntime {onnxruntime.__version__}, {time.strftime('%Y-%m-%d')}",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
