"""Sparse upcycling: turn a dense transformers ViT / DeiT / DINOv2 checkpoint into a VMoE.

Every weight of the dense model is copied (patch and position embeddings, class token, attention, norms, layer
scale, final norm, classification head). In each block chosen as an MoE block the dense MLP becomes the experts:

- ``expert_init="copy"`` (sparse upcycling, Komatsuzaki et al. 2023; ViMoE's initialisation): every expert is a copy
  of the dense MLP, optionally perturbed by ``expert_noise_std`` (relative to each weight's std);
- ``expert_init="split"`` (MoEfication-style): the MLP's hidden units are split into ``num_experts`` disjoint slices,
  one per expert, each with ``intermediate_size / num_experts`` units; the slices' outputs are scaled by
  ``num_experts`` so that a uniform router over all experts gives back the dense MLP;
- ``expert_init="split_shared"`` (ViMoE at the dense model's active compute): the MLP's hidden units are split in
  two halves; the shared expert is the first half (with the whole output bias), every routed expert a copy of the
  second half (no output bias). With k = 1 and a combine weight of 1 (``normalize_router_weights=True``), shared +
  routed = the dense MLP, and a token costs what it cost in the dense model.

``drop_ratio`` (Drop-Upcycling, Nakamura et al., ICLR 2025) then re-initialises a share of each expert's hidden
units, a different random subset per expert, so experts start diverse instead of identical (see
:func:`drop_upcycle_experts`).

With ``num_shared_experts > 0`` and ``"copy"`` / ``"split"``, the shared expert is initialised from the dense MLP too,
and the routed and shared outputs are both halved (their ``down_proj`` / ``fc2`` weights and biases), so that
shared + routed = dense.

Routers start from the model's random initialisation. Because the config is set to
``normalize_router_weights=True`` (the top-k combine weights sum to one) and all experts are identical, the
upcycled model computes exactly the dense function whatever the router says; training then lets experts diverge.
Note that with ``k=1`` and normalised weights the combine weight is always 1, so the router never gets a gradient
from the task loss (even once the experts differ) and learns only through the auxiliary (balancing / z / super-class)
losses; ``k=2`` gives the router a task gradient.

Entry point: :func:`upcycle` (a model object or a local checkpoint directory in, a VMoE model out).

Limitations (refused with a ValueError rather than silently changed):
- DINOv2 with SwiGLU FFNs (``use_swiglu_ffn=True``, the giant model) and DINOv2 with register tokens;
- DeiT's distillation token, which the VMoE embeddings do not have: pass ``drop_distillation_token=True`` to
  convert anyway (the token and the distillation head are dropped, so outputs change). DeiT checkpoints without a
  distillation token are ViT checkpoints (``model_type="vit"``) and convert exactly.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.utils import logging

from ..configuration_vmoe import VMoEConfig, to_pair
from ..modeling_vmoe import (
    VMoEBackbone,
    VMoEForImageClassification,
    VMoEForSemanticSegmentation,
    VMoEModel,
)

logger = logging.get_logger(__name__)

SUPPORTED_MODEL_TYPES = ("vit", "deit", "dinov2")
TASKS = ("auto", "classification", "base", "segmentation", "backbone")
EXPERT_INITS = ("copy", "split", "split_shared")
_TASK_CLASSES = {
    "classification": VMoEForImageClassification,
    "base": VMoEModel,
    "segmentation": VMoEForSemanticSegmentation,
    "backbone": VMoEBackbone,
}
# Fields the dense config decides; the MoE-side keyword arguments may not override them.
_DENSE_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps", "patch_size",
    "num_channels", "qkv_bias", "layerscale_value",
)


# --------------------------------------------------------------------------------------------------------------
# Reading the dense model
# --------------------------------------------------------------------------------------------------------------


def load_dense_model(path: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """Load a dense ViT / DeiT / DINOv2 checkpoint with the class its config names (its head included)."""
    import transformers

    config = AutoConfig.from_pretrained(path, **kwargs)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"cannot upcycle model_type={config.model_type!r} from {path}: supported are {SUPPORTED_MODEL_TYPES}"
        )
    model_class = None
    for architecture in getattr(config, "architectures", None) or ():
        candidate = getattr(transformers, architecture, None)
        if candidate is not None and not architecture.endswith(("ForMaskedImageModeling", "ForPreTraining")):
            model_class = candidate
            break
    if model_class is None:
        model_class = transformers.AutoModel
    return model_class.from_pretrained(path, **kwargs)


def _base_and_head(dense: nn.Module):
    """(base model, classifier module or None, kind of head) of a transformers ViT / DeiT / DINOv2 model."""
    prefix = getattr(dense, "base_model_prefix", None)
    base = getattr(dense, prefix, None) if prefix else None
    if base is None or not hasattr(base, "embeddings"):
        base = dense
    if not hasattr(base, "embeddings"):
        raise ValueError(f"{type(dense).__name__} has no embeddings: not a ViT / DeiT / DINOv2 model")
    if hasattr(dense, "cls_classifier"):  # DeiTForImageClassificationWithTeacher
        return base, dense.cls_classifier, "deit_teacher"
    classifier = getattr(dense, "classifier", None) if dense is not base else None
    return base, classifier, "classifier" if classifier is not None else None


def _get_path(module: nn.Module, path: str):
    """`module.a.b` for `path="a.b"`, or None when an attribute on the way is missing."""
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _layers(base: nn.Module) -> list[nn.Module]:
    for path in ("layers", "encoder.layer", "encoder.layers"):
        module = _get_path(base, path)
        if module is not None:
            return list(module)
    raise ValueError(f"cannot find the transformer blocks of {type(base).__name__}")


def _first_attr(module: nn.Module, *names: str) -> nn.Module:
    for name in names:
        obj = _get_path(module, name)
        if obj is not None:
            return obj
    raise ValueError(f"{type(module).__name__} has none of {names}; unsupported transformers version or model")


def _block_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """Named sub-modules of one dense block, across ViT/DeiT (v5 and v4 names) and DINOv2."""
    attention = layer.attention
    return {
        "q_proj": _first_attr(attention, "q_proj", "attention.query"),
        "k_proj": _first_attr(attention, "k_proj", "attention.key"),
        "v_proj": _first_attr(attention, "v_proj", "attention.value"),
        "o_proj": _first_attr(attention, "o_proj", "output.dense"),
        "layernorm_before": _first_attr(layer, "layernorm_before", "norm1"),
        "layernorm_after": _first_attr(layer, "layernorm_after", "norm2"),
        "fc1": _first_attr(layer, "mlp.fc1", "intermediate.dense"),
        "fc2": _first_attr(layer, "mlp.fc2", "output.dense"),
    }


def _check_supported(dense: nn.Module, drop_distillation_token: bool) -> None:
    config = dense.config
    model_type = getattr(config, "model_type", None)
    if model_type == "dinov2_with_registers" or getattr(config, "num_register_tokens", 0):
        raise ValueError(
            f"cannot upcycle a DINOv2 model with register tokens (num_register_tokens="
            f"{getattr(config, 'num_register_tokens', '?')}): VMoE has no register tokens; use a DINOv2 checkpoint "
            "without registers"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"cannot upcycle model_type={model_type!r}: supported are {SUPPORTED_MODEL_TYPES}")
    if getattr(config, "use_swiglu_ffn", False):
        raise ValueError(
            "cannot upcycle a DINOv2 model with use_swiglu_ffn=True: VMoE experts are GELU MLPs (fc1 -> act -> fc2), "
            "not SwiGLU FFNs"
        )
    if model_type == "deit" and not drop_distillation_token:
        raise ValueError(
            "DeiT models carry a distillation token that VMoE does not have, so the upcycled model could not "
            "compute the dense function; pass drop_distillation_token=True to convert anyway (the token and the "
            "distillation head are dropped). Non-distilled DeiT checkpoints are model_type='vit' and convert exactly."
        )
    if getattr(config, "hidden_act", "gelu") not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu",
                                                      "quick_gelu"):
        raise ValueError(f"unsupported hidden_act={config.hidden_act!r} in the dense model")


def vmoe_config_from_dense(
    dense_config, task: str = "classification", image_size: int | tuple[int, int] | None = None, **moe_kwargs
) -> VMoEConfig:
    """The VMoE config that mirrors a dense ViT / DeiT / DINOv2 config, plus the MoE fields in `moe_kwargs`."""
    clash = sorted(set(moe_kwargs) & set(_DENSE_FIELDS))
    if clash:
        raise ValueError(f"{clash} come from the dense model and cannot be changed when upcycling")
    model_type = dense_config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"cannot upcycle model_type={model_type!r}: supported are {SUPPORTED_MODEL_TYPES}")
    if model_type == "dinov2":
        intermediate_size = int(dense_config.hidden_size * dense_config.mlp_ratio)
        layerscale_value = float(dense_config.layerscale_value)
        pooling = "cls_mean" if task == "classification" else "cls"
    else:
        intermediate_size = dense_config.intermediate_size
        layerscale_value = None
        pooling = "cls"
    fields: dict[str, Any] = dict(
        hidden_size=dense_config.hidden_size,
        num_hidden_layers=dense_config.num_hidden_layers,
        num_attention_heads=dense_config.num_attention_heads,
        intermediate_size=intermediate_size,
        hidden_act=dense_config.hidden_act,
        hidden_dropout_prob=dense_config.hidden_dropout_prob,
        attention_probs_dropout_prob=dense_config.attention_probs_dropout_prob,
        initializer_range=dense_config.initializer_range,
        layer_norm_eps=dense_config.layer_norm_eps,
        image_size=image_size if image_size is not None else dense_config.image_size,
        patch_size=dense_config.patch_size,
        num_channels=dense_config.num_channels,
        qkv_bias=getattr(dense_config, "qkv_bias", True),
        layerscale_value=layerscale_value,
        drop_path_rate=getattr(dense_config, "drop_path_rate", 0.0),
        pooling=pooling,
        normalize_router_weights=True,
    )
    if task == "classification" and "num_labels" not in moe_kwargs and "id2label" not in moe_kwargs:
        fields["id2label"] = {int(k): v for k, v in dense_config.id2label.items()}
        fields["label2id"] = {v: int(k) for k, v in dense_config.id2label.items()}
    fields.update(moe_kwargs)
    if "id2label" in moe_kwargs and "label2id" not in moe_kwargs:
        fields["label2id"] = {v: int(k) for k, v in moe_kwargs["id2label"].items()}
    if "id2label" in fields:  # num_labels is implied by id2label
        fields.pop("num_labels", None)
    return VMoEConfig(**fields)


# --------------------------------------------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------------------------------------------


def _position_embeddings(dense_base: nn.Module, config: VMoEConfig, drop_distillation: bool) -> torch.Tensor:
    """Position embeddings for the VMoE grid `config.image_size`, computed with the dense model's own interpolation
    (DINOv2 interpolates at every forward; ViT/DeiT do with `interpolate_pos_encoding=True`)."""
    embeddings = dense_base.embeddings
    pos = embeddings.position_embeddings.detach()
    num_special = 2 if drop_distillation else 1
    height, width = to_pair(config.image_size)
    patch = to_pair(config.patch_size)
    num_patches = (height // patch[0]) * (width // patch[1])
    dense_grid = to_pair(dense_base.config.image_size)
    same_size = (height, width) == dense_grid and pos.shape[1] - num_special == num_patches
    if not same_size:
        dummy = pos.new_zeros(1, num_special + num_patches, pos.shape[-1])
        with torch.no_grad():
            pos = embeddings.interpolate_pos_encoding(dummy, height, width).detach()
    if pos.shape[1] != num_special + num_patches:
        raise ValueError(
            f"position embeddings of shape {tuple(pos.shape)} do not fit image_size={config.image_size} with "
            f"patch_size={config.patch_size}"
        )
    if drop_distillation:
        pos = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
    return pos.clone()


def _moe_tensors(fc1: nn.Linear, fc2: nn.Linear, config: VMoEConfig, expert_init: str, noise_std: float,
                 generator: torch.Generator | None, drop_ratio: float = 0.0) -> tuple[dict, dict]:
    """One MoE block's weights from a dense fc1/fc2 pair: (stacked (E, out, in) routed expert tensors, shared expert
    tensors; {} without a shared expert). With `"copy"` / `"split"` and a shared expert, routed and shared outputs are
    both halved, so that shared + routed = dense; `"split_shared"` splits the MLP in two halves instead."""
    num_experts, num_shared = config.num_experts, config.num_shared_experts
    w1, b1 = fc1.weight.detach(), fc1.bias.detach()
    w2, b2 = fc2.weight.detach(), fc2.bias.detach()
    if expert_init == "split_shared":
        tensors, shared = split_shared_tensors(w1, b1, w2, b2, num_experts)
    else:
        scale = 0.5 if num_shared else 1.0
        if expert_init == "copy":
            up = w1.unsqueeze(0).repeat(num_experts, 1, 1)
            up_bias = b1.unsqueeze(0).repeat(num_experts, 1)
            down = w2.unsqueeze(0).repeat(num_experts, 1, 1) * scale
        else:  # split the hidden units: expert e gets units [e * I/E, (e + 1) * I/E)
            width = config.moe_intermediate_size
            up = w1.reshape(num_experts, width, -1).clone()
            up_bias = b1.reshape(num_experts, width).clone()
            down = w2.reshape(w2.shape[0], num_experts, width).permute(1, 0, 2) * (num_experts * scale)
        down_bias = b2.unsqueeze(0).repeat(num_experts, 1) * scale
        tensors = {"up_proj": up, "up_proj_bias": up_bias, "down_proj": down, "down_proj_bias": down_bias}
        shared = {}
        if num_shared:  # width num_shared * shared_expert_intermediate_size: the dense MLP tiled num_shared times,
            # each copy's output divided by that count
            shared = {"fc1.weight": w1.repeat(num_shared, 1), "fc1.bias": b1.repeat(num_shared),
                      "fc2.weight": w2.repeat(1, num_shared) * (scale / num_shared), "fc2.bias": b2 * scale}
    if noise_std > 0:
        for name in ("up_proj", "down_proj"):
            tensors[name] = _perturb(tensors[name], noise_std, generator)
    tensors = drop_upcycle_experts(tensors, drop_ratio, generator)
    return {k: v.contiguous() for k, v in tensors.items()}, shared


def _half_width(width: int) -> int:
    if width % 2:
        raise ValueError(f"expert_init='split_shared' splits the dense MLP in two halves: its width must be even, "
                         f"got {width}")
    return width // 2


def split_shared_tensors(fc1_weight: torch.Tensor, fc1_bias: torch.Tensor, fc2_weight: torch.Tensor,
                         fc2_bias: torch.Tensor, num_experts: int) -> tuple[dict, dict]:
    """`expert_init="split_shared"`: a dense MLP (fc1 (I, H), fc2 (H, I)) split at I / 2 into the shared expert, the
    first half with the whole fc2 bias, and `num_experts` routed experts, each a copy of the second half with a
    zero output bias. Returns (stacked expert tensors as in `VMoEExperts`, shared expert tensors as in `VMoEMLP`)."""
    half = _half_width(fc1_weight.shape[0])
    experts = {
        "up_proj": fc1_weight[half:].unsqueeze(0).repeat(num_experts, 1, 1),
        "up_proj_bias": fc1_bias[half:].unsqueeze(0).repeat(num_experts, 1),
        "down_proj": fc2_weight[:, half:].unsqueeze(0).repeat(num_experts, 1, 1),
        "down_proj_bias": torch.zeros(num_experts, fc2_weight.shape[0], dtype=fc2_bias.dtype, device=fc2_bias.device),
    }
    shared = {"fc1.weight": fc1_weight[:half].clone(), "fc1.bias": fc1_bias[:half].clone(),
              "fc2.weight": fc2_weight[:, :half].clone(), "fc2.bias": fc2_bias.clone()}
    return experts, shared


def _perturb(value: torch.Tensor, noise_std: float, generator: torch.Generator | None,
             reference_std: torch.Tensor | None = None) -> torch.Tensor:
    """`value` plus Gaussian noise of std `noise_std` times `reference_std` (default: `value.std()`). The noise is
    drawn on the CPU (where `generator` lives) so that a seed gives the same experts on every device."""
    reference_std = value.std() if reference_std is None else reference_std
    noise = torch.randn(value.shape, generator=generator, dtype=value.dtype).to(value.device)
    return value + noise * noise_std * reference_std


def check_drop_ratio(drop_ratio) -> float:
    """`drop_ratio` as a float, or a ValueError naming it when it is not a number in [0, 1]."""
    if isinstance(drop_ratio, bool) or not isinstance(drop_ratio, (int, float)) or not 0.0 <= drop_ratio <= 1.0:
        raise ValueError(f"drop_ratio must be a number in [0, 1] (the share of each expert's hidden units to "
                         f"re-initialise), got {drop_ratio!r}")
    return float(drop_ratio)


def _redraw(reference: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """Normal draws with `reference`'s mean and std (drawn on the CPU, where `generator` lives)."""
    values = torch.randn(shape, generator=generator, dtype=torch.float32)
    mean, std = reference.float().mean(), reference.float().std(correction=0)
    return (values * std + mean).to(reference.dtype).to(reference.device)


def drop_upcycle_experts(experts: dict[str, torch.Tensor], drop_ratio: float,
                         generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Drop-Upcycling (Nakamura et al., ICLR 2025): in each expert, re-initialise `round(drop_ratio * width)` of its
    hidden units, a different random subset per expert; everything else stays as it is.

    `experts` holds stacked expert tensors, `up_proj` (E, width, hidden), `up_proj_bias` (E, width) and
    `down_proj` (E, hidden, width) (`down_proj_bias` is per output, not per hidden unit, and is kept). A
    re-initialised unit gets new rows of `up_proj` and `up_proj_bias` and a new column of `down_proj`, drawn from
    a normal distribution with the mean and std of that expert's matrix before the drop (for copies: the dense
    matrix's statistics), as the paper does. We follow the paper rather than the model's initialiser
    (`_init_weights`: truncated normal of std `initializer_range`, zero biases) because training moves each
    matrix's scale away from the initialiser's, layer by layer, and a unit drawn at another scale than the kept
    ones would start too loud or nearly silent beside them. Experts thus start diverse (a different subset each) while keeping most of the
    dense knowledge. `generator` seeds the subsets and the draws. Returns new tensors; `drop_ratio=0` returns
    `experts` unchanged."""
    drop_ratio = check_drop_ratio(drop_ratio)
    up, up_bias, down = experts["up_proj"], experts["up_proj_bias"], experts["down_proj"]
    num_experts, width = up_bias.shape
    count = round(drop_ratio * width)
    if count == 0:
        return experts
    up, up_bias, down = up.clone(), up_bias.clone(), down.clone()
    for e in range(num_experts):
        units = torch.randperm(width, generator=generator)[:count].to(up.device)
        up[e, units] = _redraw(experts["up_proj"][e], (count, up.shape[2]), generator)
        up_bias[e, units] = _redraw(experts["up_proj_bias"][e], (count,), generator)
        down[e][:, units] = _redraw(experts["down_proj"][e], (down.shape[1], count), generator)
    return {**experts, "up_proj": up, "up_proj_bias": up_bias, "down_proj": down}


def upcycled_state_dict(
    dense: nn.Module,
    config: VMoEConfig,
    expert_init: str = "copy",
    expert_noise_std: float = 0.0,
    drop_distillation_token: bool = False,
    generator: torch.Generator | None = None,
    drop_ratio: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The VMoE base-model weights (keys as in `VMoEModel`, routers excluded) made from a dense model.
    `drop_ratio`: share of each expert's hidden units re-initialised (`drop_upcycle_experts`; the shared expert
    stays a copy); `generator` seeds it and the expert noise."""
    drop_ratio = check_drop_ratio(drop_ratio)
    base, _, _ = _base_and_head(dense)
    drop = dense.config.model_type == "deit" and drop_distillation_token
    emb = base.embeddings
    state = {
        "embeddings.cls_token": emb.cls_token.detach().clone(),
        "embeddings.position_embeddings": _position_embeddings(base, config, drop),
        "embeddings.patch_embeddings.projection.weight": emb.patch_embeddings.projection.weight.detach().clone(),
        "embeddings.patch_embeddings.projection.bias": emb.patch_embeddings.projection.bias.detach().clone(),
        "layernorm.weight": base.layernorm.weight.detach().clone(),
        "layernorm.bias": base.layernorm.bias.detach().clone(),
    }
    layers = _layers(base)
    if len(layers) != config.num_hidden_layers:
        raise ValueError(f"dense model has {len(layers)} blocks but the config says {config.num_hidden_layers}")
    if expert_init == "split_shared" and config.num_shared_experts != 1:
        raise ValueError(f"expert_init='split_shared' puts half of each dense MLP in one shared expert: the config "
                         f"needs num_shared_experts=1, got {config.num_shared_experts}")
    for i, layer in enumerate(layers):
        prefix = f"encoder.layer.{i}."
        modules = _block_modules(layer)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "layernorm_before", "layernorm_after"):
            for pname, param in modules[name].named_parameters():
                key = f"{prefix}attention.{name}.{pname}" if name.endswith("proj") else f"{prefix}{name}.{pname}"
                state[key] = param.detach().clone()
        if config.layerscale_value is not None:
            state[f"{prefix}layer_scale1.lambda1"] = layer.layer_scale1.lambda1.detach().clone()
            state[f"{prefix}layer_scale2.lambda1"] = layer.layer_scale2.lambda1.detach().clone()
        fc1, fc2 = modules["fc1"], modules["fc2"]
        if i not in config.moe_layers:
            for name, module in (("fc1", fc1), ("fc2", fc2)):
                state[f"{prefix}mlp.{name}.weight"] = module.weight.detach().clone()
                state[f"{prefix}mlp.{name}.bias"] = module.bias.detach().clone()
            continue
        experts, shared = _moe_tensors(fc1, fc2, config, expert_init, expert_noise_std, generator, drop_ratio)
        for name, value in experts.items():
            state[f"{prefix}mlp.experts.{name}"] = value
        for name, value in shared.items():
            state[f"{prefix}mlp.shared_expert.{name}"] = value
    return state


def upcycle(
    dense: PreTrainedModel | str | os.PathLike,
    task: str = "auto",
    expert_init: str = "copy",
    expert_noise_std: float = 0.0,
    image_size: int | tuple[int, int] | None = None,
    drop_distillation_token: bool = False,
    seed: int | None = None,
    drop_ratio: float = 0.0,
    **moe_kwargs,
) -> PreTrainedModel:
    """Convert a dense transformers ViT / DeiT / DINOv2 model into a VMoE model that computes the same function.

    Args:
        dense: a model object (`ViTModel`, `ViTForImageClassification`, `DeiT*`, `Dinov2Model`,
            `Dinov2ForImageClassification`, ...) or a checkpoint directory (or Hub id) of one.
        task: `"classification"` (`VMoEForImageClassification`, the dense classifier copied when there is one),
            `"base"` (`VMoEModel`), `"segmentation"` (`VMoEForSemanticSegmentation`, new decode head),
            `"backbone"` (`VMoEBackbone`, e.g. for UperNet), or `"auto"`: classification when the dense model has a
            classification head, else base.
        expert_init: `"copy"` (every expert a copy of the dense MLP), `"split"` (disjoint slices of its hidden
            units; only a uniform router over all experts reproduces the dense MLP) or `"split_shared"` (one shared
            expert of the first half of its hidden units, routed experts copies of the second half: with k = 1 the
            dense model's active compute; `num_shared_experts` is 1).
        expert_noise_std: relative std of Gaussian noise added to each expert copy's weights (0 = exact copies).
        image_size: resolution the VMoE model will run at (default: the dense config's). The position embeddings
            are resampled to it with the dense model's own interpolation, so the upcycled model at this size equals
            the dense model at this size (DINOv2 always interpolates; ViT/DeiT with `interpolate_pos_encoding=True`).
        drop_distillation_token: DeiT only; see the module docstring.
        seed: seeds the routers' random initialisation, the expert noise and the drop-upcycling draws.
        drop_ratio: share of each expert's hidden units re-initialised, a different random subset per expert
            (Drop-Upcycling, :func:`drop_upcycle_experts`); 0 = plain copies. Above 0 the model no longer computes
            the dense function.
        **moe_kwargs: `VMoEConfig` MoE fields (`routing_level`, `num_experts`, `num_experts_per_tok`, `moe_layers`,
            `num_shared_experts`, `router_aux_loss_coef`, ...), labels (`id2label`, `num_labels`) and backbone
            fields (`out_indices`). `normalize_router_weights` defaults to True (needed for an exact copy).

    Returns the VMoE model in eval mode (like `from_pretrained`).
    """
    if isinstance(dense, (str, os.PathLike)):
        dense = load_dense_model(dense)
    if not isinstance(dense, nn.Module) or not hasattr(dense, "config"):
        raise ValueError(f"dense must be a transformers model or a checkpoint path, got {type(dense).__name__}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if expert_init not in EXPERT_INITS:
        raise ValueError(f"expert_init must be one of {EXPERT_INITS}, got {expert_init!r}")
    if expert_noise_std < 0:
        raise ValueError(f"expert_noise_std must be >= 0, got {expert_noise_std}")
    drop_ratio = check_drop_ratio(drop_ratio)
    _check_supported(dense, drop_distillation_token)
    base, classifier, head_kind = _base_and_head(dense)
    if task == "auto":
        task = "classification" if classifier is not None else "base"

    dense_config = dense.config
    intermediate = (int(dense_config.hidden_size * dense_config.mlp_ratio) if dense_config.model_type == "dinov2"
                    else dense_config.intermediate_size)
    num_experts = moe_kwargs.get("num_experts", VMoEConfig.num_experts)
    shared_width = intermediate
    if expert_init == "copy":
        wanted = intermediate
    elif expert_init == "split_shared":
        if moe_kwargs.setdefault("num_shared_experts", 1) != 1:
            raise ValueError(f"expert_init='split_shared' makes one shared expert (half the dense MLP), got "
                             f"num_shared_experts={moe_kwargs['num_shared_experts']}")
        wanted = shared_width = _half_width(intermediate)
    else:
        if intermediate % num_experts:
            raise ValueError(
                f"expert_init='split' needs intermediate_size ({intermediate}) divisible by num_experts ({num_experts})"
            )
        wanted = intermediate // num_experts
    for old, new in VMoEConfig.attribute_map.items():  # earlier field names (expert_intermediate_size)
        if old in moe_kwargs:
            moe_kwargs[new] = moe_kwargs.pop(old)
    for name, value in (("moe_intermediate_size", wanted), ("shared_expert_intermediate_size", shared_width)):
        if moe_kwargs.get(name) not in (None, value):
            raise ValueError(
                f"{name}={moe_kwargs[name]} does not fit expert_init={expert_init!r} for a dense MLP of width "
                f"{intermediate}; leave it unset (it must be {value})"
            )
        moe_kwargs[name] = value
    if moe_kwargs.get("normalize_router_weights") is False:
        logger.warning("normalize_router_weights=False: the upcycled model will not compute the dense function")
    if moe_kwargs.get("router_type", "top_k") != "top_k":
        # expert choice gives a token 0..E experts; Soft MoE runs the experts on mixes of tokens: neither is the
        # dense MLP even with identical experts
        logger.warning("router_type=%r: the upcycled model starts from the dense weights but does not compute the "
                       "dense function (only top_k routing does)", moe_kwargs["router_type"])
    config = vmoe_config_from_dense(dense_config, task=task, image_size=image_size, **moe_kwargs)

    if seed is not None:
        torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    model = _TASK_CLASSES[task](config)
    vmoe_base = model if task in ("base", "backbone") else model.vmoe
    state = upcycled_state_dict(dense, config, expert_init, expert_noise_std, drop_distillation_token, generator,
                                drop_ratio)
    dtype = next(vmoe_base.parameters()).dtype
    state = {k: v.to(dtype) for k, v in state.items()}
    missing, unexpected = vmoe_base.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("router.weight", "router.scale"))]  # routers start fresh
    if missing or unexpected:
        raise RuntimeError(f"upcycling left weights unset: missing={missing}, unexpected={unexpected}")

    if task == "classification" and classifier is not None and isinstance(classifier, nn.Linear):
        if classifier.weight.shape != model.classifier.weight.shape:
            raise ValueError(
                f"the dense classifier has shape {tuple(classifier.weight.shape)} but the VMoE classifier needs "
                f"{tuple(model.classifier.weight.shape)}; pass the dense model's labels or leave num_labels unset"
            )
        with torch.no_grad():
            model.classifier.weight.copy_(classifier.weight)
            model.classifier.bias.copy_(classifier.bias)
        if head_kind == "deit_teacher":
            logger.warning("DeiT distillation head dropped: the VMoE classifier is the DeiT class-token head")
    elif task == "classification":
        logger.warning("the dense model has no classification head: the VMoE classifier is newly initialised")
    if getattr(base, "pooler", None) is not None and task == "base":
        logger.warning(
            f"{type(base).__name__}'s pooler (dense + tanh) is not part of VMoE: pooler_output is the final class "
            "token instead; last_hidden_state is unchanged"
        )
    if dense_config.model_type == "deit":
        logger.warning("DeiT distillation token dropped: the upcycled model does not compute the dense function")
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# From a dense VMoE twin (same package, `moe_layers="none"`)
# --------------------------------------------------------------------------------------------------------------

_DENSE_TO_EXPERT = {"fc1.weight": "experts.up_proj", "fc1.bias": "experts.up_proj_bias",
                    "fc2.weight": "experts.down_proj", "fc2.bias": "experts.down_proj_bias"}


def init_experts_from_dense(moe_model: nn.Module, dense_model: nn.Module, noise_std: float = 0.0,
                            seed: int | None = None, drop_ratio: float = 0.0, expert_init: str = "copy") -> nn.Module:
    """Initialise a VMoE (MoE) model from a trained dense VMoE twin (same shapes, `moe_layers="none"`): every
    weight is copied and, in each MoE block, the dense MLP becomes the experts; routers keep their fresh
    initialisation. `expert_init`: `"copy"` (every expert a copy of the dense MLP, sparse upcycling; with
    `normalize_router_weights=True` and k=1 the result computes the dense function) or `"split_shared"` (the MoE
    model has one shared expert and experts of half the dense width: `split_shared_tensors`). `noise_std` (relative
    to each dense weight's std) perturbs the routed copies' weight matrices so experts can diverge. `drop_ratio`
    re-initialises that share of each routed expert's hidden units, a different random subset per expert
    (Drop-Upcycling, :func:`drop_upcycle_experts`); `seed` seeds the noise and the drop. For transformers ViT / DeiT
    / DINOv2 checkpoints use :func:`upcycle`. Returns `moe_model`."""
    if expert_init not in ("copy", "split_shared"):
        raise ValueError(f"expert_init must be 'copy' or 'split_shared' for a dense VMoE twin, got {expert_init!r}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    drop_ratio = check_drop_ratio(drop_ratio)
    target = moe_model.state_dict()
    new_state, dense_mlps = {}, {}
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, value in dense_model.state_dict().items():
        if name in target:
            if target[name].shape != value.shape:
                raise ValueError(f"{name}: dense shape {tuple(value.shape)} != MoE shape {tuple(target[name].shape)}")
            new_state[name] = value
            continue
        prefix, _, leaf = name.rpartition(".mlp.")
        if not prefix or leaf not in _DENSE_TO_EXPERT or f"{prefix}.mlp.{_DENSE_TO_EXPERT[leaf]}" not in target:
            raise ValueError(f"dense weight {name} has no place in the MoE model (is it the dense twin?)")
        dense_mlps.setdefault(prefix, {})[leaf] = value
    hint = (" (the MoE model has a shared expert: use expert_init='split_shared' to build it from half of the dense "
            "MLP)" if expert_init == "copy" and any(".shared_expert." in k for k in target) else "")
    blocks = {}  # prefix -> routed expert tensors
    for prefix, mlp in dense_mlps.items():
        num_experts = target[f"{prefix}.mlp.experts.up_proj"].shape[0]
        if expert_init == "copy":
            experts = {_DENSE_TO_EXPERT[leaf].removeprefix("experts."): value.unsqueeze(0).repeat(
                num_experts, *([1] * value.ndim)) for leaf, value in mlp.items()}
            shared = {}
        else:
            experts, shared = split_shared_tensors(mlp["fc1.weight"], mlp["fc1.bias"], mlp["fc2.weight"],
                                                   mlp["fc2.bias"], num_experts)
        if noise_std:
            for name in ("up_proj", "down_proj"):
                experts[name] = _perturb(experts[name], noise_std, generator, reference_std=experts[name][0].std())
        blocks[prefix] = experts
        tensors = {**{f"experts.{k}": v for k, v in experts.items()},
                   **{f"shared_expert.{k}": v for k, v in shared.items()}}
        for name, value in tensors.items():
            key = f"{prefix}.mlp.{name}"
            if key not in target or target[key].shape != value.shape:
                have = tuple(target[key].shape) if key in target else "no such weight"
                raise ValueError(f"{key}: expert_init={expert_init!r} makes shape {tuple(value.shape)} from the dense "
                                 f"MLP, the MoE model has {have}{hint}")
            new_state[key] = value.contiguous()
    # drop-upcycling after every block's noise, blocks in sorted key order: the seeded draws of earlier versions
    for prefix in sorted(blocks):
        for name, value in drop_upcycle_experts(blocks[prefix], drop_ratio, generator).items():
            new_state[f"{prefix}.mlp.experts.{name}"] = value.contiguous()
    missing = [k for k in target if k not in new_state and "router" not in k]
    if missing:
        raise ValueError(f"the dense model has no weights for {missing[:3]}: not the dense twin of this MoE "
                         f"model{hint}")
    moe_model.load_state_dict(new_state, strict=False)
    return moe_model


__all__ = ["upcycle", "upcycled_state_dict", "vmoe_config_from_dense", "load_dense_model", "init_experts_from_dense",
           "drop_upcycle_experts", "check_drop_ratio", "split_shared_tensors"]
