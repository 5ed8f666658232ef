"""The parameter tree of `vmoe.nn.vit_moe.VisionTransformerMoe`: the architecture its shapes show
(`infer_vmoe_architecture`) and its mapping onto the state dict of `VMoEForImageClassification`
(`vmoe_params_to_state_dict`). Trees of models hf_vmoe cannot represent (E^3 ensembles, MAP heads, ...) raise a
ValueError naming what does not fit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["infer_vmoe_architecture", "vmoe_params_to_state_dict"]

# ----------------------------------------------------------------------------------------------------------------
# The parameter tree: architecture and weights
# ----------------------------------------------------------------------------------------------------------------


def _shape(tree: Mapping, *path: str) -> tuple[int, ...]:
    node = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise ValueError(f"the checkpoint has no parameter {'/'.join(path)}")
        node = node[key]
    if not hasattr(node, "shape"):
        raise ValueError(f"the checkpoint's {'/'.join(path)} is not an array")
    return tuple(node.shape)


def _get(tree: Mapping, path: str) -> np.ndarray:
    node = tree
    for key in path.split("/"):
        if not isinstance(node, Mapping) or key not in node:
            raise ValueError(f"the checkpoint has no parameter {path}")
        node = node[key]
    return np.asarray(node)


def _flat_paths(tree: Mapping, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out += _flat_paths(value, name + "/") if isinstance(value, Mapping) else [name]
    return out


def infer_vmoe_architecture(params: Mapping) -> dict:
    """What the parameter tree of a `VisionTransformerMoe` shows, as vmoe model-config fields (flat keys as in
    `vmoe.configs.vmoe_paper.common.flatten_dict`) plus `image_size` (square images assumed) and
    `num_positions`. Raises a ValueError for trees of other models (ensembles, MAP heads, ...)."""
    if "Encoder" not in params:
        raise ValueError(f"the checkpoint has no Encoder; top-level parameters: {sorted(params)}")
    encoder = params["Encoder"]
    blocks = sorted(int(k.rpartition("_")[2]) for k in encoder if k.startswith("encoderblock_"))
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"the checkpoint's encoder blocks are {blocks}; expected encoderblock_0 ... encoderblock_N-1")
    kh, kw, channels, hidden = _shape(params, "embedding", "kernel")
    arch = {"patch_size": (kh, kw), "hidden_size": hidden, "num_channels": channels,
            "encoder.num_layers": len(blocks)}
    if "MapHead" in params:
        raise ValueError("the checkpoint has a MAP head (classifier='map', multihead attention pooling); hf_vmoe "
                         "pools with the class token or the mean only, so it cannot be converted")
    arch["classifier"] = "token" if "cls" in params else "gap"
    if "posembed_input" not in encoder:
        raise ValueError("the checkpoint has no learned position embedding (Encoder/posembed_input): sincos2d or no "
                         "position embeddings are not supported by hf_vmoe")
    _, positions, pos_width = _shape(encoder, "posembed_input", "pos_embedding")
    if pos_width != hidden:
        raise ValueError(f"pos_embedding width {pos_width} != embedding width {hidden}")
    arch["num_positions"] = positions
    patches = positions - (1 if arch["classifier"] == "token" else 0)
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"the position embedding has {patches} patch positions, not a square grid: give image_size")
    arch["image_size"] = (side * kh, side * kw)
    mlp_dims, moe_layers, heads, experts, expert_dims = set(), [], set(), set(), set()
    router_params, slots = set(), set()  # "dense" (top-k, expert choice) or "soft"; Soft MoE slots per expert
    for b in blocks:
        block = encoder[f"encoderblock_{b}"]
        if "MultiHeadDotProductAttention_0" in block or "SelfAttention" not in block:
            raise ValueError(f"encoderblock_{b} has no SelfAttention module (keys {sorted(block)})")
        q = _shape(block, "SelfAttention", "query", "kernel")
        if len(q) != 3 or q[0] != hidden:
            raise ValueError(f"encoderblock_{b}/SelfAttention/query/kernel has shape {q}, expected ({hidden}, heads, dim)")
        if "query_ln" in block["SelfAttention"] or "key_ln" in block["SelfAttention"]:
            raise ValueError("the checkpoint normalises queries and keys (attention_qk_norm=True), which hf_vmoe lacks")
        heads.add(q[1])
        if "Moe" in block:
            moe = block["Moe"]
            if isinstance(moe.get("Router"), Mapping) and {"mu", "scale"} & set(moe["Router"]):  # Soft MoE
                mu = _shape(moe, "Router", "mu")
                scale = _shape(moe, "Router", "scale")
                if len(mu) != 3 or mu[0] != hidden or scale not in ((), (1,)):
                    raise ValueError(f"encoderblock_{b}/Moe/Router has mu {mu} and scale {scale}: a Soft MoE router "
                                     f"needs mu ({hidden}, E, slots) and a scalar scale")
                extra = sorted(set(moe["Router"]) - {"mu", "scale"})
                if extra:
                    raise ValueError(f"encoderblock_{b}/Moe/Router has parameters {extra} besides Soft MoE's mu and "
                                     "scale")
                router_experts = mu[1]
                router_params.add("soft")
                slots.add(mu[2])
            else:
                router = _shape(moe, "Router", "dense", "kernel")
                if len(router) == 3:
                    raise ValueError(
                        f"encoderblock_{b}/Moe/Router/dense/kernel has shape {router}: an E^3 ensemble router "
                        "(VisionTransformerMoeEnsemble, ensemble_size members); hf_vmoe has no ensemble routing, so "
                        "E^3 checkpoints cannot be converted"
                    )
                if len(router) != 2 or router[0] != hidden:
                    raise ValueError(f"encoderblock_{b}/Moe/Router/dense/kernel has shape {router}, expected "
                                     f"({hidden}, E)")
                extra = sorted(set(moe["Router"]) - {"dense"})
                if extra:
                    raise ValueError(f"encoderblock_{b}/Moe/Router has parameters {extra} besides 'dense': neither "
                                     "a noisy top-k / top-items router (dense) nor Soft MoE (mu, scale)")
                router_experts = router[1]
                router_params.add("dense")
            up = _shape(moe, "Mlp", "Dense_0", "kernel")
            if len(up) != 3 or up[0] != router_experts or up[1] != hidden:
                raise ValueError(f"encoderblock_{b}/Moe/Mlp/Dense_0/kernel has shape {up}, expected "
                                 f"({router_experts}, {hidden}, mlp_dim)")
            experts.add(up[0])
            expert_dims.add(up[2])
            moe_layers.append(b)
        elif "Mlp" in block:
            mlp_dims.add(_shape(block, "Mlp", "Dense_0", "kernel")[1])
        else:
            raise ValueError(f"encoderblock_{b} has neither Mlp nor Moe (keys {sorted(block)})")
    for name, values in (("num_heads", heads), ("dense mlp_dim", mlp_dims), ("num_experts", experts),
                         ("expert mlp_dim", expert_dims), ("router parameters (dense / Soft MoE)", router_params),
                         ("Soft MoE slots", slots)):
        if len(values) > 1:
            raise ValueError(f"the checkpoint's blocks differ in {name}: {sorted(values)}")
    arch["encoder.num_heads"] = heads.pop()
    if hidden % arch["encoder.num_heads"]:
        raise ValueError(f"hidden size {hidden} is not divisible by {arch['encoder.num_heads']} heads")
    arch["encoder.moe.layers"] = tuple(moe_layers)
    if moe_layers:
        arch["encoder.moe.num_experts"] = experts.pop()
        arch["encoder.moe.mlp_dim"] = expert_dims.pop()
        arch["router_params"] = router_params.pop()
        if slots:
            arch["encoder.moe.router.num_slots"] = slots.pop()
    arch["encoder.mlp_dim"] = mlp_dims.pop() if mlp_dims else arch.get("encoder.moe.mlp_dim")
    if "pre_logits" in params and isinstance(params["pre_logits"], Mapping) and "kernel" in params["pre_logits"]:
        arch["representation_size"] = _shape(params, "pre_logits", "kernel")[1]
    else:
        arch["representation_size"] = None
    if "head" in params:
        head = _shape(params, "head", "kernel")
        features = arch["representation_size"] or hidden
        if head[0] != features:
            raise ValueError(f"head/kernel has shape {head}; its input must be {features} wide")
        arch["num_classes"] = head[1]
    else:
        raise ValueError("the checkpoint has no classification head ('head'); hf_vmoe converts classifiers only")
    return arch


def _expected_paths(arch: Mapping) -> set[str]:
    paths = {"embedding/kernel", "embedding/bias", "Encoder/posembed_input/pos_embedding",
             "Encoder/encoder_norm/scale", "Encoder/encoder_norm/bias", "head/kernel", "head/bias"}
    if arch["classifier"] == "token":
        paths.add("cls")
    if arch["representation_size"]:
        paths |= {"pre_logits/kernel", "pre_logits/bias"}
    for b in range(arch["encoder.num_layers"]):
        block = f"Encoder/encoderblock_{b}"
        for ln in ("LayerNorm_0", "LayerNorm_1"):
            paths |= {f"{block}/{ln}/scale", f"{block}/{ln}/bias"}
        for proj in ("query", "key", "value", "out"):
            paths |= {f"{block}/SelfAttention/{proj}/kernel", f"{block}/SelfAttention/{proj}/bias"}
        mlp = f"{block}/Moe/Mlp" if b in arch["encoder.moe.layers"] else f"{block}/Mlp"
        for dense in ("Dense_0", "Dense_1"):
            paths |= {f"{mlp}/{dense}/kernel", f"{mlp}/{dense}/bias"}
        if b in arch["encoder.moe.layers"] and arch.get("router_params") == "soft":
            paths |= {f"{block}/Moe/Router/mu", f"{block}/Moe/Router/scale"}
        elif b in arch["encoder.moe.layers"]:
            paths.add(f"{block}/Moe/Router/dense/kernel")
    return paths


def vmoe_params_to_state_dict(params: Mapping, arch: Mapping | None = None) -> dict[str, torch.Tensor]:
    """The state dict of `VMoEForImageClassification` (float32) from a VisionTransformerMoe parameter tree.

    Flax kernels are (in, out); torch weights (out, in). Attention kernels are (hidden, heads, head_dim) for
    query/key/value and (heads, head_dim, hidden) for out; expert kernels are stacked (E, in, out) and become
    `experts.up_proj` / `down_proj` (E, out, in); the router kernel (hidden, E) becomes `router.weight` (E, hidden),
    Soft MoE's slot parameters `mu` (hidden, E, P) `router.weight` (E * P, hidden) (expert-major rows) and its `scale`
    `router.scale` (a scalar); the patch embedding (kh, kw, C, D) becomes the Conv2d weight (D, C, kh, kw)."""
    arch = dict(arch) if arch is not None else infer_vmoe_architecture(params)
    present = {p for p in _flat_paths(params) if not p.startswith("pre_logits/") or arch["representation_size"]}
    expected = _expected_paths(arch)
    unexpected = sorted(present - expected)
    missing = sorted(expected - present)
    if unexpected or missing:
        lines = [f"  unexpected: {p}" for p in unexpected[:20]] + [f"  missing: {p}" for p in missing[:20]]
        raise ValueError("the checkpoint's parameter tree does not fit a VisionTransformerMoe:\n" + "\n".join(lines))

    def t(array) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(np.asarray(array, dtype=np.float32)))

    hidden = arch["hidden_size"]
    sd = {
        "vmoe.embeddings.patch_embeddings.projection.weight": t(_get(params, "embedding/kernel").transpose(3, 2, 0, 1)),
        "vmoe.embeddings.patch_embeddings.projection.bias": t(_get(params, "embedding/bias")),
        "vmoe.embeddings.position_embeddings": t(_get(params, "Encoder/posembed_input/pos_embedding")),
        "vmoe.layernorm.weight": t(_get(params, "Encoder/encoder_norm/scale")),
        "vmoe.layernorm.bias": t(_get(params, "Encoder/encoder_norm/bias")),
        "classifier.weight": t(_get(params, "head/kernel").T),
        "classifier.bias": t(_get(params, "head/bias")),
    }
    if arch["classifier"] == "token":
        sd["vmoe.embeddings.cls_token"] = t(_get(params, "cls"))
    if arch["representation_size"]:
        sd["pre_logits.weight"] = t(_get(params, "pre_logits/kernel").T)
        sd["pre_logits.bias"] = t(_get(params, "pre_logits/bias"))
    for b in range(arch["encoder.num_layers"]):
        src, dst = f"Encoder/encoderblock_{b}", f"vmoe.encoder.layer.{b}"
        sd[f"{dst}.layernorm_before.weight"] = t(_get(params, f"{src}/LayerNorm_0/scale"))
        sd[f"{dst}.layernorm_before.bias"] = t(_get(params, f"{src}/LayerNorm_0/bias"))
        sd[f"{dst}.layernorm_after.weight"] = t(_get(params, f"{src}/LayerNorm_1/scale"))
        sd[f"{dst}.layernorm_after.bias"] = t(_get(params, f"{src}/LayerNorm_1/bias"))
        for flax_name, torch_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            kernel = _get(params, f"{src}/SelfAttention/{flax_name}/kernel")
            sd[f"{dst}.attention.{torch_name}.weight"] = t(kernel.reshape(hidden, -1).T)
            sd[f"{dst}.attention.{torch_name}.bias"] = t(_get(params, f"{src}/SelfAttention/{flax_name}/bias").reshape(-1))
        out = _get(params, f"{src}/SelfAttention/out/kernel")
        sd[f"{dst}.attention.o_proj.weight"] = t(out.reshape(-1, hidden).T)
        sd[f"{dst}.attention.o_proj.bias"] = t(_get(params, f"{src}/SelfAttention/out/bias"))
        if b in arch["encoder.moe.layers"]:
            mlp = f"{src}/Moe/Mlp"
            if arch.get("router_params") == "soft":
                mu = _get(params, f"{src}/Moe/Router/mu")
                sd[f"{dst}.mlp.router.weight"] = t(mu.reshape(hidden, -1).T)
                sd[f"{dst}.mlp.router.scale"] = t(_get(params, f"{src}/Moe/Router/scale")).reshape(())
            else:
                sd[f"{dst}.mlp.router.weight"] = t(_get(params, f"{src}/Moe/Router/dense/kernel").T)
            sd[f"{dst}.mlp.experts.up_proj"] = t(_get(params, f"{mlp}/Dense_0/kernel").transpose(0, 2, 1))
            sd[f"{dst}.mlp.experts.up_proj_bias"] = t(_get(params, f"{mlp}/Dense_0/bias"))
            sd[f"{dst}.mlp.experts.down_proj"] = t(_get(params, f"{mlp}/Dense_1/kernel").transpose(0, 2, 1))
            sd[f"{dst}.mlp.experts.down_proj_bias"] = t(_get(params, f"{mlp}/Dense_1/bias"))
        else:
            sd[f"{dst}.mlp.fc1.weight"] = t(_get(params, f"{src}/Mlp/Dense_0/kernel").T)
            sd[f"{dst}.mlp.fc1.bias"] = t(_get(params, f"{src}/Mlp/Dense_0/bias"))
            sd[f"{dst}.mlp.fc2.weight"] = t(_get(params, f"{src}/Mlp/Dense_1/kernel").T)
            sd[f"{dst}.mlp.fc2.bias"] = t(_get(params, f"{src}/Mlp/Dense_1/bias"))
    return sd
