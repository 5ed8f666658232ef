"""Why token routing at batch 1 stays near 0.6x its dense twin on a CPU: the matmuls of small experts.

One image of 197 tokens, width 192; token routing with 8 experts of width 768 and k = 2 gives each expert about 49
rows, against one dense MLP of width 1536 on all 197 rows (the same FLOPs). Measured side by side, interleaved,
medians of per-round ratios against the dense MLP:

- `dense_mlp1536`: F.linear -> GELU -> F.linear on 197 rows (the reference);
- `experts_loop_49_rows`: the same FLOPs as 8 experts on 49 rows each, their inputs ready (the eager backend's
  matmuls, without its sort, gather and scatter);
- `experts_bmm_8x49`: the same as one batched matmul per projection (what a padded backend could reach at best,
  padding not counted);
- `moe_block_eager`: the MoE block (router, plan, eager experts) on the image.

    python benchmarks/bench_small_experts.py [--reps N]
"""

import argparse

import torch
import torch.nn.functional as F

from common import goal, interleaved, machine_info, machine_line, md_table, ratio_stats, summary, token_config, \
    write_results
from hf_vmoe.modeling_vmoe import VMoESparseMoeBlock

TOKENS, HIDDEN, WIDTH, EXPERTS, TOP_K = 197, 192, 768, 8, 2


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=300)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = TOKENS * TOP_K // EXPERTS  # 49
    x = torch.randn(TOKENS, HIDDEN)
    dense = [torch.randn(WIDTH * TOP_K, HIDDEN) * 0.02, torch.zeros(WIDTH * TOP_K),
             torch.randn(HIDDEN, WIDTH * TOP_K) * 0.02, torch.zeros(HIDDEN)]
    up, up_bias = torch.randn(EXPERTS, WIDTH, HIDDEN) * 0.02, torch.zeros(EXPERTS, WIDTH)
    down, down_bias = torch.randn(EXPERTS, HIDDEN, WIDTH) * 0.02, torch.zeros(EXPERTS, HIDDEN)
    parts = [torch.randn(rows, HIDDEN) for _ in range(EXPERTS)]
    stacked = torch.stack(parts)  # (E, 49, H)
    config = token_config()
    config._experts_implementation = "eager"
    block = VMoESparseMoeBlock(config).eval()
    hidden = x.unsqueeze(0)

    def dense_mlp():
        return F.linear(F.gelu(F.linear(x, dense[0], dense[1])), dense[2], dense[3])

    def experts_loop():
        return [F.linear(F.gelu(F.linear(parts[e], up[e], up_bias[e])), down[e], down_bias[e]) for e in range(EXPERTS)]

    def experts_bmm():
        h = F.gelu(torch.baddbmm(up_bias.unsqueeze(1), stacked, up.transpose(1, 2)))
        return torch.baddbmm(down_bias.unsqueeze(1), h, down.transpose(1, 2))

    fns = {"dense_mlp1536": dense_mlp, "experts_loop_49_rows": experts_loop, "experts_bmm_8x49": experts_bmm,
           "moe_block_eager": lambda: block(hidden)}
    with torch.inference_mode():
        times = interleaved(fns, reps=args.reps, warmup=10)
    results = {"machine": machine_info(), "reps": args.reps, "rows_per_expert": rows, "models": {}}
    table = []
    for name, ts in times.items():
        entry = summary(ts)
        if name != "dense_mlp1536":
            entry["ratio_vs_dense"] = ratio_stats(ts, times["dense_mlp1536"])
        results["models"][name] = entry
        ratio = entry.get("ratio_vs_dense")
        table.append([name, f"{entry['median_s'] * 1e3:.3f}",
                      f"{ratio['median']:.3f} [{ratio['q1']:.2f}, {ratio['q3']:.2f}]" if ratio else "reference"])
    block_ratio = results["models"]["moe_block_eager"]["ratio_vs_dense"]["median"]
    loop_ratio = results["models"]["experts_loop_49_rows"]["ratio_vs_dense"]["median"]
    md = "\n".join([
        "## Small experts at batch 1 (197 tokens, width 192, 8 experts of 768, k=2, float32)",
        "",
        f"Machine: {machine_line(results['machine'])}. {args.reps} interleaved rounds.",
        "",
        md_table(["computation", "ms (median)", "throughput ratio vs the dense MLP (median [q1, q3])"], table),
        "",
        f"- the experts' matmuls alone, 8 x {rows} rows: **{loop_ratio:.3f}** of the dense MLP's speed at the same FLOPs; "
        f"the whole eager MoE block: **{block_ratio:.3f}** — a block at least 0.80 is {goal(block_ratio, 0.80)}",
    ])
    write_results("small_experts", results, md)
    return results


if __name__ == "__main__":
    main()
