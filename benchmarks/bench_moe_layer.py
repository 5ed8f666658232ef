"""The MoE layer alone, against a dense MLP of the same active FLOPs (eval, fp32, no grad).

- token MoE block (router + experts; E=8, k=2, width 192, expert MLP 768, 32 x 197 tokens) / dense MLP 1536, for
  every experts backend: `eager` (our loop; at this size the CPU default `vmoe_cpu` is this loop), `grouped_mm`
  (transformers' default on GPU), `batched_mm` (gathers one weight copy per token-slot: 7 GB at this size, so it runs on 2 images only and is
  compared with the dense MLP on the same 2 images);
- image-routing dispatch (10 experts, k=1, 32 images of 197 tokens, balanced routing: image i -> expert i mod E)
  / dense MLP 768, for the eager grouped path and the static-shape gather path used under compile / export;
- scaling with E = 4, 8, 16, 32 (token: eager and grouped_mm; image: grouped path).

Reported figure: time(MoE) / time(dense), the median of per-round ratios (lower is better; 1.0 = free routing).

    python benchmarks/bench_moe_layer.py [--quick]
"""

import argparse

import torch

from common import (
    DEVICE,
    DTYPE,
    interleaved,
    machine_info,
    machine_line,
    md_table,
    ratio_stats,
    summary,
    write_results,
)
from hf_vmoe import VMoEConfig
from hf_vmoe.modeling_vmoe import TopKRouting, VMoEMLP, VMoESparseMoeBlock

HIDDEN, EXPERT_MLP, BATCH, SEQ = 192, 768, 32, 197


def init_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * (0.0 if name.endswith("bias") else 0.02))
    return module.eval().to(DEVICE, DTYPE)


def token_block(num_experts: int, backend: str) -> VMoESparseMoeBlock:
    config = VMoEConfig(hidden_size=HIDDEN, intermediate_size=EXPERT_MLP, routing_level="token",
                        num_experts=num_experts, num_experts_per_tok=2, moe_layers="all")
    config._experts_implementation = backend
    return init_(VMoESparseMoeBlock(config))


def image_block(num_experts: int) -> VMoESparseMoeBlock:
    config = VMoEConfig(hidden_size=HIDDEN, intermediate_size=EXPERT_MLP, routing_level="image",
                        num_experts=num_experts, num_experts_per_tok=1, moe_layers="all", shared_router=False)
    return init_(VMoESparseMoeBlock(config))


def dense_mlp(width: int) -> VMoEMLP:
    return init_(VMoEMLP(VMoEConfig(hidden_size=HIDDEN, intermediate_size=width), width))


def balanced_plan(batch: int, num_experts: int) -> TopKRouting:
    """Image routing that gives every expert the same number of images."""
    index = (torch.arange(batch, device=DEVICE) % num_experts).view(-1, 1)
    weights = torch.full((batch, 1), 0.7, device=DEVICE)
    return TopKRouting(logits=torch.zeros(batch, num_experts, device=DEVICE), top_k_index=index,
                       top_k_weights=weights, seq_len=SEQ)


def compare(fns: dict, reference: str, reps: int) -> dict:
    with torch.inference_mode():
        times = interleaved(fns, reps=reps, warmup=1)
    out = {}
    for name, ts in times.items():
        out[name] = summary(ts)
        if name != reference:
            stats = ratio_stats(times[reference], ts)  # = t_moe / t_dense per round
            out[name]["time_ratio_vs_dense"] = stats
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    reps = 3 if args.quick else 12
    torch.manual_seed(0)
    x = torch.randn(BATCH, SEQ, HIDDEN).to(DEVICE, DTYPE)
    x2 = x[:2].contiguous()
    results = {"machine": machine_info(), "shape": {"batch": BATCH, "seq": SEQ, "hidden": HIDDEN,
                                                     "expert_mlp": EXPERT_MLP}}

    # 1. token block, every backend, E=8 k=2 vs dense MLP 1536
    dense2x = dense_mlp(2 * EXPERT_MLP)
    blocks = {b: token_block(8, b) for b in ("eager", "grouped_mm", "batched_mm")}
    fns = {"dense_mlp1536": lambda: dense2x(x)}
    fns.update({f"token_{b}": (lambda m: (lambda: m(x)))(blocks[b]) for b in ("eager", "grouped_mm")})
    results["token_E8"] = compare(fns, "dense_mlp1536", reps)
    fns = {"dense_mlp1536": lambda: dense2x(x2), "token_batched_mm": lambda: blocks["batched_mm"](x2)}
    results["token_E8_batched_mm_2_images"] = compare(fns, "dense_mlp1536", 2 if args.quick else 4)

    # 2. image routing dispatch, E=10 k=1 vs dense MLP 768
    dense1x = dense_mlp(EXPERT_MLP)
    block = image_block(10)
    plan = balanced_plan(BATCH, 10)
    weights = plan.top_k_weights
    fns = {
        "dense_mlp768": lambda: dense1x(x),
        "image_grouped": lambda: block(x, plan),
        "image_gathered": lambda: block.experts._forward_gathered(x, plan.top_k_index, weights),
        "image_with_router": lambda: block(x),
    }
    results["image_E10"] = compare(fns, "dense_mlp768", reps)

    # 3. scaling with E
    scaling = {}
    for num_experts in (4, 8, 16, 32):
        fns = {"dense_mlp1536": lambda: dense2x(x)}
        for b in ("eager", "grouped_mm"):
            fns[f"token_{b}"] = (lambda m: (lambda: m(x)))(token_block(num_experts, b))
        fns["dense_mlp768"] = lambda: dense1x(x)
        iblock, iplan = image_block(num_experts), balanced_plan(BATCH, num_experts)
        fns["image_grouped"] = lambda: iblock(x, iplan)
        res = compare(fns, "dense_mlp1536", max(2, reps // 2))
        # the image block is compared with the dense MLP 768 (same active FLOPs)
        res["image_grouped"]["time_ratio_vs_dense"] = {
            "median": res["image_grouped"]["median_s"] / res["dense_mlp768"]["median_s"], "note": "ratio of medians"}
        scaling[num_experts] = res
    results["scaling"] = scaling

    def r(entry):
        return entry["time_ratio_vs_dense"]["median"]

    rows = [
        ["token E=8 k=2", "eager", "MLP 1536", f"{r(results['token_E8']['token_eager']):.3f}"],
        ["token E=8 k=2", "grouped_mm", "MLP 1536", f"{r(results['token_E8']['token_grouped_mm']):.3f}"],
        ["token E=8 k=2 (2 images)", "batched_mm", "MLP 1536",
         f"{r(results['token_E8_batched_mm_2_images']['token_batched_mm']):.1f}"],
        ["image E=10 k=1", "grouped (eager)", "MLP 768", f"{r(results['image_E10']['image_grouped']):.3f}"],
        ["image E=10 k=1", "gathered (compile/export path, run eagerly)", "MLP 768",
         f"{r(results['image_E10']['image_gathered']):.3f}"],
        ["image E=10 k=1 + own router", "grouped (eager)", "MLP 768",
         f"{r(results['image_E10']['image_with_router']):.3f}"],
    ]
    scale_rows = [
        [e, f"{r(s['token_eager']):.3f}", f"{r(s['token_grouped_mm']):.3f}", f"{r(s['image_grouped']):.3f}"]
        for e, s in scaling.items()
    ]
    md = "\n".join([
        f"## MoE layer alone (eval, {results['machine']['dtype']}, 32 x 197 tokens, width 192)",
        "",
        f"Machine: {machine_line(results['machine'])}. {reps} rounds" + (" (--quick: noisy)" if args.quick else "")
        + ". Figure: time(MoE block) / time(dense MLP of the same active FLOPs), median of per-round ratios "
          "(1.0 = routing is free).",
        "",
        md_table(["layer", "dispatch", "dense reference", "time ratio"], rows),
        "",
        "Scaling with the number of experts (token: k=2 vs MLP 1536; image: k=1, balanced, vs MLP 768):",
        "",
        md_table(["E", "token eager", "token grouped_mm", "image grouped"], scale_rows),
    ])
    write_results("moe_layer", results, md)
    return results


if __name__ == "__main__":
    main()
