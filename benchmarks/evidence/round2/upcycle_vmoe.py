#!/usr/bin/env python
"""Upcycle a trained DENSE VMoE checkpoint (classification or segmentation) into an MoE checkpoint (issue 15, B/C).

Why this helper: the example scripts cannot do two of round 2's conversions yet.
* `run_image_classification.py --init_from_dense` copies the dense MLP into full-width experts only; a model with a
  shared expert (ViMoE, arm B-token-shared) is refused ("the dense model has no weights for ...shared_expert").
* `run_semantic_segmentation.py --upcycle_from` reads transformers ViT / DeiT / DINOv2 checkpoints, not a dense
  VMoE (model_type "vmoe"), so a segmentation model trained with that script cannot be upcycled by it (arm C).
The package's `hf_vmoe.recipes.upcycling.upcycled_state_dict` does the conversion itself (it reads any model with ViT-style
blocks, and a dense VMoE is one); this script calls it, keeps the dense model's trained head (classifier or
decode head), checks that the function is what it should be, and saves a checkpoint that the scripts continue
with `--model_name_or_path`.

Modes (MoE blocks only; every other weight is copied):
* `copy`: every routed expert = the dense MLP (`expert_init="copy"`, full width). No shared expert.
* `split_shared`: equal active compute WITH a shared expert: the dense MLP's hidden units are split in two halves;
  the shared expert = the first half (and the whole fc2 bias), every routed expert = a copy of the second half
  (no bias). With k=1 and a combine weight of 1, shared + routed = the dense MLP exactly.
* `vit`: no MoE at all: write the dense VMoE backbone as a transformers `ViTModel` checkpoint (for the
  segmentation script's `--upcycle_from ... --head upernet`, the only way that script builds UperNet from a trained
  backbone). The ViT <-> VMoE key map is derived, not hard-coded: a random ViT is upcycled into a dense VMoE with
  the package's own `upcycle`, and each VMoE tensor is matched to the ViT tensor it was copied from.

With `normalize_router_weights=true` (or k=1 top-1 weight 1) the upcycled model computes the dense function; with
the V-MoE combine (false, the config default) the routed experts' output is scaled by the router's probability,
so the start is not the dense function: the script reports the max logit difference either way.

    python benchmarks/evidence/round2/upcycle_vmoe.py --dense RUN_DIR --output OUT_DIR --mode split_shared \
        --config_overrides "routing_level=token,num_experts=4,num_experts_per_tok=1,moe_layers=last:2"
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

import hf_vmoe  # noqa: F401  (registers the Auto classes)
from hf_vmoe import VMoEConfig, VMoEForImageClassification, VMoEForSemanticSegmentation
from hf_vmoe.integrations.data import parse_config_overrides
from hf_vmoe.recipes.upcycling import upcycle, upcycled_state_dict

PROCESSOR_FILES = ("preprocessor_config.json",)


def load_dense(path: Path):
    config = VMoEConfig.from_pretrained(path)
    if config.moe_layers:
        raise SystemExit(f"{path} is not dense (moe_layers={config.moe_layers})")
    arch = (config.architectures or ["VMoEForImageClassification"])[0]
    cls = VMoEForSemanticSegmentation if "Segmentation" in arch else VMoEForImageClassification
    return cls.from_pretrained(path).eval(), cls


def moe_config(dense_config: VMoEConfig, mode: str, overrides: dict) -> VMoEConfig:
    fields = dense_config.to_dict()
    for k in ("architectures", "transformers_version", "auto_map", "_name_or_path", "model_type"):
        fields.pop(k, None)
    fields.update(overrides)
    width = dense_config.intermediate_size
    if mode == "copy":
        fields.update(moe_intermediate_size=width, num_shared_experts=0)
    else:
        if width % 2:
            raise SystemExit(f"split_shared needs an even MLP width, got {width}")
        fields.update(moe_intermediate_size=width // 2, num_shared_experts=1, shared_expert_intermediate_size=width // 2)
    if fields.get("routing_level") == "token" and "shared_router" not in overrides:
        fields["shared_router"] = False  # the dense config resolved it to True (image routing default)
    config = VMoEConfig(**fields)
    if not config.moe_layers:
        raise SystemExit("the MoE config has no MoE blocks: give moe_layers=... in --config_overrides")
    return config


def upcycled(dense, cls, config: VMoEConfig, mode: str, seed: int):
    torch.manual_seed(seed)
    model = cls(config)
    base_prefix = model.base_model_prefix
    # the package's conversion, in copy mode with full-width experts and no shared expert
    copy_cfg = VMoEConfig(**{**config.to_dict(), "num_shared_experts": 0,
                             "moe_intermediate_size": dense.config.intermediate_size})
    state = upcycled_state_dict(dense, copy_cfg, expert_init="copy")
    if mode == "split_shared":
        half = dense.config.intermediate_size // 2
        for i in config.moe_layers:
            p = f"encoder.layer.{i}.mlp."
            up, up_b = state.pop(p + "experts.up_proj"), state.pop(p + "experts.up_proj_bias")
            down, down_b = state.pop(p + "experts.down_proj"), state.pop(p + "experts.down_proj_bias")
            state[p + "shared_expert.fc1.weight"] = up[0, :half].clone()
            state[p + "shared_expert.fc1.bias"] = up_b[0, :half].clone()
            state[p + "shared_expert.fc2.weight"] = down[0, :, :half].clone()
            state[p + "shared_expert.fc2.bias"] = down_b[0].clone()
            state[p + "experts.up_proj"] = up[:, half:].contiguous()
            state[p + "experts.up_proj_bias"] = up_b[:, half:].contiguous()
            state[p + "experts.down_proj"] = down[:, :, half:].contiguous()
            state[p + "experts.down_proj_bias"] = torch.zeros_like(down_b)
    full = {f"{base_prefix}.{k}": v for k, v in state.items()}
    # the dense model's own head (classifier / decode head): every non-backbone weight of the same name and shape
    target = model.state_dict()
    for k, v in dense.state_dict().items():
        if not k.startswith(base_prefix + ".") and k in target and target[k].shape == v.shape:
            full[k] = v
    missing, unexpected = model.load_state_dict(full, strict=False)
    missing = [k for k in missing if "router" not in k]
    if missing or unexpected:
        raise SystemExit(f"upcycling left weights unset: missing={missing[:5]}, unexpected={unexpected[:5]}")
    return model.eval()


@torch.no_grad()
def max_logit_diff(a, b, config) -> float:
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    x = torch.randn(4, config.num_channels, size, size, generator=torch.Generator().manual_seed(0))
    la, lb = a(pixel_values=x).logits, b(pixel_values=x).logits
    return float((la - lb).abs().max())


def to_vit(dense, output: Path):
    """The dense VMoE backbone as a transformers ViTModel checkpoint (outputs checked equal)."""
    from transformers import ViTConfig, ViTModel

    c = dense.config
    size = c.image_size if isinstance(c.image_size, int) else c.image_size[0]
    patch = c.patch_size if isinstance(c.patch_size, int) else c.patch_size[0]
    vit_cfg = ViTConfig(hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
                        hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps, image_size=size, patch_size=patch,
                        num_channels=c.num_channels, qkv_bias=getattr(c, "qkv_bias", True),
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    vit = ViTModel(vit_cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # distinct random values everywhere (zero biases / unit norms would be ambiguous)
        for param in vit.parameters():
            param.normal_()
    probe = upcycle(vit, task="base", moe_layers="none")  # dense VMoE made from the random ViT by the package
    vit_state = vit.state_dict()
    key_map = {}
    for vk, vv in probe.state_dict().items():
        hits = [k for k, t in vit_state.items() if t.shape == vv.shape and torch.equal(t, vv)]
        if len(hits) != 1:
            raise SystemExit(f"cannot map VMoE weight {vk} to one ViT weight (found {hits})")
        key_map[vk] = hits[0]
    base = getattr(dense, dense.base_model_prefix)
    new_state = {key_map[k]: v for k, v in base.state_dict().items() if k in key_map}
    vit.load_state_dict(new_state, strict=True)
    x = torch.randn(2, c.num_channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((vit(pixel_values=x).last_hidden_state - base(pixel_values=x).last_hidden_state).abs().max())
    if diff > 1e-4:
        raise SystemExit(f"the ViT copy differs from the dense VMoE backbone by {diff}")
    vit.save_pretrained(output)
    return diff


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", type=Path, required=True, help="a trained dense VMoE run directory")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--mode", choices=("copy", "split_shared", "vit"), required=True)
    parser.add_argument("--config_overrides", default="", help="MoE fields, e.g. 'routing_level=token,num_experts=4'")
    parser.add_argument("--seed", type=int, default=0, help="seeds the routers' initialisation")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dense, cls = load_dense(args.dense)
    tmp = args.output.with_name(args.output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if args.mode == "vit":
        diff = to_vit(dense, tmp)
        report = {"mode": "vit", "dense": str(args.dense), "max_hidden_state_diff": diff}
    else:
        config = moe_config(dense.config, args.mode, parse_config_overrides(args.config_overrides) or {})
        model = upcycled(dense, cls, config, args.mode, args.seed)
        diff = max_logit_diff(dense, model, config)
        if config.normalize_router_weights and diff > 1e-3:
            raise SystemExit(f"normalised upcycling should compute the dense function, max logit diff {diff}")
        model.save_pretrained(tmp)
        report = {"mode": args.mode, "dense": str(args.dense), "max_logit_diff_vs_dense": diff,
                  "normalize_router_weights": config.normalize_router_weights,
                  "moe_layers": list(config.moe_layers), "num_experts": config.num_experts,
                  "moe_intermediate_size": config.moe_intermediate_size,
                  "num_shared_experts": config.num_shared_experts, "routing_level": config.routing_level}
    for name in PROCESSOR_FILES:
        if (args.dense / name).is_file():
            shutil.copy(args.dense / name, tmp / name)
    (tmp / "upcycle_report.json").write_text(json.dumps(report, indent=1) + "\n")
    shutil.rmtree(args.output, ignore_errors=True)
    tmp.rename(args.output)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
