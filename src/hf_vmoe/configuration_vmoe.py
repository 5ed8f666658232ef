"""VMoE model configuration.

A ViT configuration plus the fields that say which blocks are mixture-of-experts blocks, how inputs are
routed to experts (whole images as in Mobile V-MoE, or tokens as in V-MoE / ViMoE), shared experts
(ViMoE), and the auxiliary losses. The config is plain data: it imports nothing from this package.
"""

import operator
import os

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin
from transformers.utils import logging

logger = logging.get_logger(__name__)

ROUTING_LEVELS = ("image", "token")
ROUTER_INPUTS = ("cls", "mean")
POOLINGS = ("cls", "mean", "cls_mean")
TRAIN_ROUTINGS = ("router", "superclass")
# router_type -> the routing levels it supports; `hf_vmoe.modeling_vmoe.register_router` adds entries
ROUTER_LEVELS = {"top_k": ("image", "token"), "expert_choice": ("token",), "soft": ("token",)}
GROUP_REMAINDERS = ("error", "partial", "pad")
LAYER_REDUCTIONS = ("mean", "sum")
DISPATCH_DTYPES = ("bfloat16",)
EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def to_pair(value) -> tuple[int, int]:
    """`image_size` / `patch_size` as a (height, width) pair."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def check_local_path(name_or_path) -> None:
    """Raise an OSError naming `name_or_path` when it is written as a local path (absolute, starting with `./`,
    `../` or `~`, or with more than one `/`, which a Hub repo id never has) and does not exist: transformers would
    take it for a Hub repo id and fail with "Repo id must be in the form ...", which hides the mistyped path."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        return
    text = os.fspath(name_or_path)
    separators = {"/", os.sep, os.altsep} - {None}
    looks_local = (isinstance(name_or_path, os.PathLike) or text.startswith(("./", "../", "~")) or os.path.isabs(text)
                   or text.count("/") > 1 or any(sep in text for sep in separators - {"/"}))
    if looks_local and not os.path.exists(os.path.expanduser(text)):
        raise OSError(f"model folder {text!r} does not exist ({os.path.abspath(os.path.expanduser(text))}); "
                      "check the path")


def last_layers(num_hidden_layers: int, count: int) -> tuple[int, ...]:
    """Indices of the last ``count`` blocks, e.g. ``last_layers(12, 2) == (10, 11)``."""
    if not 0 <= count <= num_hidden_layers:
        raise ValueError(f"count must be in [0, {num_hidden_layers}], got {count}")
    return tuple(range(num_hidden_layers - count, num_hidden_layers))


def every_nth_layer(num_hidden_layers: int, n: int, offset: int | None = None) -> tuple[int, ...]:
    """Every ``n``-th block, ending at the last block by default (V-MoE's "every 2" = blocks 1, 3, 5, ...)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    offset = (num_hidden_layers - 1) % n if offset is None else offset
    return tuple(range(offset, num_hidden_layers, n))


def resolve_moe_layers(spec, num_hidden_layers: int) -> tuple[int, ...]:
    """Turn ``None`` (last two blocks), ``"last:L"``, ``"every:n"``, ``"all"``, ``"none"`` or a sequence of block
    indices (negative indices count from the end) into a sorted tuple of block indices."""
    if spec is None:
        return last_layers(num_hidden_layers, min(2, num_hidden_layers))
    if isinstance(spec, str):
        kind, _, arg = spec.partition(":")
        try:
            if kind == "last":
                return last_layers(num_hidden_layers, int(arg))
            if kind == "every":
                return every_nth_layer(num_hidden_layers, int(arg))
        except ValueError as err:
            raise ValueError(f"moe_layers={spec!r} is invalid: {err}") from None
        if spec == "all":
            return tuple(range(num_hidden_layers))
        if spec in ("none", ""):
            return ()
        raise ValueError(
            f"moe_layers={spec!r} is not understood; use a list of block indices, 'last:L', 'every:n', 'all' or 'none'"
        )
    try:
        indices = [int(i) for i in spec]
    except (TypeError, ValueError):
        raise ValueError(f"moe_layers must be a sequence of block indices, got {spec!r}") from None
    resolved = []
    for i in indices:
        j = i + num_hidden_layers if i < 0 else i
        if not 0 <= j < num_hidden_layers:
            raise ValueError(f"moe_layers contains block index {i}, out of range for num_hidden_layers={num_hidden_layers}")
        resolved.append(j)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"moe_layers contains duplicate block indices: {list(spec)}")
    return tuple(sorted(resolved))


@strict
class VMoEConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a Vision Mixture-of-Experts Transformer: a ViT whose MLP blocks are partly replaced by MoE
    blocks. Defaults give Mobile V-MoE-Tiny: ViT-Tiny (12 x 192, 3 heads, MLP 768, patch 16, 224 px) with one
    per-image router sending each image to 1 of 10 experts in the last two blocks.

    ViT fields (`hidden_size`, `num_hidden_layers`, `num_attention_heads`, `intermediate_size`, `hidden_act`,
    dropouts, `initializer_range`, `layer_norm_eps`, `image_size`, `patch_size`, `num_channels`, `qkv_bias`) mean
    what they mean in `ViTConfig`. `layerscale_value` (None = no layer scale) and `drop_path_rate` follow DINOv2;
    `pooling` chooses the classification input: the class token (`"cls"`, ViT), the mean of the patch tokens
    (`"mean"`) or both concatenated (`"cls_mean"`, DINOv2). `use_cls_token=False` drops the class token (V-MoE's
    `classifier="gap"`: position embeddings for the patches only, `pooling="mean"` over every token).
    `representation_size` (None = none) puts a Dense + tanh pre-logits layer of that width between the pooled
    output and the classifier (ViT / V-MoE `representation_size`).

    MoE fields:
        routing_level (`str`): `"image"` routes whole images (Mobile V-MoE); `"token"` routes each token (V-MoE, ViMoE).
        router_type (`str`): `"top_k"` (each item picks its k experts; both levels), `"expert_choice"` (each expert
            picks its top-C tokens, Zhou et al. 2022; token routing) or `"soft"` (Soft MoE, Puigcerver et al. 2023:
            each expert processes `num_slots` softmax-weighted mixes of an image's tokens; token routing).
        num_experts (`int`): experts per MoE block.
        num_experts_per_tok (`int`): k of top-k routing, experts per image (image routing) or per token.
        num_slots (`int`, None = derived): Soft MoE slots per expert (per image). None (vmoe's `SoftRouter` default)
            derives it from the capacity factor as vmoe does: round(tokens per image x factor / num_experts), factor
            = `capacity_factor` (None = 1.0), tokens per image at `image_size`; stored resolved.
        moe_layers (`tuple[int]` | `str` | None): MoE block indices; None = last two blocks; also `"last:L"`,
            `"every:n"`, `"all"`, `"none"` (a dense ViT). Stored resolved, as a tuple of indices.
        moe_intermediate_size (`int`, None = `intermediate_size`): hidden width of each routed expert (the name of
            Qwen2-MoE and Mixtral-style configs; `expert_intermediate_size`, its earlier name, is still accepted
            as a keyword or in a config.json and still reads and writes it).
        num_shared_experts (`int`): always-on experts beside the routed ones (ViMoE); 0 = none.
        shared_expert_intermediate_size (`int`, None = `moe_intermediate_size`): width of each shared expert.
        shared_router (`bool`, None = True for image routing): image routing only; one router whose decision serves
            every MoE block (Mobile V-MoE) instead of one router per block.
        router_input (`str`): image routing only; the router reads the class token (`"cls"`) or the mean of the
            patch tokens (`"mean"`) of the hidden states entering the (first) MoE block.
        normalize_router_weights (`bool`): renormalise the top-k combine weights to sum to one (False = V-MoE:
            the softmax probabilities of the chosen experts).
        capacity_factor (`float`, None = dropless): training-time expert capacity, ceil(k * n * factor / E) per
            expert and routing group of n items; overflowing assignments are dropped (the residual carries the
            input). `eval_capacity_factor` is the same at inference (None = dropless). Expert choice always has a
            capacity: C = ceil(n * factor / E), with factor = `capacity_factor` (None = 1.0) in training and
            `eval_capacity_factor` (None = the training factor) at inference.
        capacity_multiple_of (`int`, optional): round capacities up to a multiple of this (V-MoE uses 4).
        router_group_size (`int`, optional): token routing only; tokens are routed in independent groups of this
            many tokens (consecutive in batch order, as V-MoE's `group_size`), each with its own capacity. None =
            one group per batch, except expert choice at inference, which routes each image alone (so an image's
            outputs do not depend on the rest of the batch). Not for Soft MoE, whose groups are always images.
        router_group_remainder (`str`): what a batch whose token count `router_group_size` does not divide gets:
            `"error"` (a ValueError, as V-MoE's reshape), `"partial"` (a last, smaller group with the capacity of
            its own size) or `"pad"` (at inference, the batch is padded with all-zero images up to whole groups and
            the padding dropped from the outputs: V-MoE's evaluator, which pads its last batch with zero examples).
        batch_priority_routing (`bool`): with a capacity, items with the highest router weight are served first.
        router_noise_std (`float`): std of Gaussian noise added to router logits in training only.
        router_aux_loss_coef (`float`): switch-style load-balancing loss coefficient.
        router_importance_loss_coef (`float`): V-MoE importance loss (squared coefficient of variation).
        router_z_loss_coef (`float`): ST-MoE router z-loss coefficient.
        router_load_loss_coef (`float`): V-MoE's noise-based load loss (top-k routers, training with
            `router_noise_std > 0` only).
        router_bias_update_rate (`float`): auxiliary-loss-free load balancing (Wang et al. 2024; DeepSeek-V3's
            `e_score_correction_bias`), top-k routers: a float32 per-expert bias is added to the router's softmax
            probabilities to *select* experts (the combine weights stay the unbiased probabilities); after each
            optimizer step `update_router_biases` moves it by `rate * sign(mean load - load)`. 0 = off (no bias).
        router_aux_loss_layer_reduction (`str`): how the losses of the router calls combine: `"mean"` or `"sum"`
            (V-MoE).
        expert_dispatch_dtype (`str`, optional): `"bfloat16"` rounds every expert's input and output through
            bfloat16 and sums the weighted outputs in float32 (V-MoE's `dispatcher.bfloat16`); for Soft MoE the
            tokens before they are mixed into slots and the slot outputs before they are mixed back (vmoe's Soft
            MoE dispatcher); None = no rounding.
        output_router_logits (`bool`): return router logits and routing statistics in the outputs (the aux loss is
            computed and added to `loss` whenever the model trains or gets labels, whatever this says).
        superclass_ids (`list[int]`, optional): length `num_labels`, class -> super-class in [0, num_experts).
        superclass_loss_coef (`float`): weight of the router's super-class cross-entropy (Mobile V-MoE: 0.3).
        train_routing (`str`): `"router"` routes by the router in training; `"superclass"` routes each training
            image to the expert of its label's super-class (image routing; the router still learns through the
            super-class loss). Inference always routes by the router.
        out_features / out_indices: backbone stages (`"stem"`, `"stage1"` ... `"stageN"`).

    Types are checked by `@strict` on assignment; ranges and combinations by the `validate_*` methods, which
    construction runs first (raising a `ValueError` that names the bad value) and `validate()` runs again.
    """

    model_type = "vmoe"
    keys_to_ignore_at_inference = [
        "aux_loss", "router_logits", "hidden_states", "attentions", "superclass_loss", "superclass_accuracy",
        "expert_counts",
    ]
    # earlier names of fields: read and written through to the field; accepted as keywords and in a config.json
    attribute_map = {"expert_intermediate_size": "moe_intermediate_size"}

    # ViT
    hidden_size: int = 192
    num_hidden_layers: int = 12
    num_attention_heads: int = 3
    intermediate_size: int = 768
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    initializer_range: float | int = 0.02
    layer_norm_eps: float | int = 1e-12
    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int | list[int] | tuple[int, int] = 16
    num_channels: int = 3
    qkv_bias: bool = True
    layerscale_value: float | int | None = None
    drop_path_rate: float | int = 0.0
    pooling: str = "cls"
    use_cls_token: bool = True
    representation_size: int | None = None
    # MoE
    routing_level: str = "image"
    router_type: str = "top_k"
    num_experts: int = 10
    num_experts_per_tok: int = 1
    num_slots: int | None = None
    moe_layers: tuple[int, ...] | list[int] | str | None = None
    moe_intermediate_size: int | None = None
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int | None = None
    shared_router: bool | None = None
    router_input: str = "mean"
    normalize_router_weights: bool = False
    capacity_factor: float | int | None = None
    eval_capacity_factor: float | int | None = None
    capacity_multiple_of: int | None = None
    router_group_size: int | None = None
    router_group_remainder: str = "error"
    batch_priority_routing: bool = True
    router_noise_std: float | int = 0.0
    router_aux_loss_coef: float | int = 0.01
    router_importance_loss_coef: float | int = 0.0
    router_z_loss_coef: float | int = 0.001
    router_load_loss_coef: float | int = 0.0
    router_bias_update_rate: float | int = 0.0
    router_aux_loss_layer_reduction: str = "mean"
    expert_dispatch_dtype: str | None = None
    output_router_logits: bool = False
    superclass_ids: tuple[int, ...] | list[int] | None = None
    superclass_loss_coef: float | int = 0.3
    train_routing: str = "router"
    # backbone
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None
    apply_layernorm: bool = True
    reshape_hidden_states: bool = True

    def __post_init__(self, **kwargs):
        if not self.num_hidden_layers >= 1:
            raise ValueError(f"num_hidden_layers must be a positive integer, got {self.num_hidden_layers!r}")
        self.moe_layers = resolve_moe_layers(self.moe_layers, self.num_hidden_layers)
        for old, new in self.attribute_map.items():  # before the defaults below, which read the new name
            if old in kwargs:  # wins, as transformers sets it after the fields (`{**config.to_dict(), old: value}`)
                value = kwargs.pop(old)
                if getattr(self, new) is not None and getattr(self, new) != value:
                    logger.warning(f"{old}={value!r} replaces {new}={getattr(self, new)!r} ({old} is the old name of "
                                   f"{new}; give {new} only)")
                setattr(self, new, value)
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.shared_expert_intermediate_size is None:
            self.shared_expert_intermediate_size = self.moe_intermediate_size
        if self.shared_router is None:
            self.shared_router = self.routing_level == "image"
        self.stage_names = ["stem"] + [f"stage{idx}" for idx in range(1, self.num_hidden_layers + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        super().__post_init__(**kwargs)
        self.check_vmoe()

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """`PreTrainedConfig.get_config_dict`, with a clear error for a mistyped local folder (`check_local_path`)."""
        check_local_path(pretrained_model_name_or_path)
        return super().get_config_dict(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """As `PreTrainedConfig.from_dict`, and a new label set resets the super-class map, which maps the old one.

        Fine-tuning to new labels (`from_pretrained(DIR, num_labels=N, ignore_mismatched_sizes=True)`, or a new
        `id2label`) drops a saved `superclass_ids` of another length: the router then trains as a learned router
        (no super-class loss) until a new map is set. An explicit `superclass_ids=` kwarg is used as given."""
        config_dict = dict(config_dict)
        for name in ("superclass_ids", "train_routing"):  # set before construction, which checks them together
            if name in kwargs:
                config_dict[name] = kwargs.pop(name)
        saved = config_dict.get("superclass_ids")
        new_id2label = kwargs.get("id2label")
        num_labels = kwargs.get("num_labels", len(new_id2label) if new_id2label is not None else None)
        if saved is not None and num_labels is not None and len(saved) != num_labels:
            config_dict["superclass_ids"] = None
            logger.warning(
                f"superclass_ids reset to None: the saved map has {len(saved)} entries (one per old label) but "
                f"num_labels is now {num_labels}. The router trains as a learned router, without the super-class "
                "loss, until a new map is set (config.superclass_ids, e.g. from `hf-vmoe superclasses from-model`)."
            )
        if config_dict.get("superclass_ids") is None and config_dict.get("train_routing") == "superclass":
            config_dict["train_routing"] = "router"
            logger.warning("train_routing 'superclass' -> 'router': there is no super-class map to route by")
        return super().from_dict(config_dict, **kwargs)

    def __setattr__(self, key, value):
        """An old name (`attribute_map`) is set through the field's own name, so `@strict` checks the value as it
        checks the field's (transformers maps the name after the check, which then finds no field)."""
        new = type(self).attribute_map.get(key)
        if new is not None:
            setattr(self, new, value)
        else:
            super().__setattr__(key, value)

    @property
    def is_moe(self) -> bool:
        return len(self.moe_layers) > 0

    @property
    def base_model_ep_plan(self) -> dict[str, str] | None:
        """Expert-parallel plan of token routing, for `from_pretrained(..., distributed_config=DistributedConfig(
        ep_size=...))`: the stacked expert tensors are split on the expert dimension and the experts call is
        dispatched to the ranks that hold them. Image routing has no plan (it runs whole images per expert)."""
        if self.routing_level != "token" or not self.is_moe:
            return None
        experts = "encoder.layer.*.mlp.experts"
        plan = {f"{experts}.{name}": "grouped_gemm" for name in ("up_proj", "up_proj_bias", "down_proj", "down_proj_bias")}
        plan[experts] = "ep_dispatch_experts"
        return plan

    def check_vmoe(self, experts_implementation: str | None = None) -> None:
        """Run every `validate_*` check of this class, raising its `ValueError` directly (`validate()` wraps it).

        Called at construction and again when a model is built (fields may change after construction).
        `experts_implementation` is the backend the model will use, when known."""
        self.moe_layers = resolve_moe_layers(self.moe_layers, self.num_hidden_layers)
        self.validate_vmoe_sizes()
        self.validate_vmoe_rates()
        if self.router_type == "soft" and self.num_slots is None:
            self.num_slots = self.soft_moe_slots()
        self.validate_vmoe_routing()
        self.validate_vmoe_superclasses()
        if experts_implementation == "grouped_mm" and self.is_moe:
            # torch's CPU grouped_mm needs 16-byte aligned strides: widths must be multiples of 8 (fp32 and bf16)
            bad = {n: getattr(self, n) for n in ("hidden_size", "moe_intermediate_size") if getattr(self, n) % 8}
            if bad:
                raise ValueError(
                    f"experts_implementation='grouped_mm' needs expert widths that are multiples of 8, got {bad}; "
                    "use experts_implementation='eager' or change the widths"
                )

    def soft_moe_slots(self) -> int:
        """vmoe's `SoftRouter` slots per expert when `num_slots` is not given: round(tokens per image x capacity
        factor / num_experts) (Python's round, as vmoe's `compute_capacity(..., ceil_or_round="round")`)."""
        image, patch = to_pair(self.image_size), to_pair(self.patch_size)
        tokens = (image[0] // patch[0]) * (image[1] // patch[1]) + (1 if self.use_cls_token else 0)
        factor = 1.0 if self.capacity_factor is None else self.capacity_factor
        slots = int(round(tokens * factor / self.num_experts))
        if slots < 1:
            raise ValueError(
                f"Soft MoE with num_slots=None: {tokens} tokens per image x capacity_factor {factor} / num_experts "
                f"{self.num_experts} rounds to {slots} slots per expert; set num_slots or a larger capacity_factor"
            )
        return slots

    def validate_vmoe_sizes(self):
        """Widths, counts and the patch grid."""
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_channels",
                     "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                     "shared_expert_intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_slots is not None and (isinstance(self.num_slots, bool) or not isinstance(self.num_slots, int)
                                           or self.num_slots < 1):
            raise ValueError(f"num_slots must be a positive integer or None, got {self.num_slots!r}")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be an integer >= 0, got {self.num_shared_experts!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        for name in ("image_size", "patch_size"):
            value = getattr(self, name)
            pair = value if isinstance(value, (list, tuple)) else (value, value)
            if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
                raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
        image, patch = to_pair(self.image_size), to_pair(self.patch_size)
        if image[0] % patch[0] or image[1] % patch[1]:
            raise ValueError(f"image_size {tuple(image)} must be divisible by patch_size {tuple(patch)}")

    def validate_vmoe_rates(self):
        """Coefficients, probabilities and epsilons."""
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate", "router_noise_std",
                     "router_aux_loss_coef", "router_importance_loss_coef", "router_z_loss_coef",
                     "router_load_loss_coef", "router_bias_update_rate", "superclass_loss_coef", "initializer_range"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            if not getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be a number > 0, got {self.layer_norm_eps!r}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be None (dropless) or a number > 0, got {value!r}")
        for name in ("capacity_multiple_of", "router_group_size", "representation_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or a positive integer, got {value!r}")

    def validate_vmoe_routing(self):
        """Choices and the combinations of routing fields that fit together."""
        choices = {
            "hidden_act": ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "quick_gelu"),
            "pooling": POOLINGS, "routing_level": ROUTING_LEVELS, "router_type": tuple(ROUTER_LEVELS),
            "router_input": ROUTER_INPUTS, "train_routing": TRAIN_ROUTINGS,
            "router_group_remainder": GROUP_REMAINDERS, "router_aux_loss_layer_reduction": LAYER_REDUCTIONS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok (k={self.num_experts_per_tok}) must be <= num_experts ({self.num_experts})"
            )
        if self.routing_level == "token" and self.shared_router:
            raise ValueError("shared_router=True is only supported with routing_level='image' (got 'token')")
        levels = ROUTER_LEVELS[self.router_type]
        if self.routing_level not in levels:
            raise ValueError(
                f"router_type={self.router_type!r} routes {' or '.join(f'{x}s' for x in levels)}: it needs "
                f"routing_level={' or '.join(repr(x) for x in levels)}, got {self.routing_level!r}"
            )
        if self.router_bias_update_rate and self.train_routing == "superclass" and self.superclass_ids is not None:
            raise ValueError(
                f"router_bias_update_rate={self.router_bias_update_rate} balances the router's own choices; with "
                "train_routing='superclass' training images go to their super-class's expert, so the bias would "
                "drift without balancing anything: use train_routing='router' or set the rate to 0"
            )
        if self.router_bias_update_rate and self.router_type in ("expert_choice", "soft"):
            raise ValueError(
                f"router_bias_update_rate={self.router_bias_update_rate} balances top-k routers; "
                f"router_type={self.router_type!r} is balanced by construction: set it to 0"
            )
        if self.router_group_size is not None and self.routing_level != "token":
            raise ValueError(
                f"router_group_size={self.router_group_size} groups tokens: it needs routing_level='token', "
                f"got {self.routing_level!r}"
            )
        if self.router_group_size is not None and self.router_type == "soft":
            raise ValueError(
                f"router_group_size={self.router_group_size} does not apply to router_type='soft': Soft MoE mixes "
                "the tokens of each image (one group per image); leave router_group_size=None"
            )
        if self.expert_dispatch_dtype is not None:
            if self.expert_dispatch_dtype not in DISPATCH_DTYPES:
                raise ValueError(
                    f"expert_dispatch_dtype must be None or one of {DISPATCH_DTYPES}, got {self.expert_dispatch_dtype!r}"
                )
            if self.routing_level != "token":
                raise ValueError(
                    f"expert_dispatch_dtype={self.expert_dispatch_dtype!r} rounds the dispatched tokens: it needs "
                    f"routing_level='token', got {self.routing_level!r}"
                )
        if not self.use_cls_token:
            if self.pooling != "mean":
                raise ValueError(
                    f"use_cls_token=False leaves no class token to pool: it needs pooling='mean', got {self.pooling!r}"
                )
            if self.routing_level == "image" and self.router_input == "cls" and self.is_moe:
                raise ValueError("use_cls_token=False leaves no class token for the router: router_input='cls' "
                                 "needs use_cls_token=True")

    def validate_vmoe_superclasses(self):
        """The class -> super-class map of super-class guided routing (Mobile V-MoE)."""
        if self.superclass_ids is not None:
            try:
                ids = [operator.index(s) for s in self.superclass_ids]
            except TypeError:
                raise ValueError(
                    f"superclass_ids must be a list of integer super-class ids, got {self.superclass_ids!r}"
                ) from None
            if len(ids) != self.num_labels:
                raise ValueError(
                    f"superclass_ids has {len(ids)} entries but num_labels is {self.num_labels}: "
                    "it must map every class to a super-class"
                )
            bad = [(c, s) for c, s in enumerate(ids) if not 0 <= s < self.num_experts]
            if bad:
                c, s = bad[0]
                raise ValueError(
                    f"superclass_ids[{c}] = {s} is out of range: super-classes must be in [0, num_experts={self.num_experts})"
                )
            if self.routing_level != "image":
                raise ValueError(
                    "superclass_ids (super-class guided routing) needs routing_level='image', "
                    f"got {self.routing_level!r}"
                )
        if self.train_routing == "superclass" and self.superclass_ids is None:
            raise ValueError("train_routing='superclass' needs superclass_ids")
        if self.train_routing == "superclass" and not self.shared_router:
            raise ValueError(
                "train_routing='superclass' needs shared_router=True (one routing decision per image), "
                f"got {self.shared_router!r}"
            )


__all__ = ["VMoEConfig", "last_layers", "every_nth_layer", "resolve_moe_layers", "to_pair", "check_local_path"]
