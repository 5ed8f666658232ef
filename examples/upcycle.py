#!/usr/bin/env python
"""Upcycle a dense transformers ViT / DeiT / DINOv2 checkpoint directory into a VMoE checkpoint (safetensors).

    python examples/upcycle.py ./dinov2-small ./vimoe-small --task classification --routing_level token \
        --num_experts 8 --num_experts_per_tok 2 --num_shared_experts 1 --moe_layers last:4 --image_size 224 --check

Every expert starts as a copy of the dense MLP (`--expert_init split` splits its hidden units instead), the shared
expert too (`--expert_init split_shared`: one shared expert of half the hidden units, routed experts copies of the
other half, at the dense model's compute with k=1), and the combine weights are normalised, so the result computes
the dense function (`--check` verifies it on random pixels). `--drop_ratio R` (drop-upcycling) re-initialises a
share R of each expert's hidden units, a different subset per expert, so the experts start diverse; `--check` is
skipped then. The image processor is saved
as a VMoEImageProcessor with the dense one's mean / std.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

import hf_vmoe  # noqa: F401  (registers the Auto classes)
from hf_vmoe import VMoEImageProcessor
from hf_vmoe.integrations.data import parse_moe_layers_arg
from hf_vmoe.recipes.upcycling import EXPERT_INITS, TASKS, load_dense_model, upcycle


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dense", help="dense checkpoint directory (ViT, DeiT or DINOv2, transformers format)")
    parser.add_argument("output_dir")
    parser.add_argument("--task", choices=TASKS, default="auto")
    parser.add_argument("--routing_level", choices=("image", "token"), default="token")
    parser.add_argument("--num_experts", type=int, default=8)
    parser.add_argument("--num_experts_per_tok", type=int, default=2)
    parser.add_argument("--moe_layers", default="last:2", help="'last:L', 'every:n', 'all' or indices '9,11'")
    parser.add_argument("--num_shared_experts", type=int, default=0)
    parser.add_argument("--expert_init", choices=EXPERT_INITS, default="copy")
    parser.add_argument("--expert_noise_std", type=float, default=0.0)
    parser.add_argument("--drop_ratio", type=float, default=0.0,
                        help="drop-upcycling: share of each expert's hidden units re-initialised (0 = plain copies)")
    parser.add_argument("--image_size", type=int, default=None, help="resolution to run at (default: the dense one)")
    parser.add_argument("--num_labels", type=int, default=None, help="new head size (segmentation / new classes)")
    parser.add_argument("--drop_distillation_token", action="store_true", help="DeiT: drop the distillation token")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="verify the outputs equal the dense model's")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    moe_layers = parse_moe_layers_arg(args.moe_layers)
    extra = {"num_labels": args.num_labels} if args.num_labels else {}
    dense = load_dense_model(args.dense).eval()
    model = upcycle(
        dense, task=args.task, expert_init=args.expert_init, expert_noise_std=args.expert_noise_std,
        image_size=args.image_size, drop_distillation_token=args.drop_distillation_token, seed=args.seed,
        drop_ratio=args.drop_ratio,
        routing_level=args.routing_level, num_experts=args.num_experts, num_experts_per_tok=args.num_experts_per_tok,
        moe_layers=moe_layers, num_shared_experts=args.num_shared_experts, **extra,
    )
    out = Path(args.output_dir)
    model.save_pretrained(out)
    size = model.config.image_size
    height, width = (size, size) if isinstance(size, int) else size
    kwargs = {"size": {"height": height, "width": width}}
    preprocessor = Path(args.dense) / "preprocessor_config.json"
    if preprocessor.is_file():
        dense_proc = json.loads(preprocessor.read_text())
        for key in ("image_mean", "image_std"):
            if key in dense_proc:
                kwargs[key] = dense_proc[key]
    VMoEImageProcessor(**kwargs).save_pretrained(out)
    summary = {"output_dir": str(out), "class": type(model).__name__, "moe_layers": list(model.config.moe_layers),
               "routing_level": model.config.routing_level, "num_experts": model.config.num_experts,
               "num_shared_experts": model.config.num_shared_experts}
    if args.check and args.task in ("segmentation", "backbone"):
        print("--check compares logits or hidden states; skipped for a new segmentation head / backbone")
    elif args.check and args.drop_ratio > 0:
        print("--check skipped: with --drop_ratio the experts are no longer copies of the dense MLP")
    elif args.check:
        pixels = torch.randn(2, model.config.num_channels, height, width)
        with torch.no_grad():
            dense_kwargs = {} if dense.config.model_type == "dinov2" else {"interpolate_pos_encoding": True}
            ref, got = dense(pixels, **dense_kwargs), model(pixels)
        name = "logits" if hasattr(got, "logits") and hasattr(ref, "logits") else "last_hidden_state"
        diff = (getattr(got, name) - getattr(ref, name)).abs().max().item()
        summary["max_abs_diff"] = diff
        if diff > 1e-4:
            print(json.dumps(summary, indent=2))
            sys.exit(f"upcycled model differs from the dense model by {diff}")
    print(json.dumps(summary, indent=2))
    return model


if __name__ == "__main__":
    main()
