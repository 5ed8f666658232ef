"""Batch-1 CPU latency of an exported (ONNX, onnxruntime) image-routed VMoE against PyTorch eager.

    python benchmarks/bench_export.py                      # Mobile V-MoE-Tiny (12 x 192, 224 px, E=10, k=1)
    python benchmarks/bench_export.py --repeats 50 --threads 1 --out benchmarks/results/bench_export.json

Both run single-threaded by default (`--threads`), interleaved call by call on the same images, which cycle
through images routed to different experts; medians are reported, with the median of per-pair ratios. The ONNX
outputs are checked against eager (max abs difference reported). Weights are random (latency does not depend on
them); the router weights are spread so the images really go to different experts.
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import hf_vmoe  # noqa: F401
from hf_vmoe import VMoEConfig, VMoEForImageClassification
from hf_vmoe.integrations.export import OnnxVMoE, export_onnx


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--routing", choices=["image", "token"], default="image")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_export.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = VMoEConfig(num_labels=1000, routing_level=args.routing)
    model = VMoEForImageClassification(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(0, 1.0)
    images = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        experts = model(pixel_values=images, output_router_logits=True).router_logits[0].argmax(-1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = export_onnx(model, Path(tmp) / "vmoe.onnx", batch_size=1, dynamic_batch=False)
        export_s = time.perf_counter() - t0
        size_mb = path.stat().st_size / 2**20
        session = OnnxVMoE(path, intra_op_num_threads=args.threads)
        eager_ms, onnx_ms, max_diff = [], [], 0.0
        with torch.inference_mode():
            for i in range(args.warmup + args.repeats):
                x = images[i % len(images)][None]
                t0 = time.perf_counter()
                ref = model(pixel_values=x).logits
                t1 = time.perf_counter()
                got = session(x)
                t2 = time.perf_counter()
                max_diff = max(max_diff, float((torch.from_numpy(got) - ref).abs().max()))
                if i >= args.warmup:
                    eager_ms.append((t1 - t0) * 1e3)
                    onnx_ms.append((t2 - t1) * 1e3)
    result = {
        "model": f"VMoE {config.num_hidden_layers}x{config.hidden_size}, {config.image_size}px, "
                 f"{args.routing} routing, E={config.num_experts}, k={config.num_experts_per_tok}, "
                 f"moe_layers={list(config.moe_layers)}",
        "batch_size": 1,
        "threads": args.threads,
        "repeats": args.repeats,
        "experts_used_by_the_images": sorted(set(experts.tolist())),
        "eager_ms_median": statistics.median(eager_ms),
        "onnxruntime_ms_median": statistics.median(onnx_ms),
        "median_ratio_eager_over_onnx": statistics.median(e / o for e, o in zip(eager_ms, onnx_ms)),
        "max_abs_diff_logits": max_diff,
        "export_seconds": export_s,
        "onnx_file_mb": size_mb,
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} (shared CPU, timings noisy)".strip(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
