"""Training step time (forward + backward + AdamW step), batch 32, 224 px, fp32, against the dense twin.

- image routing: Mobile V-MoE-Tiny (10 experts, k=1, last 2 blocks; loss = CE + routing aux losses) vs
  transformers' ViT of the same dims;
- token routing: every block MoE (8 experts, k=2, CPU default `eager` backend) vs ViT with MLP 1536.

Steps alternate between the two models; the figure is the median of per-round time ratios MoE / dense.

    python benchmarks/bench_train.py [--quick]
"""

import argparse

import torch

from common import (
    DEVICE,
    dense_vit,
    goal,
    image_config,
    interleaved,
    machine_info,
    machine_line,
    md_table,
    pixels,
    ratio_stats,
    summary,
    token_config,
    vmoe,
    write_results,
)


def make_step(model, x, labels):
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(pixel_values=x, labels=labels).loss
        loss.backward()
        optimizer.step()

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    reps = 2 if args.quick else 5
    x = pixels(args.batch)
    labels = torch.randint(0, 1000, (args.batch,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    results = {"machine": machine_info(), "batch": args.batch, "rounds": reps}
    groups = {
        "image": ({"vmoe_image": vmoe(image_config()), "vit": dense_vit(768)}, "vit"),
        "token": ({"vmoe_token_eager": vmoe(token_config()), "vit_mlp1536": dense_vit(1536)}, "vit_mlp1536"),
    }
    rows = []
    for group, (models, ref) in groups.items():
        steps = {name: make_step(m, x, labels) for name, m in models.items()}
        times = interleaved(steps, reps=reps, warmup=1)
        ours = next(n for n in models if n != ref)
        stats = ratio_stats(times[ref], times[ours])  # t_ours / t_ref per round
        results[group] = {name: summary(ts) for name, ts in times.items()}
        results[group]["time_ratio"] = stats
        rows.append([group, ours, f"{results[group][ours]['median_s']:.2f}", ref,
                     f"{results[group][ref]['median_s']:.2f}",
                     f"{stats['median']:.3f} [{stats['q1']:.2f}, {stats['q3']:.2f}]"])
    img = results["image"]["time_ratio"]["median"]
    results["goals"] = {"image_train_step_vs_dense": {"value": img, "target": 1.10, "met": img <= 1.10}}
    md = "\n".join([
        f"## Training step (forward + backward + AdamW), batch {args.batch}, {results['machine']['dtype']}",
        "",
        f"Machine: {machine_line(results['machine'])}. {reps} rounds" + (" (--quick: noisy)" if args.quick else "") + ".",
        "",
        md_table(["routing", "MoE model", "s/step", "dense twin", "s/step", "time ratio MoE / dense (median [q1, q3])"],
                 rows),
        "",
        f"- image routing train step / dense: **{img:.3f}** — goal {goal(img, 1.10, higher_is_better=False)}",
    ])
    write_results("train_step", results, md)
    return results


if __name__ == "__main__":
    main()
