"""VMoE model configuration.

A ViT configuration plus the fields that say which blocks are mixture-of-experts blocks, how inputs are
routed to experts (whole images as in Mobile V-MoE, or tokens as in V-MoE / ViMoE), shared experts
(ViMoE), and the auxiliary losses. The config is plain data: it imports nothing from this package.
"""

import operator

from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

ROUTING_LEVELS = ("image", "token")
ROUTER_INPUTS = ("cls", "mean")
POOLINGS = ("cls", "mean", "cls_mean")
TRAIN_ROUTINGS = ("router", "superclass")
EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


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


class VMoEConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a Vision Mixture-of-Experts Transformer (a ViT whose MLP blocks are partly replaced by MoE
    blocks). Defaults give Mobile V-MoE-Tiny: ViT-Tiny (12 x 192, 3 heads, MLP 768, patch 16, 224 px) with a single
    per-image router sending each image to 1 of 10 experts in the last two blocks.

    ViT fields (`hidden_size`, `num_hidden_layers`, `num_attention_heads`, `intermediate_size`, `hidden_act`,
    dropouts, `initializer_range`, `layer_norm_eps`, `image_size`, `patch_size`, `num_channels`, `qkv_bias`) mean
    what they mean in `ViTConfig`. `layerscale_value` (None = no layer scale) and `drop_path_rate` follow DINOv2;
    `pooling` chooses the classification input: the class token (`"cls"`, ViT), the mean of the patch tokens
    (`"mean"`) or both concatenated (`"cls_mean"`, DINOv2).

    MoE fields:
        routing_level (`str`): `"image"` routes whole images (Mobile V-MoE); `"token"` routes each token (V-MoE, ViMoE).
        num_experts (`int`): experts per MoE block.
        num_experts_per_tok (`int`): k, experts per image (image routing) or per token (token routing).
        moe_layers (`tuple[int]` | `str` | None): MoE block indices; None = last two blocks; also `"last:L"`,
            `"every:n"`, `"all"`, `"none"` (a dense ViT). Stored resolved, as a tuple of indices.
        expert_intermediate_size (`int`, None = `intermediate_size`): hidden width of each routed expert.
        num_shared_experts (`int`): always-on experts beside the routed ones (ViMoE); 0 = none.
        shared_expert_intermediate_size (`int`, None = `expert_intermediate_size`): width of each shared expert.
        shared_router (`bool`, None = True for image routing): image routing only; one router whose decision serves
            every MoE block (Mobile V-MoE) instead of one router per block.
        router_input (`str`): image routing only; the router reads the class token (`"cls"`) or the mean of the
            patch tokens (`"mean"`) of the hidden states entering the (first) MoE block.
        normalize_router_weights (`bool`): renormalise the top-k combine weights to sum to one (False = V-MoE:
            the softmax probabilities of the chosen experts).
        capacity_factor (`float`, None = dropless): training-time expert capacity, ceil(k * N * factor / E) per
            expert over the N routed items of a batch; overflowing assignments are dropped (the residual carries
            the input). `eval_capacity_factor` is the same at inference (None = dropless, the default).
        batch_priority_routing (`bool`): with a capacity, items with the highest router weight are served first.
        router_noise_std (`float`): std of Gaussian noise added to router logits in training only.
        router_aux_loss_coef (`float`): switch-style load-balancing loss coefficient.
        router_importance_loss_coef (`float`): V-MoE importance loss (squared coefficient of variation).
        router_z_loss_coef (`float`): ST-MoE router z-loss coefficient.
        output_router_logits (`bool`): return router logits in the outputs (aux losses are added to `loss`
            whenever labels are given, whatever this says).
        superclass_ids (`list[int]`, optional): length `num_labels`, class -> super-class in [0, num_experts).
        superclass_loss_coef (`float`): weight of the router's super-class cross-entropy (Mobile V-MoE: 0.3).
        train_routing (`str`): `"router"` routes by the router in training; `"superclass"` routes each training
            image to the expert of its label's super-class (image routing; the router still learns through the
            super-class loss). Inference always routes by the router.
        out_features / out_indices: backbone stages (`"stem"`, `"stage1"` ... `"stageN"`).
    """

    model_type = "vmoe"
    keys_to_ignore_at_inference = [
        "aux_loss", "router_logits", "hidden_states", "attentions", "superclass_loss", "superclass_accuracy",
        "expert_counts",
    ]

    # ViT
    hidden_size: int = 192
    num_hidden_layers: int = 12
    num_attention_heads: int = 3
    intermediate_size: int = 768
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int | list[int] | tuple[int, int] = 16
    num_channels: int = 3
    qkv_bias: bool = True
    layerscale_value: float | None = None
    drop_path_rate: float = 0.0
    pooling: str = "cls"
    # MoE
    routing_level: str = "image"
    num_experts: int = 10
    num_experts_per_tok: int = 1
    moe_layers: tuple[int, ...] | list[int] | str | None = None
    expert_intermediate_size: int | None = None
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int | None = None
    shared_router: bool | None = None
    router_input: str = "mean"
    normalize_router_weights: bool = False
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    batch_priority_routing: bool = True
    router_noise_std: float = 0.0
    router_aux_loss_coef: float = 0.01
    router_importance_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.001
    output_router_logits: bool = False
    superclass_ids: tuple[int, ...] | list[int] | None = None
    superclass_loss_coef: float = 0.3
    train_routing: str = "router"
    # backbone
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None
    apply_layernorm: bool = True
    reshape_hidden_states: bool = True

    def __post_init__(self, **kwargs):
        if isinstance(self.num_hidden_layers, bool) or not isinstance(self.num_hidden_layers, int) \
                or self.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be a positive integer, got {self.num_hidden_layers!r}")
        self.moe_layers = resolve_moe_layers(self.moe_layers, self.num_hidden_layers)
        if self.expert_intermediate_size is None:
            self.expert_intermediate_size = self.intermediate_size
        if self.shared_expert_intermediate_size is None:
            self.shared_expert_intermediate_size = self.expert_intermediate_size
        if self.shared_router is None:
            self.shared_router = self.routing_level == "image"
        if self.superclass_ids is not None:
            try:
                self.superclass_ids = [operator.index(s) for s in self.superclass_ids]
            except TypeError:
                raise ValueError(
                    f"superclass_ids must be a list of integer super-class ids, got {self.superclass_ids!r}"
                ) from None
        self.stage_names = ["stem"] + [f"stage{idx}" for idx in range(1, self.num_hidden_layers + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        super().__post_init__(**kwargs)
        self.validate_vmoe()

    @property
    def is_moe(self) -> bool:
        return len(self.moe_layers) > 0

    def validate_vmoe(self, experts_implementation: str | None = None) -> None:
        """Check every field and combination; raise a ValueError that names the bad value.

        Called at the end of construction and again when a model is built (fields may be changed after
        construction). `experts_implementation` is the backend the model will use, when known."""

        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        def non_negative(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")

        def one_of(name, choices):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")

        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_channels",
                     "num_experts", "num_experts_per_tok", "expert_intermediate_size",
                     "shared_expert_intermediate_size"):
            positive_int(name)
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate", "router_noise_std",
                     "router_aux_loss_coef", "router_importance_loss_coef", "router_z_loss_coef",
                     "superclass_loss_coef", "initializer_range"):
            non_negative(name)
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            if not getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if isinstance(self.layer_norm_eps, bool) or not isinstance(self.layer_norm_eps, (int, float)) \
                or not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be a number > 0, got {self.layer_norm_eps!r}")
        for name in ("qkv_bias", "normalize_router_weights", "batch_priority_routing", "output_router_logits",
                     "shared_router", "apply_layernorm", "reshape_hidden_states"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.num_shared_experts, bool) or not isinstance(self.num_shared_experts, int) \
                or self.num_shared_experts < 0:
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
        image = self.image_size if isinstance(self.image_size, (list, tuple)) else (self.image_size,) * 2
        patch = self.patch_size if isinstance(self.patch_size, (list, tuple)) else (self.patch_size,) * 2
        if image[0] % patch[0] or image[1] % patch[1]:
            raise ValueError(f"image_size {tuple(image)} must be divisible by patch_size {tuple(patch)}")
        one_of("hidden_act", ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "quick_gelu"))
        one_of("pooling", POOLINGS)
        one_of("routing_level", ROUTING_LEVELS)
        one_of("router_input", ROUTER_INPUTS)
        one_of("train_routing", TRAIN_ROUTINGS)
        self.moe_layers = resolve_moe_layers(self.moe_layers, self.num_hidden_layers)
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok (k={self.num_experts_per_tok}) must be <= num_experts ({self.num_experts})"
            )
        if self.routing_level == "token" and self.shared_router:
            raise ValueError("shared_router=True is only supported with routing_level='image' (got 'token')")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"{name} must be None (dropless) or a number > 0, got {value!r}")
        if self.layerscale_value is not None and (
            isinstance(self.layerscale_value, bool) or not isinstance(self.layerscale_value, (int, float))
        ):
            raise ValueError(f"layerscale_value must be None or a number, got {self.layerscale_value!r}")
        if self.superclass_ids is not None:
            ids = list(self.superclass_ids)
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
        if experts_implementation == "grouped_mm" and self.is_moe:
            # torch's CPU grouped_mm needs 16-byte aligned strides: widths must be multiples of 8 (fp32 and bf16)
            bad = {n: getattr(self, n) for n in ("hidden_size", "expert_intermediate_size") if getattr(self, n) % 8}
            if bad:
                raise ValueError(
                    f"experts_implementation='grouped_mm' needs expert widths that are multiples of 8, got {bad}; "
                    "use experts_implementation='eager' or change the widths"
                )


__all__ = ["VMoEConfig", "last_layers", "every_nth_layer", "resolve_moe_layers"]
