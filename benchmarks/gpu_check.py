"""GPU check (issue 13.5): Mobile V-MoE-Tiny vs transformers' ViT-Tiny in bfloat16 on one CUDA GPU, batch 1 and 256.

    python benchmarks/gpu_check.py                      # about a minute on one GPU; needs a CUDA build of torch
    python benchmarks/gpu_check.py --compile            # also torch.compile (adds a few minutes of compilation)
    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

Never part of CI: without a CUDA device it prints why and exits with status 2 before building anything.

Same models as benchmarks/bench_mobile.py (hf_vmoe preset `mobile-vmoe-tiny`: 12 x 192, E=10, k=1 in the last 2
blocks; dense: `ViTForImageClassification` 12 x 192, MLP 768, sdpa), random weights with the router spread so the
images go to different experts, bfloat16, eval, `torch.inference_mode`. Per batch size both models run alternately
(order swapped each round), each call timed with CUDA events after a synchronising warm-up; reported: median latency,
throughput (images/s) and the medians of the per-round ratios (latency MoE / dense, throughput MoE / dense).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def correctness(moe, device) -> dict:
    """float32 on the GPU against float32 on the CPU (logits and experts), batch invariance on the GPU, and the
    single-image path free of host synchronisation (`torch.cuda.set_sync_debug_mode("error")` around one MoE block)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 224, 224, generator=gen)
    with torch.inference_mode():
        cpu = moe(pixel_values=x, output_router_logits=True)
        gpu_model = moe.to(device)
        gpu = gpu_model(pixel_values=x.to(device), output_router_logits=True)
        singles = torch.cat([gpu_model(pixel_values=x[i:i + 1].to(device)).logits for i in range(len(x))])
        block = gpu_model.vmoe.encoder.layer[gpu_model.config.moe_layers[-1]].mlp
        hidden = torch.randn(1, 197, 192, device=device)
        _, plan = gpu_model.vmoe.encoder.router(hidden)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            block(hidden, plan)
            sync_free = True
        except RuntimeError as err:
            sync_free = f"synchronised: {err}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    moe.to("cpu")
    out = {
        "max_abs_logit_diff_gpu_vs_cpu_fp32": float((gpu.logits.cpu() - cpu.logits).abs().max()),
        "experts_agree_gpu_vs_cpu": bool(torch.equal(gpu.router_logits[0].argmax(-1).cpu(),
                                                     cpu.router_logits[0].argmax(-1))),
        "max_abs_logit_diff_batch1_vs_batch8_gpu": float((singles - gpu.logits).abs().max()),
        "single_image_moe_block_without_host_sync": sync_free,
    }
    print("correctness:", json.dumps(out), flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 256])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd models")
    parser.add_argument("--out", default=str(HERE / "results" / "gpu_check.json"))
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check.py needs a CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, "
              f"CUDA build {torch.version.cuda}). Run it on a GPU machine with a CUDA build of torch; it is never "
              "part of CI. Nothing was measured.", file=sys.stderr)
        return 2

    from transformers import ViTConfig, ViTForImageClassification

    from hf_vmoe import VMoEForImageClassification
    from hf_vmoe.recipes.presets import get_preset

    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    moe = VMoEForImageClassification(get_preset("mobile-vmoe-tiny", num_labels=1000)).eval()
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(0, 1.0)
    torch.manual_seed(0)
    dense = ViTForImageClassification(ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                                                intermediate_size=768, num_labels=1000, image_size=224,
                                                patch_size=16)).eval()
    checks = correctness(moe, device)
    variants = {"eager": {"mobile_vmoe_tiny": moe.to(device, dtype), "vit_tiny": dense.to(device, dtype)}}
    if args.compile:
        variants["compiled"] = {name: torch.compile(m) for name, m in variants["eager"].items()}

    def timed(model, x) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(pixel_values=x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    results = {}
    with torch.inference_mode():
        for variant, models in variants.items():
            for batch in args.batch_sizes:
                gen = torch.Generator().manual_seed(batch)
                xs = [torch.randn(batch, 3, 224, 224, generator=gen).to(device, dtype) for _ in range(4)]
                with torch.no_grad():
                    experts = moe(pixel_values=xs[0], output_router_logits=True).router_logits[0].argmax(-1)
                for i in range(args.warmup):
                    for m in models.values():
                        m(pixel_values=xs[i % len(xs)])
                torch.cuda.synchronize()
                times = {name: [] for name in models}
                names = list(models)
                for r in range(args.rounds):
                    for name in names if r % 2 == 0 else names[::-1]:
                        times[name].append(timed(models[name], xs[r % len(xs)]))
                latency_ratio = statistics.median(m / d for m, d in zip(times["mobile_vmoe_tiny"], times["vit_tiny"]))
                row = {name: {"median_ms": 1e3 * statistics.median(t),
                              "images_per_s": batch / statistics.median(t)} for name, t in times.items()}
                row["latency_ratio_moe_over_dense"] = latency_ratio
                row["throughput_ratio_moe_over_dense"] = statistics.median(
                    d / m for m, d in zip(times["mobile_vmoe_tiny"], times["vit_tiny"]))
                row["experts_used_by_first_batch"] = len(set(experts.tolist()))
                results[f"{variant}/batch{batch}"] = row
                print(f"{variant} batch {batch}: MoE {row['mobile_vmoe_tiny']['median_ms']:.3f} ms, "
                      f"dense {row['vit_tiny']['median_ms']:.3f} ms, latency ratio {latency_ratio:.3f}, "
                      f"throughput ratio {row['throughput_ratio_moe_over_dense']:.3f}", flush=True)
    data = {
        "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
        "dtype": "bfloat16", "rounds": args.rounds, "python": platform.python_version(),
        "date": dt.datetime.now().isoformat(timespec="seconds"), "correctness": checks, "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
