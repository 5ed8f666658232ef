"""Analytic parameter and FLOP counts for VMoE models (dense ViTs, image-routed and token-routed MoEs).

What is counted (say it once, precisely):

* **FLOPs = 2 x multiply-accumulates (MACs)** of the dense linear algebra: the patch-embedding convolution, the
  q/k/v/o projections, the two attention matmuls (Q K^T and attention x V), the MLP / expert / shared-expert
  matmuls, the router's linear layer and the classifier. This is what `torch.utils.flop_counter.FlopCounterMode`
  counts, and the tests check the analytic numbers against it.
* Not counted: bias additions, layer norms, softmax, GELU, residual additions, the position-embedding addition,
  pooling, the gating multiply. They are a few percent of a ViT's arithmetic and no FLOP counter agrees on them.
* Many vision papers (DeiT's "1.3 GFLOPs" ViT-Tiny, fvcore) report **MACs** and call them FLOPs. `ModelCost.macs`
  is that number (FLOPs / 2); the presets table prints both.

*Active* numbers are per image at inference: k routed experts per token (token routing) or per image (image
routing), every shared expert, every router that runs. *Total* parameters count every expert;
`flops_all_experts` is what one image would cost if every routed expert ran on it (the dense model with the same
parameter count).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..configuration_vmoe import VMoEConfig, to_pair
from ..modeling_vmoe import ROUTER_CLASSES, flop_breakdown


@dataclass
class ModelCost:
    """Parameters and per-image FLOPs of a configuration (see the module docstring for what is counted)."""

    params_total: int
    params_active: int
    flops: int  # active FLOPs per image (2 x MACs)
    flops_all_experts: int  # FLOPs per image if every routed expert ran
    num_tokens: int
    breakdown: dict[str, int] = field(default_factory=dict)  # FLOPs per component, summed over layers

    @property
    def macs(self) -> int:
        return self.flops // 2

    def to_dict(self) -> dict:
        out = asdict(self)
        out["macs"] = self.macs
        return out


def count_params(config: VMoEConfig, head: str = "classification") -> tuple[int, int]:
    """(total, active per image) parameter counts, exactly matching the model's `parameters()` for the
    classification model (`head="classification"`) or the bare `VMoEModel` (`head=None`)."""
    if head not in ("classification", None):
        raise ValueError(f"head must be 'classification' or None, got {head!r}")
    h = config.hidden_size
    c = config.num_channels
    ph, pw = to_pair(config.patch_size)
    ih, iw = to_pair(config.image_size)
    num_patches = (ih // ph) * (iw // pw)
    e, k = config.num_experts, config.num_experts_per_tok
    ie = config.moe_intermediate_size

    cls = 1 if getattr(config, "use_cls_token", True) else 0
    embed = cls * h + (num_patches + cls) * h + c * ph * pw * h + h  # cls, position, conv weight + bias
    attention = 4 * h * h + (3 * h if config.qkv_bias else 0) + h
    norms = 4 * h
    scale = 2 * h if config.layerscale_value is not None else 0
    dense_mlp = 2 * h * config.intermediate_size + config.intermediate_size + h
    expert = 2 * h * ie + ie + h
    shared = 0
    if config.num_shared_experts:
        width = config.num_shared_experts * config.shared_expert_intermediate_size
        shared = 2 * h * width + width + h
    router = ROUTER_CLASSES[config.router_type]  # its parameters and how many experts every image uses
    per_layer_router = 0 if (config.routing_level == "image" and config.shared_router) else router.num_parameters(config)
    k = router.active_experts(config)

    total = active = embed + 2 * h  # + final layer norm
    for idx in range(config.num_hidden_layers):
        common = attention + norms + scale
        if idx in config.moe_layers:
            total += common + e * expert + shared + per_layer_router
            active += common + k * expert + shared + per_layer_router
        else:
            total += common + dense_mlp
            active += common + dense_mlp
    if config.is_moe and config.routing_level == "image" and config.shared_router:
        total += e * h
        active += e * h
    if head == "classification" and config.num_labels > 0:
        in_features = h * (2 if config.pooling == "cls_mean" else 1)
        head_params = 0
        if getattr(config, "representation_size", None):  # pre-logits: Dense(R) + tanh
            head_params = in_features * config.representation_size + config.representation_size
            in_features = config.representation_size
        head_params += in_features * config.num_labels + config.num_labels
        total += head_params
        active += head_params
    return total, active


def count_flops(config: VMoEConfig, head: str = "classification", image_size=None, batch_size: int = 1) -> ModelCost:
    """Per-image FLOPs (2 x MACs) and parameters of `config`; `image_size` overrides the config's resolution (the
    model then interpolates its position embeddings). `batch_size` matters only with `router_group_size`: expert choice's
    capacity is per routing group (without a group size it routes each image alone at inference), and
    `router_group_remainder="pad"` runs padding images."""
    b = flop_breakdown(config, image_size, batch_size, head)
    flops = sum(b.values())
    ih, iw = to_pair(image_size if image_size is not None else config.image_size)
    ph, pw = to_pair(config.patch_size)
    t = (ih // ph) * (iw // pw) + (1 if config.use_cls_token else 0)
    expert = 2 * 2 * t * config.hidden_size * config.moe_intermediate_size  # one expert on every token
    all_experts = config.num_experts * expert * len(config.moe_layers) - b["experts"]
    total, active = count_params(config, head)
    return ModelCost(
        params_total=total, params_active=active, flops=flops, flops_all_experts=flops + all_experts,
        num_tokens=t, breakdown=b,
    )


def measure_flops(model, pixel_values=None, batch_size: int = 2) -> int:
    """Brute-force FLOPs per image of one eval forward pass of `model`, counted by torch's `FlopCounterMode`
    (matmuls and convolutions, 2 per multiply-add).

    The counter does not see every fused kernel (CPU sdpa attention, `grouped_mm` experts), so the model runs with
    eager attention and eager experts while it counts; both are restored afterwards."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    config = model.config
    if pixel_values is None:
        ih, iw = to_pair(config.image_size)
        pixel_values = torch.randn(batch_size, config.num_channels, ih, iw, device=next(model.parameters()).device)
    was_training = model.training
    attn = config._attn_implementation
    experts = getattr(config, "_experts_implementation", None)
    model.eval()
    try:
        model.set_attn_implementation("eager")
        if getattr(config, "is_moe", False):
            model.set_experts_implementation("eager")
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(pixel_values=pixel_values)
    finally:
        model.train(was_training)
        model.set_attn_implementation(attn)
        if getattr(config, "is_moe", False) and experts is not None:
            model.set_experts_implementation(experts)
    return counter.get_total_flops() // pixel_values.shape[0]


def format_count(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


__all__ = ["ModelCost", "count_params", "count_flops", "measure_flops", "format_count"]
