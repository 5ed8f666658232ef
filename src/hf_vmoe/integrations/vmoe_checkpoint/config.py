"""vmoe model configs: the presets of the released checkpoints (`VMOE_PRESETS`), reading a config given as a preset
name, dict or JSON (`resolve_vmoe_config`), and its mapping onto `VMoEConfig` keyword arguments
(`hf_config_from_vmoe`, with one mapper per router type: top-k, expert choice, Soft MoE).

The mapping also says what hf_vmoe computes differently from vmoe, each difference naming the `VMoEConfig` option
that would make it exact: structural differences raise a ValueError; numerics that differ at inference and
training-only differences are returned as issues. The exact spec is docs/vmoe-parity-spec.md.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from ...configuration_vmoe import to_pair

__all__ = ["VMOE_PRESETS", "hf_config_from_vmoe", "resolve_vmoe_config"]

# ----------------------------------------------------------------------------------------------------------------
# vmoe model configs: the released checkpoints' presets and the mapping onto VMoEConfig
# ----------------------------------------------------------------------------------------------------------------

# ViT-{S,B,L,H} of the V-MoE paper (vmoe/configs/vmoe_paper/common.py get_vmoe_config): hidden, layers, mlp, heads.
# NB: vmoe's "S" has 8 blocks (not the 12 of DeiT-S).
_VARIANTS = {"S": (512, 8, 2048, 8), "B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16), "H": (1280, 32, 5120, 16)}


def _paper_model(variant: str, patch: int, experts: int, k: int, where: str, where_num: int, *, image_size: int,
                 num_classes: int, representation_size, capacity_factor: float, head_bias_init: float,
                 moe_dropout: float = 0.0) -> dict:
    """The model config vmoe's paper configs build (common.get_vmoe_config and pretrain_imagenet21k's twin): a
    `VisionTransformerMoe` kwargs dict plus `image_size`."""
    hidden, layers, mlp, heads = _VARIANTS[variant]
    if where == "every":
        moe_layers = tuple(range(where_num - 1, layers, where_num))
    else:  # "last": the last `where_num` odd blocks
        moe_layers = tuple(range(1, layers, 2))[-where_num:]
    tokens = (image_size // patch) ** 2 + 1
    return {
        "name": "VisionTransformerMoe",
        "num_classes": num_classes,
        "patch_size": (patch, patch),
        "hidden_size": hidden,
        "classifier": "token",
        "representation_size": representation_size,
        "head_bias_init": head_bias_init,
        "encoder": {
            "num_layers": layers, "mlp_dim": mlp, "num_heads": heads, "dropout_rate": 0.0,
            "attention_dropout_rate": 0.0,
            "moe": {
                "num_experts": experts, "layers": moe_layers, "dropout_rate": moe_dropout, "split_rngs": False,
                "group_size": 8 * tokens,  # min_batch_size_per_device (8) images per routing group
                "router": {
                    "num_selected_experts": k, "noise_std": 1.0, "importance_loss_weight": 0.005,
                    "load_loss_weight": 0.005,
                    "dispatcher": {"name": "einsum", "bfloat16": True, "capacity_factor": capacity_factor,
                                   "batch_priority": False},
                },
            },
        },
    }


def _preset(description: str, model: dict, image_size: int, eval_capacity_factor: float | None, source: str) -> dict:
    preset = {"description": description, "source": source, "image_size": image_size, "model": model}
    if eval_capacity_factor is not None:  # config.evaluate.model_overrides
        preset["eval_overrides"] = {"encoder": {"moe": {"router": {"dispatcher": {"capacity_factor": eval_capacity_factor}}}}}
    return preset


_S32 = dict(variant="S", patch=32, experts=8, k=2, where="last", where_num=2)
_B16 = dict(variant="B", patch=16, experts=8, k=2, where="every", where_num=2)

# The checkpoints released in gs://vmoe_checkpoints (vmoe README), with the configs that trained them.
VMOE_PRESETS: dict[str, dict] = {
    "vmoe_s32_last2_ilsvrc2012_randaug_light1": _preset(
        "V-MoE S/32, 8 experts on the last 2 odd blocks (5, 7), k=2, ILSVRC2012 from scratch, RandAugment light1, "
        "300 epochs, 224 px",
        _paper_model(**_S32, image_size=224, num_classes=1000, representation_size=512, capacity_factor=1.05,
                     head_bias_init=-math.log(1000), moe_dropout=0.2),
        224, 4.0, "vmoe/configs/vmoe_paper/vmoe_s32_last2_ilsvrc2012_randaug_light1.py"),
    "vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012": _preset(
        "the above fine-tuned on ILSVRC2012 at 384 px (no pre-logits)",
        _paper_model(**_S32, image_size=384, num_classes=1000, representation_size=None, capacity_factor=1.5,
                     head_bias_init=-math.log(1000)),
        384, None, "vmoe/configs/vmoe_paper/vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012.py"),
    "vmoe_s32_last2_ilsvrc2012_randaug_medium": _preset(
        "V-MoE S/32, 8 experts on the last 2 odd blocks, k=2, ILSVRC2012 from scratch, RandAugment medium, 1000 "
        "epochs, 224 px (no config in the vmoe repository: assumed to be light1's with another augmentation)",
        _paper_model(**_S32, image_size=224, num_classes=1000, representation_size=512, capacity_factor=1.05,
                     head_bias_init=-math.log(1000), moe_dropout=0.2),
        224, 4.0, "assumed from vmoe_s32_last2_ilsvrc2012_randaug_light1.py"),
    "vmoe_b16_imagenet21k_randaug_strong": _preset(
        "V-MoE B/16, 8 experts on every odd block (1, 3, ..., 11), k=2, ImageNet-21k, RandAugment strong, 300 "
        "epochs, 224 px, 21843 classes (sigmoid loss)",
        _paper_model(**_B16, image_size=224, num_classes=21843, representation_size=None, capacity_factor=1.05,
                     head_bias_init=-10.0),
        224, None, "vmoe/configs/vmoe_paper/pretrain_imagenet21k.py"),
    "vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012": _preset(
        "the above fine-tuned on ILSVRC2012 at 384 px",
        _paper_model(**_B16, image_size=384, num_classes=1000, representation_size=None, capacity_factor=1.5,
                     head_bias_init=-math.log(1000)),
        384, None, "vmoe/configs/vmoe_paper/vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012.py"),
    "vmoe_b16_imagenet21k_randaug_strong_ft_cifar10": _preset(
        "the B/16 ImageNet-21k model fine-tuned on CIFAR-10 at 128 px (config in the repository; not listed "
        "among the released checkpoints)",
        _paper_model(**_B16, image_size=128, num_classes=10, representation_size=None, capacity_factor=1.5,
                     head_bias_init=-math.log(10)),
        128, None, "vmoe/configs/vmoe_paper/vmoe_b16_imagenet21k_randaug_strong_ft_cifar10.py"),
}

_UNSUPPORTED_PRESETS = {
    "eee_s32_last2_ilsvrc2012": "an E^3 (efficient ensemble of experts) model: ensemble routing over 2 members",
    "eee_s32_last2_ilsvrc2012_ft_cifar100": "an E^3 (efficient ensemble of experts) model: ensemble routing over 2 members",
}


def _deep_update(base: dict, update: Mapping) -> dict:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value) if isinstance(value, (dict, list)) else value
    return base


def resolve_vmoe_config(config) -> dict:
    """A conversion spec `{"model": <VisionTransformerMoe kwargs>, "eval_overrides": {...}, "image_size": N}` from a
    preset name, a dict, a JSON string or a JSON file. A dict may start from a preset (`"preset": NAME`) and
    override its fields; a dict with an `encoder` key is taken as the model config itself."""
    if isinstance(config, (str, os.PathLike)):
        text = str(config).strip()
        if text in VMOE_PRESETS:
            return copy.deepcopy(VMOE_PRESETS[text])
        if text in _UNSUPPORTED_PRESETS:
            raise ValueError(f"{text} is {_UNSUPPORTED_PRESETS[text]}; hf_vmoe cannot represent it (see "
                             "docs/vmoe-checkpoints.md)")
        if text.startswith("{"):
            try:
                config = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"--config is not valid JSON: {err}") from None
        elif os.path.isfile(text):
            try:
                config = json.loads(Path(text).read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{text!r} is not valid JSON: {err}") from None
        else:
            raise ValueError(f"unknown vmoe config {text!r}: give a preset ({', '.join(VMOE_PRESETS)}), a JSON object "
                             "or a JSON file")
    if not isinstance(config, Mapping):
        raise ValueError(f"the vmoe config must be a preset name or a mapping, got {type(config).__name__}")
    config = copy.deepcopy(dict(config))
    if "encoder" in config and "model" not in config:
        config = {"model": config}
    unknown = sorted(set(config) - {"preset", "model", "eval_overrides", "image_size", "description", "source"})
    if unknown:
        raise ValueError(f"unknown keys {unknown} in the vmoe config; expected 'preset', 'model', 'eval_overrides', "
                         "'image_size'")
    spec = {"model": {}, "eval_overrides": {}}
    if "preset" in config:
        spec = resolve_vmoe_config(config.pop("preset"))
        spec.setdefault("eval_overrides", {})
    _deep_update(spec["model"], config.get("model", {}))
    _deep_update(spec["eval_overrides"], config.get("eval_overrides", {}))
    for key in ("image_size", "description", "source"):
        if key in config:
            spec[key] = config[key]
    return spec


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _vmoe_capacity(group_size: int, k: int, num_experts: int, capacity_factor: float, ceil_or_round: str,
                   multiple_of: int | None) -> int:
    """vmoe.moe.compute_capacity on num_tokens = group_size * k."""
    raw = group_size * k * capacity_factor / num_experts
    capacity = int(math.ceil(raw)) if ceil_or_round == "ceil" else int(round(raw))
    if multiple_of and multiple_of > 0:
        capacity += (-capacity) % multiple_of
    return capacity


def _hf_ceil_capacity(group_size: int, k: int, num_experts: int, capacity_factor: float) -> int:
    return max(1, math.ceil(group_size * k * capacity_factor / num_experts))


@dataclasses.dataclass
class _Issue:
    option: str  # the VMoEConfig option that would make it exact
    scope: str  # "inference" (changes eval outputs) or "training"
    message: str


def _config_fields() -> set[str]:
    from ...configuration_vmoe import VMoEConfig

    return {f.name for f in dataclasses.fields(VMoEConfig)} if dataclasses.is_dataclass(VMoEConfig) else set()


def hf_config_from_vmoe(spec: Mapping, arch: Mapping | None = None) -> tuple[dict, dict, list[_Issue]]:
    """`VMoEConfig` keyword arguments for a vmoe model config (`resolve_vmoe_config` output), checked against the
    architecture read from the checkpoint (`arch`, optional). Returns (kwargs, vmoe_reference, issues): the
    reference fields kept in `config.vmoe_reference`, and what hf_vmoe does differently (each naming the option
    that would make it exact). Structural differences raise a ValueError.

    The parity options (`router_group_size` with `router_group_remainder="pad"`, `capacity_multiple_of`,
    `representation_size`, `router_load_loss_coef`, `router_aux_loss_layer_reduction`, `expert_dispatch_dtype`,
    `use_cls_token`) are set when `VMoEConfig` has the field, and reported as an issue when it does not."""
    model = _flatten(spec["model"])
    eval_model = _flatten(_deep_update(copy.deepcopy(spec["model"]), spec.get("eval_overrides") or {}))
    fields = _config_fields()
    issues: list[_Issue] = []
    structural: list[str] = []

    def need(option: str, scope: str, message: str) -> bool:
        """True when VMoEConfig has `option`; otherwise record the issue."""
        if option in fields:
            return True
        issues.append(_Issue(option, scope, message))
        return False

    name = model.get("name", "VisionTransformerMoe")
    if name == "VisionTransformerMoeEnsemble" or "encoder.moe.ensemble_size" in model:
        raise ValueError("the vmoe config is an E^3 ensemble (VisionTransformerMoeEnsemble): hf_vmoe has no ensemble "
                         "routing, so it cannot be converted")
    if name != "VisionTransformerMoe":
        raise ValueError(f"unknown vmoe model {name!r}; this converter maps VisionTransformerMoe only")

    # The architecture: the tree's shapes; the config's fields must agree with them (or stand in without a tree).
    arch = dict(arch or {})
    declared = {
        "hidden_size": model.get("hidden_size"),
        "patch_size": to_pair(model["patch_size"]) if "patch_size" in model else None,
        "encoder.num_layers": model.get("encoder.num_layers"),
        "encoder.num_heads": model.get("encoder.num_heads"),
        "encoder.mlp_dim": model.get("encoder.mlp_dim"),
        "num_classes": model.get("num_classes"),
        "image_size": to_pair(spec["image_size"]) if spec.get("image_size") is not None else None,
        "classifier": model.get("classifier"),
    }
    if "representation_size" in model:
        declared["representation_size"] = model["representation_size"]
    if "encoder.moe.layers" in model:
        declared["encoder.moe.layers"] = tuple(model["encoder.moe.layers"])
        if model["encoder.moe.layers"]:
            declared["encoder.moe.num_experts"] = model.get("encoder.moe.num_experts")
            declared["encoder.moe.mlp_dim"] = model.get("encoder.moe.mlp_dim", model.get("encoder.mlp_dim"))
    mismatches = []
    for key, value in declared.items():
        if value is None and key != "representation_size":
            continue
        if key in arch:
            if arch[key] != value:
                mismatches.append(f"  {key}: config {value!r}, checkpoint {arch[key]!r}")
        else:
            arch[key] = value
    arch.setdefault("classifier", "token")  # vmoe's defaults
    arch.setdefault("representation_size", None)
    if mismatches:
        raise ValueError("the checkpoint does not fit the vmoe config (wrong preset?):\n" + "\n".join(mismatches))
    for key in ("hidden_size", "patch_size", "encoder.num_layers", "encoder.num_heads", "encoder.mlp_dim",
                "num_classes", "image_size"):
        if arch.get(key) is None:
            raise ValueError(f"the vmoe config does not give {key} and there is no checkpoint to read it from")
    moe_layers = tuple(arch.get("encoder.moe.layers") or ())

    # What hf_vmoe cannot represent at all.
    classifier = arch["classifier"]
    if classifier == "gap" and "use_cls_token" not in fields:
        structural.append("classifier='gap' (no class token; the mean of all tokens) needs VMoEConfig.use_cls_token")
    elif classifier not in ("token", "gap"):
        structural.append(f"classifier={classifier!r} is not supported (hf_vmoe pools with the class token or the mean)")
    if arch.get("representation_size") and "representation_size" not in fields:
        structural.append(f"representation_size={arch['representation_size']} (a tanh pre-logits layer before the "
                          "head) needs VMoEConfig.representation_size")
    position = model.get("encoder.position_emb.name", "learned")
    if position != "learned":
        structural.append(f"encoder.position_emb={position!r}: only learned position embeddings are supported")
    if model.get("encoder.attention_qk_norm"):
        structural.append("encoder.attention_qk_norm=True is not supported")
    router_name = str(model.get("encoder.moe.router.name", "NoisyTopExpertsPerItemRouter"))
    router_type = _ROUTER_TYPES.get(router_name.rpartition(".")[2])
    if moe_layers and router_type is None:
        structural.append(f"router {router_name!r}: the converter maps {', '.join(_ROUTER_TYPES)}")
    elif moe_layers and arch.get("router_params") and (arch["router_params"] == "soft") != (router_type == "soft"):
        found = "Soft MoE's mu and scale" if arch["router_params"] == "soft" else "a dense kernel"
        raise ValueError(f"the checkpoint's routers have {found} but the vmoe config names {router_name!r} "
                         "(wrong config?)")
    dispatchers = {"top_k": ("einsum", "indices"), "expert_choice": ("einsum",)}.get(router_type, ("einsum",))
    if model.get("encoder.moe.router.dispatcher.name", "einsum") not in dispatchers and moe_layers:
        structural.append(f"dispatcher {model['encoder.moe.router.dispatcher.name']!r}: only "
                          f"{' and '.join(map(repr, dispatchers))} are mapped for {router_name}")
    if structural:
        raise ValueError("this vmoe model cannot be converted to hf_vmoe:\n" + "\n".join(f"  {s}" for s in structural))

    patch, image = to_pair(arch["patch_size"]), to_pair(arch["image_size"])
    tokens = (image[0] // patch[0]) * (image[1] // patch[1]) + (1 if classifier == "token" else 0)
    kwargs = dict(
        hidden_size=int(arch["hidden_size"]),
        num_hidden_layers=int(arch["encoder.num_layers"]),
        num_attention_heads=int(arch["encoder.num_heads"]),
        intermediate_size=int(arch["encoder.mlp_dim"]),
        hidden_act="gelu_pytorch_tanh",  # flax.linen.gelu defaults to approximate=True (the tanh form)
        layer_norm_eps=1e-6,  # flax.linen.LayerNorm's default epsilon
        qkv_bias=True,
        image_size=image[0] if image[0] == image[1] else list(image),
        patch_size=patch[0] if patch[0] == patch[1] else list(patch),
        num_channels=int(arch.get("num_channels", 3)),
        pooling="cls",
        num_labels=int(arch["num_classes"]),
        hidden_dropout_prob=float(model.get("encoder.dropout_rate", 0.0)),
        attention_probs_dropout_prob=float(model.get("encoder.attention_dropout_rate", 0.0)),
        moe_layers=moe_layers if moe_layers else "none",
        routing_level="token",
        shared_router=False,
        num_shared_experts=0,
        normalize_router_weights=False,
        router_aux_loss_coef=0.0,
        router_z_loss_coef=0.0,
        router_importance_loss_coef=0.0,
        layerscale_value=None,
        drop_path_rate=0.0,
    )
    if classifier == "gap":
        kwargs.update(use_cls_token=False, pooling="mean")
    if arch.get("representation_size"):
        kwargs["representation_size"] = int(arch["representation_size"])
    reference = {
        "source": spec.get("source"),
        "description": spec.get("description"),
        "classifier": classifier,
        "representation_size": arch.get("representation_size"),
        "head_bias_init": model.get("head_bias_init", 0.0),
        "head_kernel_zero_init": model.get("head_kernel_zero_init", True),
        "tokens_per_image": tokens,
    }
    if model.get("encoder.dropout_rate", 0.0):
        issues.append(_Issue("(none)", "training", "encoder.dropout_rate: vmoe also drops after the MLP's GELU; "
                                                   "hf_vmoe's hidden_dropout_prob does not"))
    if not moe_layers:
        return kwargs, reference, issues

    num_experts = int(arch["encoder.moe.num_experts"])
    kwargs.update(router_type=router_type, num_experts=num_experts,
                  moe_intermediate_size=int(arch.get("encoder.moe.mlp_dim") or arch["encoder.mlp_dim"]))
    if model.get("encoder.moe.group_size") is None:
        raise ValueError("the vmoe config does not give encoder.moe.group_size (tokens per routing group)")
    group_size = int(model["encoder.moe.group_size"])
    expert_dropout = float(model.get("encoder.moe.dropout_rate", model.get("encoder.dropout_rate", 0.0)))
    if expert_dropout:
        issues.append(_Issue("(none)", "training", f"expert dropout {expert_dropout} (vmoe drops after the experts' "
                             "GELU and output) is not reproduced"))
    reference.update(router=router_name, group_size=group_size, expert_dropout_rate=expert_dropout)
    if router_type == "soft":
        _map_soft_router(model, arch, kwargs, reference, need, group_size, tokens, num_experts)
        return kwargs, reference, issues
    if router_type == "expert_choice":
        _map_expert_choice_router(model, eval_model, kwargs, reference, need, group_size, num_experts)
        return kwargs, reference, issues
    k = int(model.get("encoder.moe.router.num_selected_experts", 1))
    if not 1 <= k <= num_experts:
        raise ValueError(f"encoder.moe.router.num_selected_experts={k} must be in [1, num_experts={num_experts}]")
    kwargs["num_experts_per_tok"] = k
    noise_std = float(model.get("encoder.moe.router.noise_std", 1.0))  # vmoe's defaults (NoisyTopExpertsPerItemRouter)
    importance_w = float(model.get("encoder.moe.router.importance_loss_weight", 1.0))
    load_w = float(model.get("encoder.moe.router.load_loss_weight", 1.0))
    gshard_w = float(model.get("encoder.moe.router.gshard_loss_weight", 0.0))
    reference.update(noise_std=noise_std, importance_loss_weight=importance_w, load_loss_weight=load_w,
                     gshard_loss_weight=gshard_w)
    kwargs["router_noise_std"] = noise_std / num_experts  # vmoe adds N(0, (noise_std / E)^2), training only
    kwargs["router_importance_loss_coef"] = importance_w
    if need("router_group_size", "training", f"routing groups of {group_size} tokens: vmoe computes capacity "
            "and the auxiliary losses per group; hf_vmoe over the whole batch"):
        kwargs["router_group_size"] = group_size
        if "router_group_remainder" in fields:
            # vmoe's model cannot route a batch that is not whole groups; its evaluator pads the last batch with
            # all-zero examples, which hf_vmoe reproduces at inference
            kwargs["router_group_remainder"] = "pad"
    if gshard_w:
        issues.append(_Issue("(none)", "training", f"gshard_loss_weight={gshard_w}: vmoe's GShard loss counts top-1 "
                             "choices only (hf_vmoe's switch loss counts all k); not mapped"))
    if load_w and noise_std and need("router_load_loss_coef", "training", f"load_loss_weight={load_w}: vmoe's "
                                     "noise-based load loss (training with noise only)"):
        kwargs["router_load_loss_coef"] = load_w
    if (importance_w or (load_w and noise_std)) and need(
            "router_aux_loss_layer_reduction", "training", "vmoe sums the auxiliary losses over MoE layers (hf_vmoe "
            "averages them)"):
        kwargs["router_aux_loss_layer_reduction"] = "sum"

    def capacity_factor(flat: Mapping, scope: str) -> tuple[float | None, bool]:
        """hf's capacity factor (None = dropless) and batch priority for one scope; records what differs."""
        prefix = "encoder.moe.router.dispatcher."
        capacity, factor = flat.get(prefix + "capacity"), flat.get(prefix + "capacity_factor")
        rounding = flat.get(prefix + "capacity_ceil_or_round", "ceil")
        multiple = flat.get(prefix + "capacity_multiple_of", 4)
        bpr = bool(flat.get(prefix + "batch_priority", False))
        if (capacity is None) == (factor is None):
            raise ValueError(f"the {scope} dispatcher must give exactly one of capacity and capacity_factor "
                             f"(got capacity={capacity!r}, capacity_factor={factor!r})")
        value = int(capacity) if capacity is not None else _vmoe_capacity(
            group_size, k, num_experts, float(factor), rounding, multiple)
        reference[f"{scope}_capacity_per_group"] = value
        if value >= group_size:
            return None, bpr  # an expert can take every token of its group: nothing is ever dropped
        if "router_group_size" not in fields:
            issues.append(_Issue("router_group_size", scope, f"capacity {value} per expert and routing group of "
                                 f"{group_size} tokens: hf_vmoe applies the capacity to the whole batch (exact only "
                                 f"for batches of {group_size / tokens:g} images)"))
        if capacity is not None:
            need("expert_capacity", scope, f"the {scope} dispatcher gives an absolute capacity={value}")
            return value * num_experts / (group_size * k), bpr
        if rounding != "ceil":
            need("capacity_rounding", scope, f"capacity_ceil_or_round={rounding!r}")
        if multiple:
            if "capacity_multiple_of" in fields:
                kwargs["capacity_multiple_of"] = int(multiple)
            elif _hf_ceil_capacity(group_size, k, num_experts, float(factor)) != value:
                issues.append(_Issue("capacity_multiple_of", scope, f"vmoe rounds the capacity up to a multiple of "
                                     f"{multiple} ({_hf_ceil_capacity(group_size, k, num_experts, float(factor))} -> "
                                     f"{value} per group)"))
        return float(factor), bpr

    train_factor, train_bpr = capacity_factor(model, "training")
    eval_factor, eval_bpr = capacity_factor(eval_model, "inference")
    kwargs["capacity_factor"] = train_factor
    kwargs["eval_capacity_factor"] = eval_factor
    kwargs["batch_priority_routing"] = eval_bpr if eval_factor is not None else train_bpr
    if train_factor is not None and eval_factor is not None and train_bpr != eval_bpr:
        issues.append(_Issue("(none)", "training", f"batch priority routing is {train_bpr} in training and {eval_bpr} "
                             "at inference; hf_vmoe has one flag (set to the inference value)"))
    _map_bfloat16_dispatcher(model, eval_model, kwargs, reference, need)
    return kwargs, reference, issues


_ROUTER_TYPES = {"NoisyTopExpertsPerItemRouter": "top_k", "NoisyTopItemsPerExpertRouter": "expert_choice",
                 "SoftRouter": "soft"}  # vmoe.nn.routing's two routers, vmoe.projects.soft_moe.router.SoftRouter


def _map_bfloat16_dispatcher(model: Mapping, eval_model: Mapping, kwargs: dict, reference: dict, need) -> None:
    """dispatcher.bfloat16 (top-k and expert choice) -> expert_dispatch_dtype."""
    bf16 = [scope for scope, flat in (("inference", eval_model), ("training", model))
            if flat.get("encoder.moe.router.dispatcher.bfloat16", False)]
    if bf16:
        reference["bfloat16_dispatch"] = True
        if need("expert_dispatch_dtype", bf16[0], "dispatcher.bfloat16=True: vmoe rounds every expert's input and "
                "output to bfloat16 (without it the logits differ by about 2e-3 of their scale)"):
            kwargs["expert_dispatch_dtype"] = "bfloat16"


def _map_soft_router(model: Mapping, arch: Mapping, kwargs: dict, reference: dict, need, group_size: int,
                     tokens: int, num_experts: int) -> None:
    """vmoe's `SoftRouter` (vmoe/projects/soft_moe/router.py): slots from `num_slots`, or from `capacity_factor`
    (default 1.0) as round(group_size x factor / E); noise added to the logits unscaled (default 0); always a
    bfloat16 dispatcher; no auxiliary loss."""
    if group_size != tokens:
        raise ValueError(f"Soft MoE with group_size={group_size}: hf_vmoe mixes the tokens of each image, so the "
                         f"group must be one image ({tokens} tokens); this model cannot be converted")
    prefix = "encoder.moe.router."
    factor = model.get(prefix + "capacity_factor", 1.0)
    slots = model.get(prefix + "num_slots")
    if slots is None:
        if factor is None:
            raise ValueError("the Soft MoE router gives neither num_slots nor capacity_factor")
        slots = int(round(group_size * float(factor) / num_experts))  # vmoe: compute_capacity(..., "round", 1)
    in_tree = arch.get(prefix + "num_slots")
    if in_tree is not None and int(slots) != in_tree:
        raise ValueError(f"the vmoe config gives {slots} Soft MoE slots per expert (num_slots={model.get(prefix + 'num_slots')!r}, "
                         f"capacity_factor={factor!r}, group_size={group_size}), the checkpoint's mu has {in_tree}")
    if int(slots) < 1:
        raise ValueError(f"the Soft MoE router has {slots} slots per expert; it needs at least 1")
    noise_std = float(model.get(prefix + "noise_std", 0.0))
    kwargs.update(num_slots=int(slots), num_experts_per_tok=1, router_noise_std=noise_std)
    reference.update(num_slots=int(slots), capacity_factor=factor, noise_std=noise_std, bfloat16_dispatch=True)
    if need("expert_dispatch_dtype", "inference", "vmoe's Soft MoE dispatches through a bfloat16 dispatcher: the "
            "tokens and the slot outputs are rounded to bfloat16"):
        kwargs["expert_dispatch_dtype"] = "bfloat16"


def _map_expert_choice_router(model: Mapping, eval_model: Mapping, kwargs: dict, reference: dict, need,
                              group_size: int, num_experts: int) -> None:
    """vmoe's `NoisyTopItemsPerExpertRouter`: each expert takes the top C tokens of its routing group, C =
    compute_capacity(group_size, E, capacity_factor, ceil_or_round, multiple_of) (vmoe's defaults "ceil" and 4) or
    the dispatcher's absolute `capacity`; noise N(0, (noise_std / E)^2) in training (default noise_std 1.0); no
    auxiliary loss. hf_vmoe's capacity is min(n, ceil(n x factor / E) rounded up to `capacity_multiple_of`): when
    vmoe's rounding or an absolute capacity cannot be written that way, the factor is set to (C - 1/2) x E / n,
    whose ceiling is C for the group size n the converter sets."""
    prefix = "encoder.moe.router."
    noise_std = float(model.get(prefix + "noise_std", 1.0))
    kwargs.update(num_experts_per_tok=1, router_noise_std=noise_std / num_experts)
    reference["noise_std"] = noise_std
    if need("router_group_size", "inference", f"routing groups of {group_size} tokens: each expert takes its top "
            "tokens of each group"):
        kwargs["router_group_size"] = group_size
        if need("router_group_remainder", "inference", "vmoe's evaluator pads its last batch with zero images"):
            kwargs["router_group_remainder"] = "pad"

    def capacity(flat: Mapping, scope: str) -> tuple[int, float | None, int | None]:
        """(vmoe's capacity per group, its factor when hf_vmoe's ceil rule gives the same capacity, multiple_of)."""
        absolute, factor = flat.get(prefix + "dispatcher.capacity"), flat.get(prefix + "dispatcher.capacity_factor")
        rounding = flat.get(prefix + "dispatcher.capacity_ceil_or_round", "ceil")
        multiple = flat.get(prefix + "dispatcher.capacity_multiple_of", 4) or None
        if (absolute is None) == (factor is None):
            raise ValueError(f"the {scope} dispatcher must give exactly one of capacity and capacity_factor "
                             f"(got capacity={absolute!r}, capacity_factor={factor!r})")
        if absolute is not None:
            value = int(absolute)
        else:
            value = _vmoe_capacity(group_size, 1, num_experts, float(factor), rounding, multiple)
        reference[f"{scope}_capacity_per_group"] = value
        plain = float(factor) if absolute is None and rounding == "ceil" else None
        return value, plain, multiple

    (train_c, train_f, train_m), (eval_c, eval_f, eval_m) = capacity(model, "training"), capacity(eval_model, "inference")
    if train_f is not None and eval_f is not None and train_m == eval_m:
        kwargs.update(capacity_factor=train_f, eval_capacity_factor=eval_f, capacity_multiple_of=train_m)
    else:  # the exact capacities, for groups of group_size tokens
        kwargs.update(capacity_factor=(train_c - 0.5) * num_experts / group_size,
                      eval_capacity_factor=(eval_c - 0.5) * num_experts / group_size, capacity_multiple_of=None)
    kwargs["router_importance_loss_coef"] = 0.0
    _map_bfloat16_dispatcher(model, eval_model, kwargs, reference, need)
