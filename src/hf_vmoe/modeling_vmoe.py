"""PyTorch VMoE: Vision Transformers with sparse mixture-of-experts MLP blocks.

One file holds every class a checkpoint needs (`trust_remote_code` copies it, and transformers' experts interface
only switches backends for experts classes defined beside the model). Layout follows transformers' ViT / DINOv2 /
Qwen2-MoE:

    VMoEEmbeddings -> VMoEEncoder: [VMoELayer] x N -> LayerNorm -> head
    VMoELayer          = attention + (VMoEMLP | VMoESparseMoeBlock), pre-norm residuals, optional layer scale
    VMoESparseMoeBlock = router -> routing plan -> plan.apply(VMoEExperts) + shared expert

The routing contract (after google-research/vmoe, where every router returns a dispatcher): a router
(`VMoERouter` subclass, chosen by `config.router_type`) reads the hidden states and returns
`(router_logits, plan)`. A plan (`VMoERouting` subclass) applies itself: `apply(experts, hidden_states)` sends the
tokens (or slots) to the experts (`VMoEExperts`, stacked (E, out, in) tensors behind transformers' experts
interface) and brings their outputs back, so the MoE block runs any plan without knowing which router made it.
`vmoe_routing_loss` turns the plans of one forward into the aux loss and the routing statistics. Plans and router
logits are recorded by transformers' output capture (`_can_record_outputs`), so layers return hidden states only.
"""

import inspect
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, wraps

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.integrations.moe import (
    ALL_EXPERTS_FUNCTIONS,
    grouped_mm_experts_forward,
    use_experts_implementation,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, logging
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_vmoe import ROUTER_LEVELS, VMoEConfig, check_local_path, to_pair

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------


@dataclass
class VMoEEncoderOutput(ModelOutput):
    """`routings`: the routing plans of the forward (one per router call), recorded when asked for."""

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    routings: tuple["VMoERouting", ...] | None = None


@dataclass
class VMoEModelOutput(ModelOutput):
    """
    last_hidden_state: (batch, 1 + num_patches, hidden) after the final layer norm.
    pooler_output: (batch, hidden) or (batch, 2 * hidden) for `pooling="cls_mean"`.
    hidden_states / attentions: per layer, when asked for.
    The routing fields are filled when the model trains, gets labels, or is asked for `output_router_logits`:
    router_logits: one float32 tensor per router call, (routed items, experts) (Soft MoE: (tokens, experts x slots)).
    aux_loss: the routing losses as added to `loss` (balancing, z-loss, super-class loss); None for a dense model.
    superclass_loss / superclass_accuracy: the router's super-class cross-entropy and top-1 accuracy (image
        routing with super-class labels).
    expert_counts: (router calls, experts) items each expert computed (after capacity).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None
    superclass_loss: torch.FloatTensor | None = None
    superclass_accuracy: torch.FloatTensor | None = None
    expert_counts: torch.LongTensor | None = None


@dataclass
class VMoEImageClassifierOutput(ModelOutput):
    """`loss` = classification loss + `aux_loss` (when labels are given). Other fields as in `VMoEModelOutput`."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None
    superclass_loss: torch.FloatTensor | None = None
    superclass_accuracy: torch.FloatTensor | None = None
    expert_counts: torch.LongTensor | None = None


@dataclass
class VMoESemanticSegmenterOutput(ModelOutput):
    """`logits`: (batch, num_labels, height, width) at the input resolution. `loss` = pixel cross-entropy
    (ignoring 255) + `aux_loss`. Other fields as in `VMoEModelOutput`."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None
    superclass_loss: torch.FloatTensor | None = None
    superclass_accuracy: torch.FloatTensor | None = None
    expert_counts: torch.LongTensor | None = None


@dataclass
class VMoEBackboneOutput(BackboneOutput):
    """`BackboneOutput` plus the routing fields of `VMoEModelOutput`, so a decode head can add `aux_loss`."""

    router_logits: tuple[torch.FloatTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None
    superclass_loss: torch.FloatTensor | None = None
    superclass_accuracy: torch.FloatTensor | None = None
    expert_counts: torch.LongTensor | None = None


ROUTING_FIELDS = ("router_logits", "aux_loss", "superclass_loss", "superclass_accuracy", "expert_counts")


# --------------------------------------------------------------------------------------------------------------
# Embeddings, attention, MLP (as in transformers' ViT / DINOv2)
# --------------------------------------------------------------------------------------------------------------


class VMoEPatchEmbeddings(nn.Module):
    """`(batch, channels, height, width)` pixels -> `(batch, num_patches, hidden)` patch embeddings."""

    def __init__(self, config: VMoEConfig):
        super().__init__()
        self.image_size = to_pair(config.image_size)
        self.patch_size = to_pair(config.patch_size)
        self.num_channels = config.num_channels
        self.num_patches = (self.image_size[0] // self.patch_size[0]) * (self.image_size[1] // self.patch_size[1])
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, self.patch_size, stride=self.patch_size)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        check_pixel_values(pixel_values, self.num_channels, self.image_size, self.patch_size, interpolate_pos_encoding)
        pixel_values = pixel_values.to(self.projection.weight.dtype)
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


def check_pixel_values(pixel_values, num_channels: int, image_size: tuple[int, int], patch_size: tuple[int, int],
                       interpolate_pos_encoding: bool) -> None:
    """Raise a `ValueError` naming what is wrong with `pixel_values` (type, rank, channels, dtype, size)."""
    if pixel_values is None:
        raise ValueError("pixel_values is required")
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.ndim != 4:
        raise ValueError(
            f"pixel_values must be 4D (batch, {num_channels}, height, width), got shape {tuple(pixel_values.shape)}"
        )
    batch, channels, height, width = pixel_values.shape
    if batch == 0:
        raise ValueError(f"pixel_values is an empty batch: shape {tuple(pixel_values.shape)}")
    if channels != num_channels:
        raise ValueError(
            f"pixel_values has {channels} channels but the model expects {num_channels}: "
            f"expected shape (batch, {num_channels}, height, width), got {tuple(pixel_values.shape)}"
        )
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values must be a floating-point tensor (normalised pixels), got dtype {pixel_values.dtype}; "
            "run the image processor first"
        )
    if interpolate_pos_encoding:
        if height % patch_size[0] or width % patch_size[1]:
            raise ValueError(
                f"Input image size ({height}x{width}) must be divisible by the patch size "
                f"{patch_size[0]}x{patch_size[1]}"
            )
    elif (height, width) != image_size:
        raise ValueError(
            f"Input image size ({height}x{width}) doesn't match the model ({image_size[0]}x{image_size[1]}); "
            "pass interpolate_pos_encoding=True to run at another resolution"
        )


def check_finite(pixel_values: torch.Tensor, embeddings: torch.Tensor) -> None:
    """NaN / inf pixels raise. Every pixel reaches a patch embedding (the image size is a multiple of the patch
    size), so one sum of the (smaller) embeddings finds them; only then are the pixels counted. Skipped under
    tracing / compile / export, where a data-dependent check cannot run."""
    if _static_shapes() or math.isfinite(embeddings.sum(dtype=torch.float32).item()):
        return
    bad = int((~torch.isfinite(pixel_values)).sum())
    if bad:
        raise ValueError(
            f"pixel_values contains {bad} NaN or infinite values (of {pixel_values.numel()}); "
            "the router would send such images to arbitrary experts and every output would be NaN"
        )


class VMoEEmbeddings(nn.Module):
    """Class token (unless `use_cls_token=False`) + patch embeddings + (optionally interpolated) position
    embeddings."""

    def __init__(self, config: VMoEConfig):
        super().__init__()
        self.num_prefix_tokens = 1 if config.use_cls_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if config.use_cls_token else None
        self.patch_embeddings = VMoEPatchEmbeddings(config)
        num_positions = self.patch_embeddings.num_patches + self.num_prefix_tokens
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_positions, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.image_size = self.patch_embeddings.image_size
        self.patch_size = self.patch_embeddings.patch_size

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Bicubic interpolation of the patch position embeddings to a `height x width` image (in float32)."""
        prefix = self.num_prefix_tokens
        num_patches = embeddings.shape[1] - prefix
        num_positions = self.position_embeddings.shape[1] - prefix
        grid_h, grid_w = self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]
        new_h, new_w = height // self.patch_size[0], width // self.patch_size[1]
        if not torch.jit.is_tracing() and num_patches == num_positions and (new_h, new_w) == (grid_h, grid_w):
            return self.position_embeddings
        class_pos_embed = self.position_embeddings[:, :prefix]
        patch_pos_embed = self.position_embeddings[:, prefix:]
        dim = embeddings.shape[-1]
        patch_pos_embed = patch_pos_embed.reshape(1, grid_h, grid_w, dim).permute(0, 3, 1, 2)
        patch_pos_embed = F.interpolate(
            patch_pos_embed.float(), size=(new_h, new_w), mode="bicubic", align_corners=False
        ).to(embeddings.dtype)
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed, patch_pos_embed), dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | None = False) -> torch.Tensor:
        embeddings = self.patch_embeddings(pixel_values, bool(interpolate_pos_encoding))  # checks the pixels
        check_finite(pixel_values, embeddings)
        batch_size, _, height, width = pixel_values.shape
        if self.cls_token is not None:
            cls_tokens = self.cls_token.expand(batch_size, -1, -1)
            embeddings = torch.cat((cls_tokens, embeddings), dim=1)
        if interpolate_pos_encoding:
            embeddings = embeddings + self.interpolate_pos_encoding(embeddings, height, width)
        else:
            embeddings = embeddings + self.position_embeddings
        return self.dropout(embeddings)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class VMoEAttention(nn.Module):
    """Multi-head self-attention through transformers' attention interface (sdpa by default, eager returns maps)."""

    def __init__(self, config: VMoEConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        return attn_output, attn_weights


class VMoEMLP(nn.Module):
    """The dense ViT MLP (also the shared expert, with its own width)."""

    def __init__(self, config: VMoEConfig, intermediate_size: int | None = None):
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.fc1 = nn.Linear(config.hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, config.hidden_size)
        self.activation_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class VMoELayerScale(nn.Module):
    def __init__(self, config: VMoEConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), float(config.layerscale_value)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.lambda1


class VMoEDropPath(nn.Module):
    """Stochastic depth per sample (identity outside training)."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        mask = torch.floor(keep_prob + torch.rand(shape, dtype=hidden_states.dtype, device=hidden_states.device))
        return hidden_states.div(keep_prob) * mask


# --------------------------------------------------------------------------------------------------------------
# Routing plans
# --------------------------------------------------------------------------------------------------------------


def _static_shapes() -> bool:
    """True under tracing, torch.compile and torch.export (which sets `is_compiling` too), where data-dependent
    shapes are not allowed."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _is_exporting() -> bool:
    try:
        return torch.compiler.is_exporting()
    except AttributeError:  # older torch
        return False


GROUPED_BACKENDS = ("eager", "vmoe_cpu", None)  # experts backends that take groups of rows (None: standalone)


class VMoERouting:
    """A router's decision for one call of an MoE block over hidden states `(B, S, H)`, made by a router and run by
    `VMoESparseMoeBlock`: `apply` sends the tokens (or slots) to their experts through the experts interface and
    brings the outputs back as `(B, S, H)`. A plan also computes its router call's own auxiliary loss (`aux_loss`)
    and statistics. Subclasses set `logits` (float32, before noise, for the losses); `seq_len` is set by plans that
    route whole images of `seq_len` tokens (their router can learn super-classes)."""

    logits: torch.Tensor
    seq_len: int | None = None

    def apply(self, experts: "VMoEExperts", hidden_states: torch.Tensor,
              dispatch_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The routed experts' output `(B, S, H)`. `dispatch_dtype`: V-MoE's bfloat16 dispatcher (`rounded_experts`)."""
        raise NotImplementedError

    def aux_loss(self, config: VMoEConfig) -> torch.Tensor:
        """This router call's auxiliary losses, weighted by the config's coefficients (float32 scalar): here ST-MoE's
        router z-loss, the mean squared logsumexp of the logits (`router_z_loss_coef`)."""
        if not config.router_z_loss_coef:
            return self.logits.new_zeros(())
        return config.router_z_loss_coef * torch.logsumexp(self.logits, dim=-1).pow(2).mean()

    def expert_counts(self, num_experts: int) -> torch.Tensor:
        """(E,) number of rows each expert computes."""
        raise NotImplementedError

    def assignment_mass(self, num_experts: int) -> torch.Tensor:
        """(N, E) how much of each routed item (image or token) goes to each expert, for routing analysis."""
        raise NotImplementedError


def rounded_experts(experts: "VMoEExperts", rows: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The experts interface as V-MoE's bfloat16 dispatcher computes it (`expert_dispatch_dtype`): every expert's
    input and output is rounded through `dtype`, the weighted sum over a row's experts is taken in float32.
    rows (R, H); top_k_index / top_k_weights (R, k) -> (R, H)."""
    num_rows, top_k = top_k_index.shape
    rounded = rows.to(dtype).to(rows.dtype)
    if top_k > 1:
        rounded = rounded.repeat_interleave(top_k, dim=0)  # (R * k, H): one row per assignment
    ones = torch.ones(num_rows * top_k, 1, dtype=rows.dtype, device=rows.device)
    out = experts(rounded, top_k_index.reshape(-1, 1), ones)  # (R * k, H): each assignment's unweighted output
    out = out.to(dtype).float().view(num_rows, top_k, -1)  # (R, k, H)
    return (out * top_k_weights.float().unsqueeze(-1)).sum(dim=1).to(rows.dtype)  # (R, H)


@dataclass
class TopKRouting(VMoERouting):
    """Top-k routing of N items: tokens (`seq_len` None, N = B * S) or whole images (N = B, every token of an image
    goes to the image's experts).

    logits: (N, E); top_k_index: (N, k); top_k_weights: (N, k), zero where capacity dropped the assignment;
    keep: (N, k) bool, False where capacity dropped it (None: nothing dropped); noisy_logits: (N, E) the logits
    with the router noise that chose the experts (None without noise), for the load loss."""

    logits: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor
    keep: torch.Tensor | None = None
    seq_len: int | None = None
    noisy_logits: torch.Tensor | None = None

    def apply(self, experts, hidden_states, dispatch_dtype=None):
        index, weights = self.top_k_index, self.top_k_weights
        images = self.seq_len is not None
        if images and dispatch_dtype is None and experts.config._experts_implementation in GROUPED_BACKENDS:
            return experts(hidden_states, index, weights)  # whole images: (B, S, H) with one (k,) row per image
        shape = hidden_states.shape
        rows = hidden_states.reshape(-1, shape[-1])  # (B * S, H)
        kept = None
        if images:  # every token of an image goes to the image's experts (capacity: weight zero)
            index, weights = index.repeat_interleave(shape[1], dim=0), weights.repeat_interleave(shape[1], dim=0)
        elif self.keep is not None:
            # only tokens with a kept assignment reach the experts (the residual carries the others); a dropped
            # second choice of a kept token points at its first kept expert with weight zero
            kept = self.keep.any(dim=1).nonzero().squeeze(1)
            first_kept = index.gather(1, self.keep.int().argmax(dim=1, keepdim=True))
            rows, index, weights = rows[kept], torch.where(self.keep, index, first_kept)[kept], weights[kept]
        if dispatch_dtype is None:
            out = experts(rows, index, weights)
        else:
            out = rounded_experts(experts, rows, index, weights, dispatch_dtype)
        if kept is not None:
            out = out.new_zeros(shape.numel() // shape[-1], shape[-1]).index_copy(0, kept, out)
        return out.view(shape)

    def aux_loss(self, config):
        """The z-loss (`VMoERouting.aux_loss`) and the balancing losses of each routing group, averaged over the
        groups: switch (E * sum_e f_e * P_e, f_e the share of assignments to expert e, P_e its mean probability),
        V-MoE importance (squared coefficient of variation of the per-expert probability mass) and, trained with
        noise, V-MoE load (`vmoe_load_loss`)."""
        num_experts, top_k = config.num_experts, self.top_k_index.shape[1]
        size = None if self.seq_len else config.router_group_size  # image routing: one group of the batch
        switch, importance, load = [], [], []
        for logits, noisy, index in routing_groups(size, config.router_group_remainder, self.logits,
                                                   self.noisy_logits, self.top_k_index):  # (G, n, E), (G, n, k)
            probs = logits.softmax(dim=-1)
            if config.router_aux_loss_coef:
                assigned = F.one_hot(index, num_experts).float().sum(dim=2)  # (G, n, E)
                switch.append(num_experts * (assigned.mean(dim=1) / top_k * probs.mean(dim=1)).sum(dim=-1))  # (G,)
            if config.router_importance_loss_coef:
                mass = probs.sum(dim=1)  # (G, E)
                importance.append(mass.var(dim=-1, unbiased=False) / (mass.mean(dim=-1) ** 2 + 1e-9))
            if config.router_load_loss_coef and noisy is not None:
                load.append(vmoe_load_loss(logits, noisy, top_k, config.router_noise_std))
        loss = super().aux_loss(config)
        for coef, per_group in ((config.router_aux_loss_coef, switch), (config.router_importance_loss_coef, importance),
                                (config.router_load_loss_coef, load)):
            if per_group:
                loss = loss + coef * torch.cat(per_group).mean()
        return loss

    def expert_counts(self, num_experts):
        assigned = F.one_hot(self.top_k_index, num_experts)  # (N, k, E)
        if self.keep is not None:
            assigned = assigned * self.keep.unsqueeze(-1)
        return assigned.sum(dim=(0, 1))

    def assignment_mass(self, num_experts):
        return F.one_hot(self.top_k_index, num_experts).float().sum(dim=1) / self.top_k_index.shape[1]


class OneImageRouting(TopKRouting):
    """Top-k image routing of one image, decided on the host (`VMoETopKRouter.route_one_image`): CPU inference at
    batch 1, where the plan is k numbers and each small tensor op it saves (softmax, top-k, reading the ids back)
    measured 25-45 us right after a forward pass (1-2 us in a tight loop). `experts` / `weights`: the k expert ids
    and combine weights as Python numbers; with the `vmoe_cpu` backend and no gradients they go straight to
    `VMoEExperts.infer_one_image` (what `vmoe_cpu` runs for one image), otherwise `top_k_index` / `top_k_weights`
    are made from them and the plan is a `TopKRouting`."""

    def __init__(self, logits: torch.Tensor, experts: list[int], weights: list[float], seq_len: int):
        self.logits, self.experts, self.weights, self.seq_len = logits, experts, weights, seq_len
        self.keep = self.noisy_logits = None

    @cached_property
    def top_k_index(self) -> torch.Tensor:
        return torch.tensor([self.experts], device=self.logits.device)

    @cached_property
    def top_k_weights(self) -> torch.Tensor:
        return torch.tensor([self.weights], dtype=self.logits.dtype, device=self.logits.device)

    def apply(self, experts, hidden_states, dispatch_dtype=None):
        if dispatch_dtype is None and experts.config._experts_implementation == "vmoe_cpu" and (
                not torch.is_grad_enabled()):
            return experts.infer_one_image(hidden_states, self.experts, self.weights)
        return super().apply(experts, hidden_states, dispatch_dtype)


def host_top_k(scores: list[float], top_k: int, normalize: bool, probs: list[float] | None = None
               ) -> tuple[list[int], list[float]] | None:
    """torch.topk of one item's selection scores, in Python: (expert ids, weights) in descending order of score;
    None when the k-th and (k+1)-th scores tie, where torch.topk's choice is the one to follow. `scores` are the
    logits (the weights are then their softmax), or probabilities + a selection bias with `probs` the weights."""
    order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)
    if top_k < len(scores) and scores[order[top_k - 1]] == scores[order[top_k]]:
        return None
    if probs is None:
        top = scores[order[0]]
        exps = [math.exp(value - top) for value in scores]
        total = sum(exps)
        probs = [value / total for value in exps]
    weights = [probs[e] for e in order[:top_k]]
    if normalize:
        norm = sum(weights)
        weights = [w / norm for w in weights]
    return order[:top_k], weights


@dataclass
class ExpertChoiceRouting(VMoERouting):
    """Expert-choice routing: each expert took its top-C tokens of each routing group. Balanced by construction: its
    auxiliary loss is the z-loss alone.

    logits: (N, E) for the N = B * S tokens; token_index: (R,) the token of each row, R = E * groups * C, expert-major
    (the rows of expert 0, then of expert 1, ...); expert_index / weights: (R, 1) the row's expert and combine weight
    (its softmax gate)."""

    logits: torch.Tensor
    token_index: torch.Tensor
    expert_index: torch.Tensor
    weights: torch.Tensor

    def apply(self, experts, hidden_states, dispatch_dtype=None):
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])  # (B * S, H)
        rows = tokens.index_select(0, self.token_index)  # (R, H), expert-major
        if dispatch_dtype is not None:
            out = rounded_experts(experts, rows, self.expert_index, self.weights, dispatch_dtype)
        elif experts.config._experts_implementation in GROUPED_BACKENDS and (
                experts.num_experts == self.logits.shape[-1]):  # every expert local (not sharded)
            out = experts.forward_per_expert(rows.view(experts.num_experts, -1, rows.shape[-1])).view(rows.shape)
            out = out * self.weights.to(out.dtype)
        else:
            out = experts(rows, self.expert_index, self.weights)
        return torch.zeros_like(tokens).index_add(0, self.token_index, out).view(hidden_states.shape)

    def expert_counts(self, num_experts):
        return torch.bincount(self.expert_index.view(-1), minlength=num_experts)

    def assignment_mass(self, num_experts):
        mass = self.logits.new_zeros(self.logits.shape[0], num_experts)
        return mass.index_put_((self.token_index, self.expert_index.view(-1)), torch.ones_like(self.token_index,
                               dtype=mass.dtype), accumulate=True)


@dataclass
class SoftRouting(VMoERouting):
    """Soft MoE: each of the E x P slots of an image is a softmax-weighted mix of its tokens (`dispatch_weights`,
    softmax over tokens), every token a softmax-weighted mix of the slot outputs (`combine_weights`, softmax over
    slots). logits / dispatch_weights / combine_weights: (B, S, E * P).

    The slots reach the experts expert-major (all slots of expert 0 over the batch, then of expert 1, ...), so the
    `eager` experts run one batched matmul per projection. With V-MoE's bfloat16 dispatcher (vmoe's Soft MoE:
    `Bfloat16Dispatcher` around an einsum dispatcher) the tokens are rounded through `dispatch_dtype` before they
    are mixed into slots, the slot outputs before they are mixed back; the mixing itself is then float32."""

    logits: torch.Tensor
    dispatch_weights: torch.Tensor
    combine_weights: torch.Tensor
    num_slots: int

    def apply(self, experts, hidden_states, dispatch_dtype=None):
        batch, _, hidden = hidden_states.shape
        tokens, dispatch, combine = hidden_states, self.dispatch_weights, self.combine_weights
        if dispatch_dtype is None:
            dispatch, combine = dispatch.to(tokens.dtype), combine.to(tokens.dtype)
        else:
            tokens, dispatch, combine = tokens.to(dispatch_dtype).float(), dispatch.float(), combine.float()
        slots = torch.einsum("bsn,bsh->nbh", dispatch, tokens)  # (E * P, B, H): slot-major, so expert-major
        num_slots_total = slots.shape[0]
        num_experts = num_slots_total // self.num_slots  # all of them (under expert parallelism too)
        rows = slots.to(hidden_states.dtype).reshape(num_experts, -1, hidden)  # (E, P * B, H): each expert's slots
        if experts.config._experts_implementation in GROUPED_BACKENDS and experts.num_experts == num_experts:
            out = experts.forward_per_expert(rows)
        else:  # through the experts interface, one row per slot
            expert_ids = torch.arange(num_experts, device=slots.device).repeat_interleave(rows.shape[1]).unsqueeze(1)
            ones = torch.ones(expert_ids.shape, dtype=hidden_states.dtype, device=slots.device)
            out = experts(rows.reshape(-1, hidden), expert_ids, ones)
        if dispatch_dtype is not None:
            out = out.to(dispatch_dtype).float()
        out = out.view(num_slots_total, batch, hidden)
        return torch.einsum("bsn,nbh->bsh", combine, out).to(hidden_states.dtype)

    def aux_loss(self, config):
        return self.logits.new_zeros(())  # vmoe's Soft MoE has no auxiliary loss

    def expert_counts(self, num_experts):
        batch = self.logits.shape[0]
        return torch.full((num_experts,), batch * self.num_slots, dtype=torch.long, device=self.logits.device)

    def assignment_mass(self, num_experts):
        batch, seq, _ = self.dispatch_weights.shape
        return self.dispatch_weights.view(batch, seq, num_experts, -1).sum(dim=-1).reshape(batch * seq, num_experts)


# --------------------------------------------------------------------------------------------------------------
# Routers: hidden states in, (router_logits, plan) out
# --------------------------------------------------------------------------------------------------------------


def expert_capacity(num_items: int, factor: float, num_experts: int, multiple_of: int | None) -> int:
    """ceil(num_items * factor / num_experts), at least 1, rounded up to `multiple_of` (V-MoE's `compute_capacity`)."""
    capacity = max(1, math.ceil(num_items * factor / num_experts))
    if multiple_of:
        capacity += (-capacity) % multiple_of
    return capacity


def group_padding(config: VMoEConfig, batch_size: int, tokens_per_image: int, record: bool = False) -> int:
    """Images of padding for `router_group_remainder="pad"` at inference: the fewest all-zero images that make the
    batch's tokens fill whole routing groups (0 when they do, and when the router says routing groups cannot change
    its outputs: `VMoERouter.groups_matter`)."""
    size = config.router_group_size
    if size is None or config.router_group_remainder != "pad" or not config.is_moe:
        return 0
    if not ROUTER_CLASSES[config.router_type].groups_matter(config, record):
        return 0
    if (batch_size * tokens_per_image) % size == 0:
        return 0
    return -batch_size % (size // math.gcd(size, tokens_per_image))  # whole groups every size / gcd(size, t) images


def routing_groups(group_size: int | None, remainder: str, *tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """`(N, ...)` tensors -> their routing groups, in parts: the G full groups of `group_size` consecutive rows (batch
    order), each tensor as `(G, n, ...)`, and, when `remainder="partial"` leaves r > 0 rows, a last group `(1, r, ...)`
    with its own capacity (a None tensor stays None). None: one group of every row."""
    num_items = tensors[0].shape[0]
    size = group_size or num_items
    full, rest = num_items // size, num_items % size  # not divmod: symbolic sizes under torch.export lack it
    if rest and remainder != "partial":
        hint = (" (router_group_remainder='pad' pads at inference only; a training batch must fill whole groups)"
                if remainder == "pad" else " (or set router_group_remainder='partial' or 'pad')")
        raise ValueError(
            f"router_group_size={size} must divide the number of routed tokens of the batch, got {num_items}{hint}"
        )
    bounds = [(0, full, size)] if full else []  # (first row, groups, rows per group) of each part
    if rest:
        bounds.append((full * size, 1, rest))
    parts = []
    for start, groups, length in bounds:
        part = []
        for tensor in tensors:
            part.append(None if tensor is None else tensor[start: start + groups * length].view(
                groups, length, *tensor.shape[1:]))
        parts.append(tuple(part))
    return parts


def capacity_keep_mask(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, factor: float, config: VMoEConfig
                       ) -> torch.Tensor | None:
    """Which (item, slot) assignments fit in their expert's buffer in their routing group, the buffers holding
    `expert_capacity` rows (capacity `factor`), as V-MoE dispatches: top_k_index / top_k_weights (N, k) -> (N, k)
    bool, None when nothing is dropped. All first choices of a group are served before any second choice; within a
    slot, items are served in order or, with batch-priority routing, by decreasing top-1 router weight."""
    keeps, dropped = [], False
    for index, weights in routing_groups(config.router_group_size, config.router_group_remainder, top_k_index,
                                         top_k_weights):  # (G, n, k) each
        groups, num_items, top_k = index.shape
        capacity = expert_capacity(num_items * top_k, factor, config.num_experts, config.capacity_multiple_of)
        if capacity >= num_items:  # every expert can take every item of its group: nothing dropped
            keeps.append(torch.ones(groups * num_items, top_k, dtype=torch.bool, device=index.device))
            continue
        if config.batch_priority_routing:
            order = torch.argsort(weights[..., 0], dim=1, descending=True, stable=True)  # (G, n)
        else:
            order = torch.arange(num_items, device=index.device).expand(groups, num_items)
        order = order.unsqueeze(-1).expand(-1, -1, top_k)  # (G, n, k)
        ordered = index.gather(1, order).transpose(1, 2).reshape(groups, -1)  # (G, k * n), slot-major
        one_hot = F.one_hot(ordered, config.num_experts)  # (G, k * n, E)
        position = (one_hot.cumsum(dim=1) * one_hot).sum(dim=-1) - 1  # position of each assignment in its buffer
        keep_ordered = (position < capacity).view(groups, top_k, num_items).transpose(1, 2)  # (G, n, k)
        keeps.append(torch.empty_like(keep_ordered).scatter_(1, order, keep_ordered).reshape(-1, top_k))
        dropped = True
    return (keeps[0] if len(keeps) == 1 else torch.cat(keeps)) if dropped else None


class VMoERouter(nn.Module):
    """Base router: a bias-free linear layer kept in float32 (`weight`: (outputs, hidden)). A subclass implements
    `forward(hidden_states (B, S, H), superclass_labels=None) -> (router_logits, VMoERouting)`."""

    def __init__(self, config: VMoEConfig, num_outputs: int | None = None):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.weight = nn.Parameter(torch.zeros(num_outputs or config.num_experts, config.hidden_size,
                                               dtype=torch.float32))

    # What FLOP / parameter counting and group padding ask of a router type (class methods: no instance needed).
    # The defaults describe a router that sends each token to k experts through one linear layer.

    @classmethod
    def groups_matter(cls, config: VMoEConfig, record: bool) -> bool:
        """Whether routing groups can change the outputs at inference (`record`: routing losses are computed), so
        that `router_group_remainder="pad"` pads a batch to whole groups."""
        return True

    @classmethod
    def expert_rows(cls, config: VMoEConfig, tokens_per_image: int, images: int) -> float:
        """Rows the experts compute per image and MoE block at inference, in a batch of `images` images."""
        return config.num_experts_per_tok * tokens_per_image

    @classmethod
    def router_flops(cls, config: VMoEConfig, tokens_per_image: int) -> dict[str, int]:
        """FLOPs per image of one router call, by `flop_breakdown` component: the logits of every token, or of one
        vector per image (image routing; the mean of the patch tokens is a matmul over the tokens)."""
        h, e = config.hidden_size, config.num_experts
        if config.routing_level == "image":
            return {"router": 2 * h * e + (2 * tokens_per_image * h if config.router_input == "mean" else 0)}
        return {"router": 2 * tokens_per_image * h * e}

    @classmethod
    def active_experts(cls, config: VMoEConfig) -> int:
        """Experts that compute part of every image (for the active parameter count)."""
        return config.num_experts_per_tok

    @classmethod
    def num_parameters(cls, config: VMoEConfig) -> int:
        return config.num_experts * config.hidden_size


class VMoETopKRouter(VMoERouter):
    """Top-k routing (V-MoE, Mobile V-MoE): softmax over experts, each item takes its k best; capacity with
    batch-priority routing per routing group; with `train_routing="superclass"`, a training image's first expert is
    its label's super-class. Image routing reads one pooled vector per image (`router_input`).

    With `router_bias_update_rate > 0` (loss-free balancing) the buffer `e_score_correction_bias` (E,) is added to
    the probabilities to select experts, not to the combine weights; training forwards record each expert's load
    (`record_load`) and `update_router_biases` moves the bias after each optimizer step."""

    def __init__(self, config: VMoEConfig):
        super().__init__(config)
        self.top_k = config.num_experts_per_tok
        self.image_level = config.routing_level == "image"
        self.num_prefix_tokens = 1 if config.use_cls_token else 0
        self._mean_weights = None  # `mean_patch_token`
        bias = torch.zeros(config.num_experts, dtype=torch.float32) if config.router_bias_update_rate else None
        self.register_buffer("e_score_correction_bias", bias)  # None (no buffer) without loss-free balancing
        self.load = None  # (E,) items routed to each expert by the training forwards since the last bias update
        self.forwards_since_update = 0

    def forward(self, hidden_states: torch.Tensor, superclass_labels: torch.Tensor | None = None):
        if self.image_level:  # (B, H)
            items = hidden_states[:, 0] if self.config.router_input == "cls" else self.mean_patch_token(hidden_states)
        else:  # (B * S, H)
            items = hidden_states.reshape(-1, hidden_states.shape[-1])
        with torch.autocast(items.device.type, enabled=False):  # float32 logits, also under autocast
            logits = F.linear(items.float(), self.weight.float())  # (N, E)
        seq_len = hidden_states.shape[1] if self.image_level else None
        # static shapes first: testing the batch size under export would specialise the batch dimension
        if self.image_level and not (self.training or _static_shapes() or torch.is_grad_enabled()) and (
                logits.shape[0] == 1):
            plan = self.route_one_image(logits, seq_len)
            if plan is not None:
                return logits, plan
        noise_std = self.config.router_noise_std if self.training else 0.0
        noisy = logits + torch.randn_like(logits) * noise_std if noise_std > 0 else logits
        probs = noisy.softmax(dim=-1)
        if self.training and self.config.train_routing == "superclass" and superclass_labels is not None:
            top_k_index = self.superclass_experts(logits, superclass_labels)
            top_k_weights = probs.gather(1, top_k_index)
        elif self.e_score_correction_bias is None:
            top_k_weights, top_k_index = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        else:  # loss-free balancing: the bias chooses the experts, the unbiased probabilities weight them
            top_k_index = torch.topk(probs + self.e_score_correction_bias, self.top_k, dim=-1).indices
            top_k_weights = probs.gather(1, top_k_index)
        if self.config.normalize_router_weights:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        factor = self.config.capacity_factor if self.training else self.config.eval_capacity_factor
        keep = None if factor is None else capacity_keep_mask(top_k_index, top_k_weights, factor, self.config)
        if keep is not None:
            top_k_weights = top_k_weights * keep
        return logits, TopKRouting(logits, top_k_index, top_k_weights, keep, seq_len,
                                   noisy if noisy is not logits else None)

    @classmethod
    def groups_matter(cls, config, record):
        return config.eval_capacity_factor is not None or record  # dropless top-k without losses: per item

    def route_one_image(self, logits: torch.Tensor, seq_len: int) -> OneImageRouting | None:
        """Inference on one image on a CPU (the caller checks eval mode, no gradients, batch 1): the top-k of its
        (1, E) logits taken on the host (`OneImageRouting`); None on another device, and at a tie that torch.topk
        must break."""
        if logits.device.type != "cpu":
            return None
        if self.e_score_correction_bias is None:
            plan = host_top_k(logits.tolist()[0], self.top_k, self.config.normalize_router_weights)
        else:  # rank the float32 scores `select` ranks, weight by the unbiased probabilities
            probs = logits.softmax(dim=-1)
            scores = (probs + self.e_score_correction_bias).tolist()[0]
            plan = host_top_k(scores, self.top_k, self.config.normalize_router_weights, probs.tolist()[0])
        return None if plan is None else OneImageRouting(logits, *plan, seq_len)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        bias = self.e_score_correction_bias
        if bias is not None and bias.dtype != torch.float32:  # model.to(bfloat16): steps of 1e-3 would round away
            self.e_score_correction_bias = bias.float()
        return self

    def record_load(self, counts: torch.Tensor) -> None:
        """Add one training forward's expert counts (E,) to the load that the next bias update balances."""
        counts = counts.detach().float()
        self.load = counts if self.load is None else self.load + counts
        self.forwards_since_update += 1
        if self.forwards_since_update == 1000:
            logger.warning_once(
                "router_bias_update_rate=%s but the router bias was not updated in 1000 training forwards: call "
                "hf_vmoe.update_router_biases(model) after each optimizer step (RouterBiasUpdateCallback does it "
                "in the Trainer)", self.config.router_bias_update_rate)

    def mean_patch_token(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, S, H) -> (B, H), the mean of the patch tokens, as a product with averaging weights (S,) kept per
        length: `mean` up to rounding, and at batch 1 on a CPU right after a forward pass 58 us instead of 104 us
        (the model's matmul code is warm, the reduction's is not). Plain `mean` under tracing / compile / export."""
        if _static_shapes():
            return hidden_states[:, self.num_prefix_tokens:].mean(dim=1)
        seq_len = hidden_states.shape[1]
        weights = self._mean_weights
        if weights is None or weights.shape[0] != seq_len or weights.dtype != hidden_states.dtype or (
                weights.device != hidden_states.device):
            with torch.inference_mode(False):  # a normal tensor: autograd may save it after an inference pass
                weights = torch.full((seq_len,), 1 / (seq_len - self.num_prefix_tokens), dtype=hidden_states.dtype,
                                     device=hidden_states.device)
                weights[: self.num_prefix_tokens] = 0
            self._mean_weights = weights
        return torch.matmul(weights, hidden_states)

    def superclass_experts(self, logits: torch.Tensor, superclass_labels: torch.Tensor) -> torch.Tensor:
        """Super-class forcing in training (N, k): slot 0 is the label's super-class, the other slots the router's
        best other experts."""
        forced = superclass_labels.view(-1, 1)
        if self.top_k > 1:
            with torch.no_grad():
                others = logits.scatter(1, forced, float("-inf")).topk(self.top_k - 1, dim=-1).indices
            forced = torch.cat([forced, others], dim=1)
        return forced


class VMoEExpertChoiceRouter(VMoERouter):
    """Expert-choice routing (Zhou et al. 2022; vmoe's `NoisyTopItemsPerExpertRouter`): each expert takes the C
    tokens of a routing group with the highest softmax gate for it, C = ceil(n * factor / E). Balanced by
    construction; a token may get no expert (the residual carries it) or several. Tokens compete within a group:
    without `router_group_size`, a group is the batch in training and one image at inference, so inference is
    batch-invariant; with it, groups of that many tokens in both."""

    @classmethod
    def expert_rows(cls, config, tokens_per_image, images):
        """Each expert's capacity in every routing group (one image at inference without `router_group_size`)."""
        tokens = images * tokens_per_image
        group = config.router_group_size or tokens_per_image
        full, rest = divmod(tokens, group)
        parts = [(full, group)] + ([(1, rest)] if rest and config.router_group_remainder == "partial" else [])
        rows = sum(count * min(size, expert_capacity(size, config.capacity_factor or 1.0, config.num_experts,
                                                     config.capacity_multiple_of)) for count, size in parts)
        return config.num_experts * rows / images

    @classmethod
    def active_experts(cls, config):
        return config.num_experts  # every expert takes tokens of every group

    def forward(self, hidden_states: torch.Tensor, superclass_labels: torch.Tensor | None = None):
        items = hidden_states.reshape(-1, hidden_states.shape[-1])  # (N, H)
        with torch.autocast(items.device.type, enabled=False):  # float32 logits, also under autocast
            logits = F.linear(items.float(), self.weight.float())  # (N, E)
        noise_std = self.config.router_noise_std if self.training else 0.0
        gates = (logits + torch.randn_like(logits) * noise_std if noise_std > 0 else logits).softmax(dim=-1)
        num_items, num_experts = gates.shape
        factor = self.config.capacity_factor if self.training else self.config.eval_capacity_factor
        factor = factor or self.config.capacity_factor or 1.0
        group_size = self.config.router_group_size
        if group_size is None and not self.training:
            group_size = hidden_states.shape[1]  # each image alone
        token_parts, weight_parts, start = [], [], 0
        for (part,) in routing_groups(group_size, self.config.router_group_remainder, gates):  # (g, n, E)
            groups, group_size, _ = part.shape
            capacity = min(group_size, expert_capacity(group_size, factor, num_experts, self.config.capacity_multiple_of))
            top_gates, top_items = part.transpose(1, 2).topk(capacity, dim=-1)  # (g, E, C)
            offsets = start + torch.arange(groups, device=items.device).view(groups, 1, 1) * group_size
            token_parts.append((top_items + offsets).transpose(0, 1).reshape(num_experts, -1))  # (E, g * C)
            weight_parts.append(top_gates.transpose(0, 1).reshape(num_experts, -1))
            start += groups * group_size
        token_index = token_parts[0] if len(token_parts) == 1 else torch.cat(token_parts, dim=1)
        weights = weight_parts[0] if len(weight_parts) == 1 else torch.cat(weight_parts, dim=1)
        rows_per_expert = token_index.shape[1]
        token_index, weights = token_index.reshape(-1), weights.reshape(-1, 1)  # (E * rows,), expert-major
        expert_index = torch.arange(num_experts, device=items.device).repeat_interleave(rows_per_expert)
        return logits, ExpertChoiceRouting(logits, token_index, expert_index.unsqueeze(1), weights)


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) along `dim` (vmoe's Soft MoE `normalize`; eps inside the root, unlike
    `F.normalize`)."""
    return x * torch.rsqrt(x.pow(2).sum(dim=dim, keepdim=True) + eps)


class VMoESoftRouter(VMoERouter):
    """Soft MoE (Puigcerver et al. 2023) as vmoe's `SoftRouter` computes it: E x P slots per image, `num_slots` = P
    per expert. The logits are cosine similarities times a learned scalar: tokens and slot parameters (`weight`,
    (E * P, H), vmoe's `mu`) are L2-normalised, and the slots multiplied by `scale` (vmoe's `scale`, initialised to
    1). Router noise (`router_noise_std`, training only) is added to the logits unscaled, as vmoe does. Fully
    differentiable, no token dropped, no balancing loss; an image's output depends only on its own tokens."""

    def __init__(self, config: VMoEConfig):
        super().__init__(config, num_outputs=config.num_experts * config.num_slots)
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float32))

    @classmethod
    def groups_matter(cls, config, record):
        return False  # an image's slots mix its own tokens only

    @classmethod
    def expert_rows(cls, config, tokens_per_image, images):
        return config.num_experts * config.num_slots  # one row per slot

    @classmethod
    def router_flops(cls, config, tokens_per_image):
        slots = config.num_experts * config.num_slots
        return {"router": 2 * tokens_per_image * config.hidden_size * slots,  # the (t x H) by (H x E * P) logits
                "soft_dispatch_combine": 2 * 2 * tokens_per_image * slots * config.hidden_size}

    @classmethod
    def active_experts(cls, config):
        return config.num_experts  # every expert computes slots of every image

    @classmethod
    def num_parameters(cls, config):
        return config.num_experts * config.num_slots * config.hidden_size + 1  # mu and the scale

    def forward(self, hidden_states: torch.Tensor, superclass_labels: torch.Tensor | None = None):
        with torch.autocast(hidden_states.device.type, enabled=False):  # float32 logits, also under autocast
            logits = self.slot_logits(hidden_states)
        noise_std = self.config.router_noise_std if self.training else 0.0
        noisy = logits + torch.randn_like(logits) * noise_std if noise_std > 0 else logits
        plan = SoftRouting(logits, noisy.softmax(dim=1), noisy.softmax(dim=2), self.config.num_slots)
        return logits.reshape(-1, logits.shape[-1]), plan

    def slot_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, S, H) -> (B, S, E * P) float32: unit tokens against unit slots times `scale`."""
        slots = l2_normalize(self.weight.float()) * self.scale.float()  # (E * P, H)
        return F.linear(l2_normalize(hidden_states.float()), slots)


ROUTER_CLASSES = {"top_k": VMoETopKRouter, "expert_choice": VMoEExpertChoiceRouter, "soft": VMoESoftRouter}


def register_router(name: str, router_class: type[VMoERouter], routing_levels: tuple[str, ...] = ("token",)) -> None:
    """Make `VMoEConfig(router_type=name)` build `router_class` in every MoE block, from user code: a `VMoERouter`
    subclass whose `forward(hidden_states (B, S, H), superclass_labels=None)` returns `(router_logits, plan)`, the
    plan a `VMoERouting` (its `aux_loss` is the router's own losses). `routing_levels`: the `routing_level` values
    it supports. A saved model with this router loads where the same registration has run (remote code carries only
    the built-in routers)."""
    if name in ("top_k", "expert_choice", "soft"):
        raise ValueError(f"router_type {name!r} is built in: register the router under another name")
    if not (isinstance(router_class, type) and issubclass(router_class, VMoERouter)):
        raise TypeError(f"router_class must be a VMoERouter subclass, got {router_class!r}")
    bad = [level for level in routing_levels if level not in ("image", "token")]
    if bad or not routing_levels:
        raise ValueError(f"routing_levels must be a non-empty subset of ('image', 'token'), got {routing_levels!r}")
    ROUTER_CLASSES[name] = router_class
    ROUTER_LEVELS[name] = tuple(routing_levels)


def _build_router(config: VMoEConfig) -> VMoERouter:
    """The router `config.router_type` names; loss-free balancing needs a top-k router (or a subclass)."""
    router_class = ROUTER_CLASSES[config.router_type]
    if config.router_bias_update_rate and not issubclass(router_class, VMoETopKRouter):
        raise ValueError(f"router_bias_update_rate={config.router_bias_update_rate} balances top-k routers; "
                         f"router_type={config.router_type!r} ({router_class.__name__}) is not one: set it to 0")
    return router_class(config)


@torch.no_grad()
def update_router_biases(model: nn.Module) -> bool:
    """Loss-free balancing (Wang et al. 2024): after an optimizer step, move every balancing router's selection
    bias by `router_bias_update_rate * sign(mean load - load)`, with the loads its training forwards recorded since
    the last update (all gradient-accumulation micro-batches; summed over processes when torch.distributed is
    initialised, so every rank holds the same bias), then reset the loads. Returns True if a bias moved.
    `RouterBiasUpdateCallback` calls it in the Trainer; a custom loop calls it after `optimizer.step()`."""
    routers = [m for m in model.modules() if isinstance(m, VMoETopKRouter) and m.e_score_correction_bias is not None]
    if not routers:
        return False
    device = routers[0].e_score_correction_bias.device
    loads = torch.stack([(r.load if r.load is not None else torch.zeros_like(r.e_score_correction_bias)).to(device)
                         for r in routers])  # (routers, E)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(loads)
    moved = False
    for router, load in zip(routers, loads):
        router.load, router.forwards_since_update = None, 0
        if load.sum() > 0:
            rate = router.config.router_bias_update_rate
            bias = router.e_score_correction_bias
            bias.add_(rate * torch.sign(load.mean() - load).to(bias))
            moved = True
    return moved


def _record_router_loads(encoder: nn.Module, expert_counts: torch.Tensor) -> None:
    """Give each balancing router its share of a training forward's `expert_counts` (routers, E): one row per router
    call, in forward order (the encoder's shared router, or each MoE block's own)."""
    routers = [encoder.router] if encoder.router is not None else [
        layer.mlp.router for layer in encoder.layer if layer.is_moe]
    for router, counts in zip(routers, expert_counts):
        if router.e_score_correction_bias is not None:
            router.record_load(counts)


def vmoe_load_loss(logits: torch.Tensor, noisy_logits: torch.Tensor, top_k: int, noise_std: float) -> torch.Tensor:
    """V-MoE's load loss per routing group: logits / noisy_logits (G, n, E) -> (G,).

    An item's threshold is its k-th largest noisy logit; P = 1 - Phi((threshold - logit) / noise_std) is the
    probability that expert e would still be among its k best under fresh noise; the loss is the squared
    coefficient of variation (population std / mean) over experts of the mean of P over the group's items."""
    threshold = noisy_logits.topk(top_k, dim=-1).values[..., -1:]  # (G, n, 1)
    chosen = 1.0 - torch.special.ndtr((threshold - logits) / noise_std)  # (G, n, E)
    mean = chosen.mean(dim=1)  # (G, E)
    return (mean.std(dim=-1, unbiased=False) / mean.mean(dim=-1)) ** 2


def vmoe_routing_loss(
    routings: tuple[VMoERouting, ...], config: VMoEConfig, superclass_labels: torch.Tensor | None = None
) -> dict:
    """The aux loss and routing statistics of one forward's plans (float32): each router call's own losses
    (`VMoERouting.aux_loss`), combined over router calls by `router_aux_loss_layer_reduction` (mean or sum), plus the
    super-class cross-entropy of image routers given super-class labels.

    Returns the `ROUTING_FIELDS` of the model outputs except `router_logits`."""
    total, counts, ce, acc = [], [], [], []
    for plan in routings:
        total.append(plan.aux_loss(config))
        counts.append(plan.expert_counts(config.num_experts))
        if superclass_labels is not None and plan.seq_len is not None:
            ce.append(F.cross_entropy(plan.logits, superclass_labels))
            acc.append((plan.logits.argmax(-1) == superclass_labels).float().mean())
    total = torch.stack(total)
    aux_loss = total.sum() if config.router_aux_loss_layer_reduction == "sum" else total.mean()
    stats = {"superclass_loss": None, "superclass_accuracy": None}
    if ce:
        stats["superclass_loss"] = torch.stack(ce).mean()
        stats["superclass_accuracy"] = torch.stack(acc).mean()
        aux_loss = aux_loss + config.superclass_loss_coef * stats["superclass_loss"]
    stats["aux_loss"] = aux_loss
    stats["expert_counts"] = torch.stack(counts)
    return stats


# --------------------------------------------------------------------------------------------------------------
# Experts and the MoE block
# --------------------------------------------------------------------------------------------------------------


@use_experts_implementation(has_gate=False, has_bias=True)
class VMoEExperts(nn.Module):
    """Collection of E GELU MLP experts stored as stacked tensors (E, out, in), run through transformers' experts
    interface: `eager` (the loop below), `vmoe_cpu` (the default on CPU: `eager` plus two inference fast paths,
    `vmoe_cpu_experts_forward`), transformers' `batched_mm` and `grouped_mm`.

    The inputs are rows `(R, H)` with their assignments `(R, k)`, or, for `eager` and `vmoe_cpu`
    (`GROUPED_BACKENDS`), groups of rows that share their assignments, `(G, n, H)` with `(G, k)`: whole images (image
    routing). Expert choice and Soft MoE, which give every expert the same number of rows, call
    `forward_per_expert` with those backends."""

    def __init__(self, config: VMoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.up_proj = nn.Parameter(torch.empty(self.num_experts, self.intermediate_dim, self.hidden_dim))
        self.up_proj_bias = nn.Parameter(torch.zeros(self.num_experts, self.intermediate_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.down_proj_bias = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))
        self.act_fn = ACT2FN[config.hidden_act]
        self._views, self._views_key = None, None  # `inference_views`

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """The `eager` backend. hidden_states (R, H) and top_k_index / top_k_weights (R, k); or groups of rows
        (G, n, H) with (G, k).

        Assignments are sorted by expert once; each expert runs one matmul pair on exactly its rows and adds its
        weighted output in ascending expert order (a fixed sum order). One host sync (the per-expert counts). When
        one expert takes every row, it runs on the input as is. Groups under tracing / torch.compile / torch.export
        (static shapes), and one group on an accelerator, gather each group's expert weights instead; token rows under torch.compile
        (no data-dependent loops) go to transformers' `grouped_mm` path, which computes the same."""
        shape = hidden_states.shape
        if hidden_states.ndim == 3:  # groups: one row per token, with its group's assignments
            # static shapes first: testing the batch size under export would specialise the batch dimension; one
            # image on an accelerator gathers its experts' weights too, so nothing waits for the device
            if _static_shapes() or (hidden_states.device.type != "cpu" and shape[0] == 1):
                return self._forward_gathered(hidden_states, top_k_index, top_k_weights)
            hidden_states = hidden_states.reshape(-1, shape[-1])  # (B * S, H)
            top_k_index = top_k_index.repeat_interleave(shape[1], dim=0)  # (B * S, k)
            top_k_weights = top_k_weights.repeat_interleave(shape[1], dim=0)
        if torch.compiler.is_compiling() and not _is_exporting():
            return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights).view(shape)
        num_rows, top_k = top_k_index.shape
        if num_rows == 0:
            return torch.zeros(shape, dtype=hidden_states.dtype, device=hidden_states.device)
        weights = top_k_weights.to(hidden_states.dtype)
        with torch.no_grad():
            flat_index = top_k_index.reshape(-1)  # (R * k,)
            # the one host sync; under expert parallelism, ids >= num_experts (other ranks' experts) sort last
            counts = torch.bincount(flat_index, minlength=self.num_experts).tolist()[: self.num_experts]
        if top_k == 1 and max(counts) == num_rows:  # one expert for every row: no gather, no scatter
            expert_idx = counts.index(num_rows)
            hidden = self.act_fn(F.linear(hidden_states, self.up_proj[expert_idx], self.up_proj_bias[expert_idx]))
            out = F.linear(hidden, self.down_proj[expert_idx], self.down_proj_bias[expert_idx]) * weights
            return out.view(shape)
        with torch.no_grad():
            order = torch.argsort(flat_index, stable=True)  # assignments grouped by expert, row order inside
            row_of = order // top_k
        sorted_weights = weights.reshape(-1)[order, None]  # (R * k, 1)
        # k = 1 with every row local: each row gets exactly one assignment, so rows are written, not accumulated
        written = top_k == 1 and sum(counts) == num_rows
        out = hidden_states.new_empty(hidden_states.shape) if written else torch.zeros_like(hidden_states)
        # the stacks unbound once: a loop over experts then builds one gradient buffer per parameter in backward,
        # not one full (E, ...) buffer per expert
        up, up_bias = self.up_proj.unbind(0), self.up_proj_bias.unbind(0)
        down, down_bias = self.down_proj.unbind(0), self.down_proj_bias.unbind(0)
        start = 0
        for expert_idx, count in enumerate(counts):
            if not count:
                continue
            end = start + count
            rows = row_of[start:end]
            hidden = self.act_fn(F.linear(hidden_states.index_select(0, rows), up[expert_idx], up_bias[expert_idx]))
            current = F.linear(hidden, down[expert_idx], down_bias[expert_idx]) * sorted_weights[start:end]
            if written:
                out.index_copy_(0, rows, current)
            else:
                out.index_add_(0, rows, current)
            start = end
        return out.view(shape)

    def forward_per_expert(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Every expert on its own rows, the same number for each: (E, n, H) -> (E, n, H), one batched matmul per
        projection, static shapes (expert choice and Soft MoE with the `eager` and `vmoe_cpu` backends)."""
        hidden = self.act_fn(torch.baddbmm(self.up_proj_bias.unsqueeze(1), hidden_states, self.up_proj.transpose(1, 2)))
        return torch.baddbmm(self.down_proj_bias.unsqueeze(1), hidden, self.down_proj.transpose(1, 2))

    def infer_one_image(self, hidden_states: torch.Tensor, experts: list[int], weights: list[float]) -> torch.Tensor:
        """One image (1, S, H) through its experts at inference, on a CPU: two `addmm` per expert on its cached
        weight views, the combine weight folded into the second (w * bias + w * (h @ down^T)); no sort, gather or
        scatter. `experts` / `weights`: the image's k expert ids and combine weights as Python numbers. Outputs are
        summed in ascending expert order, as in `forward`."""
        rows = hidden_states.reshape(-1, self.hidden_dim)  # (S, H)
        views = self.inference_views()
        out = None
        for expert_idx, slot in sorted(zip(experts, range(len(experts)))):
            up_t, up_bias, down_t, down_bias = views[expert_idx]  # (H, I), (I,), (I, H), (H,)
            weight = weights[slot]
            current = torch.addmm(down_bias, self.act_fn(torch.addmm(up_bias, rows, up_t)), down_t,
                                  beta=weight, alpha=weight)  # (S, H)
            out = current if out is None else out.add_(current)
        return out.view(hidden_states.shape)

    def infer_padded(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                     counts: list[int]) -> torch.Tensor:
        """Rows (R, H) with their assignments (R, k) at inference, in V-MoE's layout: every expert's rows in one
        (E, C, H) buffer, C the largest expert's count (so nothing is dropped), each projection one batched matmul
        over the experts. With few rows per expert, E small matmuls split poorly over the cores; one batched matmul
        splits over the experts. `counts`: the assignments per expert. Outputs are summed in ascending expert order,
        as in `forward`."""
        num_experts, capacity = self.num_experts, max(counts)
        flat_index = top_k_index.reshape(-1).long()  # (R * k,)
        order = torch.argsort(flat_index, stable=True)  # assignments grouped by expert, row order inside
        expert_of, row_of = flat_index[order], order // top_k_index.shape[1]
        starts = torch.tensor([0, *itertools.accumulate(counts)][:-1], device=flat_index.device)  # (E,)
        slot = expert_of * capacity + torch.arange(len(order), device=order.device) - starts[expert_of]  # buffer row
        buffer = hidden_states.new_zeros(num_experts * capacity, self.hidden_dim)
        buffer.index_copy_(0, slot, hidden_states.index_select(0, row_of))
        hidden = self.act_fn(torch.baddbmm(self.up_proj_bias.unsqueeze(1), buffer.view(num_experts, capacity, -1),
                                           self.up_proj.transpose(1, 2)))  # (E, C, I)
        out = torch.baddbmm(self.down_proj_bias.unsqueeze(1), hidden, self.down_proj.transpose(1, 2))  # (E, C, H)
        current = out.view(-1, self.hidden_dim).index_select(0, slot) * top_k_weights.reshape(-1)[order, None].to(
            hidden_states.dtype)  # (R * k, H), in expert order
        return torch.zeros_like(hidden_states).index_add_(0, row_of, current)

    def inference_views(self) -> list[tuple[torch.Tensor, ...]]:
        """Per expert, detached views `(up^T, up_bias, down^T, down_bias)` of the stacked weights, for inference
        on one image. Made once per weight storage: in-place updates (an optimiser step, `load_state_dict`) show
        through them, a replaced or converted parameter makes new ones."""
        params = (self.up_proj, self.up_proj_bias, self.down_proj, self.down_proj_bias)
        key = tuple(p.data_ptr() for p in params)
        if self._views_key != key:
            up, up_bias, down, down_bias = (p.detach().unbind(0) for p in params)
            self._views = [(u.t(), ub, d.t(), db) for u, ub, d, db in zip(up, up_bias, down, down_bias)]
            self._views_key = key
        return self._views

    def _apply(self, fn, recurse=True):
        self._views, self._views_key = None, None  # views of the old storage would keep it alive
        return super()._apply(fn, recurse)

    def _forward_gathered(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
        """Static shapes: one `baddbmm` pair per slot on each group's gathered expert weights (G, n, H) -> (G, n, H)."""
        weights = top_k_weights.to(hidden_states.dtype)
        out = None
        for slot in range(top_k_index.shape[1]):
            idx = top_k_index[:, slot]  # (G,)
            h = torch.baddbmm(self.up_proj_bias[idx].unsqueeze(1), hidden_states, self.up_proj[idx].transpose(1, 2))
            down, down_bias = self.down_proj[idx].transpose(1, 2), self.down_proj_bias[idx].unsqueeze(1)
            h = torch.baddbmm(down_bias, self.act_fn(h), down) * weights[:, slot, None, None]
            out = h if out is None else out + h
        return out


PADDED_MAX_ROWS = 128  # `vmoe_cpu`: the most rows per expert for which `infer_padded` beats `eager` (docs/performance.md)


def vmoe_cpu_experts_forward(self: VMoEExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    """The `vmoe_cpu` experts implementation, hf_vmoe's default on CPU: `eager`, except at inference on a CPU for
    - one whole image (image routing at batch 1, the on-device workload): the host reads the image's k expert ids
      and `infer_one_image` runs them on its tokens as they are (worth 1-2% at batch 1);
    - token rows that give no expert more than `PADDED_MAX_ROWS` rows, padded by at most half, with more than one
      thread (token routing at batch 1-2): `infer_padded`, one batched matmul per projection split over the threads
      (0.59x -> 0.67x the dense twin at batch 1 on 2 threads; on one thread the padding is only extra work)."""
    if not hasattr(self, "infer_one_image"):
        raise ValueError(f"experts_implementation='vmoe_cpu' is hf_vmoe's, for VMoEExperts; got {type(self).__name__}")
    eager = type(self).forward.__wrapped__
    if torch.is_grad_enabled() or _static_shapes() or hidden_states.device.type != "cpu":
        return eager(self, hidden_states, top_k_index, top_k_weights)
    if hidden_states.ndim == 3 and hidden_states.shape[0] == 1:  # one image
        return self.infer_one_image(hidden_states, top_k_index.tolist()[0], top_k_weights.tolist()[0])
    assignments = top_k_index.numel()
    if hidden_states.ndim == 2 and 0 < assignments <= PADDED_MAX_ROWS * self.num_experts and (
            torch.get_num_threads() > 1):
        counts = torch.bincount(top_k_index.reshape(-1), minlength=self.num_experts).tolist()
        # every id local (no expert parallelism), and padding to the largest count adds at most half the rows
        if len(counts) == self.num_experts and max(counts) <= PADDED_MAX_ROWS and (
                self.num_experts * max(counts) <= 1.5 * assignments):
            return self.infer_padded(hidden_states, top_k_index, top_k_weights, counts)
    return eager(self, hidden_states, top_k_index, top_k_weights)


if "vmoe_cpu" not in ALL_EXPERTS_FUNCTIONS:  # once, also when this file is imported again as remote code
    ALL_EXPERTS_FUNCTIONS.register("vmoe_cpu", vmoe_cpu_experts_forward)


class VMoESparseMoeBlock(nn.Module):
    """An MoE MLP block: the router's plan sends the tokens to the routed experts, an always-on shared expert
    (ViMoE) sees every token. With one shared image router (Mobile V-MoE) the block has no router and applies the
    encoder's plan."""

    def __init__(self, config: VMoEConfig):
        super().__init__()
        has_router = not (config.routing_level == "image" and config.shared_router)
        self.router = _build_router(config) if has_router else None
        self.experts = VMoEExperts(config)
        width = config.num_shared_experts * config.shared_expert_intermediate_size
        self.shared_expert = VMoEMLP(config, width) if config.num_shared_experts > 0 else None
        self.dispatch_dtype = getattr(torch, config.expert_dispatch_dtype) if config.expert_dispatch_dtype else None

    def forward(self, hidden_states: torch.Tensor, routing: VMoERouting | None = None) -> torch.Tensor:
        if routing is None:
            _, routing = self.router(hidden_states)
        out = routing.apply(self.experts, hidden_states, self.dispatch_dtype)
        if self.shared_expert is not None:
            out = out + self.shared_expert(hidden_states)
        return out


# --------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------


class VMoELayer(GradientCheckpointingLayer):
    """A pre-norm ViT block whose MLP is dense or a sparse MoE block. `routing` is the shared image router's plan
    (None: the block routes itself)."""

    def __init__(self, config: VMoEConfig, layer_idx: int):
        super().__init__()
        self.is_moe = layer_idx in config.moe_layers
        self.attention = VMoEAttention(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VMoESparseMoeBlock(config) if self.is_moe else VMoEMLP(config)
        use_scale = config.layerscale_value is not None
        self.layer_scale1 = VMoELayerScale(config) if use_scale else None
        self.layer_scale2 = VMoELayerScale(config) if use_scale else None
        self.drop_path = VMoEDropPath(config.drop_path_rate) if config.drop_path_rate > 0 else None
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        routing: VMoERouting | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        # names are rebound as soon as a tensor is consumed, so each temporary is freed early (at batch 32 holding
        # the attention output and the normed input through the MLP cost 8% of the block's time on a 2-core CPU)
        residual = hidden_states
        hidden_states, _ = self.attention(self.layernorm_before(hidden_states), **kwargs)
        hidden_states = residual + self.residual_branch(hidden_states, self.layer_scale1)
        residual = hidden_states
        hidden_states = self.layernorm_after(hidden_states)
        hidden_states = self.mlp(hidden_states, routing) if self.is_moe else self.mlp(hidden_states)
        return residual + self.residual_branch(hidden_states, self.layer_scale2)

    def residual_branch(self, output: torch.Tensor, layer_scale: VMoELayerScale | None) -> torch.Tensor:
        """Dropout, layer scale and stochastic depth of a branch (the absent ones are skipped, not called)."""
        output = self.dropout(output)
        if layer_scale is not None:
            output = layer_scale(output)
        return output if self.drop_path is None else self.drop_path(output)


# --------------------------------------------------------------------------------------------------------------
# FLOPs (the Trainer's `total_flos` and `hf_vmoe.recipes.flops`)
# --------------------------------------------------------------------------------------------------------------


def flop_breakdown(config: VMoEConfig, image_size=None, batch_size: int = 1, head: str | None = "classification"):
    """Active forward FLOPs (2 x multiply-adds of the matmuls and convolutions) per image of an inference batch of
    `batch_size` images, by component. The batch matters for expert choice with `router_group_size` (its capacity
    is per routing group; without a group size it routes each image alone at inference) and for
    `router_group_remainder="pad"`, whose padding images run every block (their share is counted, spread over the
    real images; they skip the classifier). Training groups expert choice's tokens over the batch when no group size
    is set; this counts inference's per-image groups (the capacities differ only by rounding). Soft MoE's L2
    normalisations and scale are elementwise, like layer norms: not counted; its router is the (tokens x H) by
    (H x E * P) logits matmul."""
    h, c = config.hidden_size, config.num_channels
    ph, pw = to_pair(config.patch_size)
    ih, iw = to_pair(image_size if image_size is not None else config.image_size)
    if ih % ph or iw % pw:
        raise ValueError(f"image_size {(ih, iw)} is not divisible by patch_size {(ph, pw)}")
    num_patches = (ih // ph) * (iw // pw)
    t = num_patches + (1 if config.use_cls_token else 0)
    ie = config.moe_intermediate_size
    b = {"patch_embedding": 2 * num_patches * c * ph * pw * h, "attention_projections": 0, "attention_matmuls": 0,
         "mlp": 0, "experts": 0, "shared_experts": 0, "router": 0, "soft_dispatch_combine": 0, "classifier": 0}
    per_row = 2 * 2 * h * ie  # one expert on one row
    padded = batch_size + group_padding(config, batch_size, t)  # images the blocks run, real and padding
    router = ROUTER_CLASSES[config.router_type]  # each router type says what its blocks compute
    shared_router = config.routing_level == "image" and config.shared_router  # one router call for every block
    rows = router.expert_rows(config, t, padded)
    for idx in range(config.num_hidden_layers):
        b["attention_projections"] += 4 * 2 * t * h * h
        b["attention_matmuls"] += 2 * 2 * t * t * h
        if idx not in config.moe_layers:
            b["mlp"] += 2 * 2 * t * h * config.intermediate_size
            continue
        b["experts"] += int(rows * per_row)
        if config.num_shared_experts:
            b["shared_experts"] += 2 * 2 * t * h * config.num_shared_experts * config.shared_expert_intermediate_size
        if not shared_router or idx == config.moe_layers[0]:
            for name, value in router.router_flops(config, t).items():
                b[name] = b.get(name, 0) + value
    if padded != batch_size:  # per real image: its own blocks and its share of the padding's
        b = {name: round(value * padded / batch_size) for name, value in b.items()}
    pooled = h * (2 if config.pooling == "cls_mean" else 1)
    if head == "classification" and config.representation_size:
        b["classifier"] += 2 * pooled * config.representation_size  # the pre-logits layer
        pooled = config.representation_size
    if head == "classification" and config.num_labels > 0:
        b["classifier"] += 2 * pooled * config.num_labels
    return b


# --------------------------------------------------------------------------------------------------------------
# Pre-trained model, encoder and heads
# --------------------------------------------------------------------------------------------------------------


PER_IMAGE_FIELDS = ("last_hidden_state", "pooler_output", "hidden_states", "attentions", "feature_maps",
                    "router_logits")


def pad_to_routing_groups(forward: Callable) -> Callable:
    """V-MoE's evaluator for `router_group_remainder="pad"`: at inference, all-zero images fill the batch to whole
    routing groups (`group_padding`) and the outputs keep the real images only (the routing losses and counts include
    the padding). Wraps the `forward` of a model that owns `embeddings` and `encoder`."""
    signature = inspect.signature(forward)

    @wraps(forward)
    def wrapper(self, *args, **kwargs):
        if self.training or self.config.router_group_size is None:
            return forward(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        arguments = bound.arguments
        pixel_values = arguments.get("pixel_values")
        embeddings = self.embeddings
        check_pixel_values(pixel_values, self.config.num_channels, embeddings.image_size, embeddings.patch_size,
                           bool(arguments.get("interpolate_pos_encoding")))  # errors name the batch as given
        record = self.records_routing(arguments.get("compute_routing_loss"), arguments.get("superclass_labels"),
                                      arguments.get("kwargs", {}).get("output_router_logits"))
        patch = embeddings.patch_size
        batch, _, height, width = pixel_values.shape
        tokens = (height // patch[0]) * (width // patch[1]) + embeddings.num_prefix_tokens
        padding = group_padding(self.config, batch, tokens, record)
        if not padding:
            return forward(self, *args, **kwargs)
        check_finite(pixel_values, pixel_values)  # before padding, so that the count is of the batch as given
        arguments["pixel_values"] = torch.cat([pixel_values, pixel_values.new_zeros(padding, *pixel_values.shape[1:])])
        outputs = forward(*bound.args, **bound.kwargs)
        images = batch + padding
        for name in PER_IMAGE_FIELDS:
            value = outputs.get(name)
            if isinstance(value, tuple):
                outputs[name] = tuple(v[: v.shape[0] // images * batch] for v in value)
            elif value is not None:
                outputs[name] = value[:batch]
        return outputs

    return wrapper


class VMoECheckpointMismatchError(RuntimeError, ValueError):
    """A checkpoint that does not fit the model (shapes or missing weights). A `RuntimeError` like transformers'
    size-mismatch error, and a `ValueError` for code that treats it as bad input."""


class VMoEPreTrainedModel(PreTrainedModel):
    config_class = VMoEConfig
    config: VMoEConfig
    base_model_prefix = "vmoe"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["VMoEEmbeddings", "VMoELayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _keep_in_fp32_modules_strict = ["router"]  # routers are created in float32 and stay so when loaded in fp16 / bf16
    _can_record_outputs = {
        "hidden_states": VMoELayer,
        "attentions": OutputRecorder(VMoEAttention, index=1),
        "router_logits": OutputRecorder(VMoERouter, index=0),
        "routings": OutputRecorder(VMoERouter, index=1),  # the plans, for `vmoe_routing_loss`
    }
    _flops_head: str | None = None

    def __init__(self, config: VMoEConfig, *inputs, **kwargs):
        config.check_vmoe()
        super().__init__(config, *inputs, **kwargs)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """Nothing requested: without a GPU `vmoe_cpu` (`eager` with its inference fast paths, the fastest on CPU, see
        docs/performance.md); else transformers' default. torch's grouped_mm needs expert widths that are multiples of 8:
        other widths fall back to `vmoe_cpu` by default and raise a ValueError naming them when grouped_mm is asked
        for explicitly."""
        config = self.config
        if requested_experts is None and not torch.cuda.is_available():
            return "vmoe_cpu"
        if config.is_moe and (config.hidden_size % 8 or config.moe_intermediate_size % 8):
            if requested_experts == "grouped_mm":
                config.check_vmoe(experts_implementation="grouped_mm")
            if requested_experts is None:
                return "vmoe_cpu"
        return super().get_correct_experts_implementation(requested_experts)

    def _activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, *args, **kwargs):
        """Always non-reentrant: reentrant checkpointing runs each layer under no_grad in the forward pass, so the
        router logits recorded there for the aux loss would carry no gradient."""
        activation_checkpointing_kwargs = dict(activation_checkpointing_kwargs or {})
        if activation_checkpointing_kwargs.get("use_reentrant"):
            logger.warning_once(
                "VMoE uses non-reentrant activation checkpointing (use_reentrant=False): with reentrant "
                "checkpointing the routing aux losses would not reach the routers."
            )
        activation_checkpointing_kwargs["use_reentrant"] = False
        return super()._activation_checkpointing_enable(activation_checkpointing_kwargs, *args, **kwargs)

    def floating_point_ops(self, input_dict: dict, exclude_embeddings: bool = True) -> int:
        """Training FLOPs of one batch for the Trainer's `total_flos`: 3 x (forward + backward) the active forward
        FLOPs of each image (`flop_breakdown`), instead of transformers' 6 x pixels x all parameters."""
        pixel_values = input_dict.get(self.main_input_name)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            return 0
        batch, _, height, width = pixel_values.shape
        per_image = sum(flop_breakdown(self.config, (height, width), batch, self._flops_head).values())
        return 3 * batch * per_image

    _head_prefixes = ("classifier.", "pre_logits.", "decode_head.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, strict about checkpoints that do not fit (a VMoE with re-initialised
        experts looks fine and predicts nonsense): tensors whose shape differs from the model's and tensors of the
        model body missing from the checkpoint raise a `VMoECheckpointMismatchError` listing every one, unless the
        caller asked for `ignore_mismatched_sizes=True` (re-initialised with a warning, as in transformers) or
        `output_loading_info=True` (reported in the returned info). Missing task heads are re-initialised with a
        warning, as in transformers. A truncated or corrupt `model.safetensors` raises a ValueError naming it."""
        from safetensors import SafetensorError

        check_local_path(pretrained_model_name_or_path)
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        output_loading_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                ignore_mismatched_sizes=True,  # mismatches are reported below, with the list of what does not fit
                output_loading_info=True,
                **kwargs,
            )
        except SafetensorError as err:
            raise ValueError(
                f"Could not read the safetensors checkpoint of {pretrained_model_name_or_path!r}: {err}. "
                "The file is truncated or corrupt; save or download it again."
            ) from err
        cls._refuse_old_soft_router(pretrained_model_name_or_path, info)
        if any(key.endswith("e_score_correction_bias") for key in info["unexpected_keys"]):
            logger.warning("%s was trained with loss-free balancing: its routers' selection biases are dropped "
                           "because router_bias_update_rate is 0 in this config, so experts are chosen without them; "
                           "pass router_bias_update_rate to keep them", pretrained_model_name_or_path)
        if output_loading_info:
            return model, info
        if not ignore_mismatched_sizes:
            problems = [
                f"  {key}: checkpoint shape {tuple(ckpt)} != model shape {tuple(mine)}"
                for key, ckpt, mine in sorted(info["mismatched_keys"], key=lambda item: item[0])
            ]
            problems += [
                f"  {key}: missing from the checkpoint"
                for key in sorted(info["missing_keys"])
                # a head is new on fine-tuning; a selection bias starts at zero when balancing is switched on
                if not key.startswith(cls._head_prefixes) and not key.endswith("e_score_correction_bias")
            ]
            if problems:
                raise VMoECheckpointMismatchError(
                    f"The checkpoint {pretrained_model_name_or_path!r} does not fit {cls.__name__} with this config "
                    f"(num_experts={model.config.num_experts}, moe_layers={model.config.moe_layers}):\n"
                    + "\n".join(problems)
                    + "\nPass ignore_mismatched_sizes=True to re-initialise these weights instead, or "
                    "output_loading_info=True to get the list."
                )
        return model

    @staticmethod
    def _refuse_old_soft_router(path, info: dict) -> None:
        """A Soft MoE checkpoint with `router.weight` but no `router.scale` was saved by hf_vmoe's earlier Soft MoE
        router, a plain linear layer: its weights would load into the normalised router and compute something else.
        Raises a `VMoECheckpointMismatchError` naming the change, whatever the loading options."""
        missing = set(info["missing_keys"])
        mismatched = {key for key, *_ in info["mismatched_keys"]}
        old = sorted(key for key in missing if key.endswith("mlp.router.scale")
                     and key[: -len("scale")] + "weight" not in missing | mismatched)
        if old:
            raise VMoECheckpointMismatchError(
                f"The checkpoint {path!r} has a Soft MoE router in the old layout ({old[0][: -len('scale')]}weight "
                "without 'scale'): hf_vmoe's Soft MoE router was a plain linear layer; it now computes vmoe's Soft "
                "MoE (L2-normalised tokens and slot parameters, times a learned scalar 'scale'), so these weights "
                "do not fit. Retrain the model, or convert the vmoe checkpoint again."
            )

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, VMoEEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            if module.cls_token is not None:
                init.trunc_normal_(module.cls_token, mean=0.0, std=std)
        elif isinstance(module, VMoEExperts):
            init.trunc_normal_(module.up_proj, mean=0.0, std=std)
            init.trunc_normal_(module.down_proj, mean=0.0, std=std)
            init.zeros_(module.up_proj_bias)
            init.zeros_(module.down_proj_bias)
        elif isinstance(module, VMoERouter):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "e_score_correction_bias", None) is not None:
                init.zeros_(module.e_score_correction_bias)
            if isinstance(module, VMoESoftRouter):
                init.ones_(module.scale)
        elif isinstance(module, VMoELayerScale):
            init.constant_(module.lambda1, self.config.layerscale_value)

    def records_routing(self, compute_routing_loss: bool | None, superclass_labels: torch.Tensor | None,
                        output_router_logits: bool | None) -> bool:
        """Whether a forward records the routing plans, for the aux loss and statistics: when the model trains, gets
        labels (`compute_routing_loss`), super-class labels or `output_router_logits`."""
        if compute_routing_loss is None:
            compute_routing_loss = self.training
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        return self.config.is_moe and bool(compute_routing_loss or output_router_logits or superclass_labels is not None)

    def routing_outputs(self, encoder_outputs: VMoEEncoderOutput, superclass_labels: torch.Tensor | None) -> dict:
        """The routing fields of the outputs: the router logits when asked for, and the aux loss and statistics of
        the plans when they were recorded (`vmoe_routing_loss`); a balancing router learns this forward's loads."""
        routing = dict.fromkeys(ROUTING_FIELDS)
        routing["router_logits"] = encoder_outputs.router_logits
        if encoder_outputs.routings:
            routing.update(vmoe_routing_loss(encoder_outputs.routings, self.config, superclass_labels))
            if self.training and self.config.router_bias_update_rate:  # counts of this forward, not of a recompute
                _record_router_loads(self.encoder, routing["expert_counts"])
        return routing


class VMoEEncoder(VMoEPreTrainedModel):
    """The blocks. With one shared image router (Mobile V-MoE) the encoder routes once, from the hidden states
    entering the first MoE block, and every MoE block applies that plan."""

    def __init__(self, config: VMoEConfig):
        super().__init__(config)
        self.layer = nn.ModuleList([VMoELayer(config, i) for i in range(config.num_hidden_layers)])
        shared = config.is_moe and config.routing_level == "image" and config.shared_router
        self.router = _build_router(config) if shared else None
        self.first_moe_layer = config.moe_layers[0] if config.is_moe else -1
        self.post_init()

    def init_parallel_plans(self) -> None:
        # the config's expert-parallel plan names paths from the base model, of which the encoder is the child
        # `encoder`: keep it relative to the encoder (the base model then adds it back under `encoder.`)
        super().init_parallel_plans()
        self._ep_plan = {key.removeprefix("encoder."): rule for key, rule in self._ep_plan.items()
                         if key.startswith("encoder.")}

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        hidden_states: torch.Tensor,
        superclass_labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> VMoEEncoderOutput:
        routing = None
        for idx, layer in enumerate(self.layer):
            if idx == self.first_moe_layer and self.router is not None:
                _, routing = self.router(hidden_states, superclass_labels)
            hidden_states = layer(hidden_states, routing if layer.is_moe else None, **kwargs)
        return VMoEEncoderOutput(last_hidden_state=hidden_states)


class VMoEModel(VMoEPreTrainedModel):
    """The bare VMoE transformer: embeddings, blocks, final layer norm, and the routing aux loss."""

    def __init__(self, config: VMoEConfig):
        super().__init__(config)
        self.embeddings = VMoEEmbeddings(config)
        self.encoder = VMoEEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.patch_embeddings

    @can_return_tuple
    @pad_to_routing_groups
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        superclass_labels: torch.Tensor | None = None,
        compute_routing_loss: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> VMoEModelOutput:
        r"""
        superclass_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Super-class of each image (image routing): adds the router's super-class cross-entropy to `aux_loss` and
            drives routing in training when `config.train_routing == "superclass"`.
        compute_routing_loss (`bool`, *optional*):
            Compute `aux_loss` and the routing statistics. None: when training (and whenever `output_router_logits`
            or `superclass_labels` are given). The heads pass True with labels.
        """
        record = self.records_routing(compute_routing_loss, superclass_labels, kwargs.get("output_router_logits"))
        embedding_output = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        encoder_outputs = self.encoder(
            embedding_output, superclass_labels=superclass_labels, output_routings=record, **kwargs
        )
        sequence_output = self.layernorm(encoder_outputs.last_hidden_state)
        if self.config.pooling == "cls":
            pooled_output = sequence_output[:, 0]
        elif self.config.pooling == "mean":
            pooled_output = sequence_output[:, self.embeddings.num_prefix_tokens:].mean(dim=1)
        else:
            pooled_output = torch.cat([sequence_output[:, 0], sequence_output[:, 1:].mean(dim=1)], dim=-1)
        return VMoEModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=encoder_outputs.hidden_states,
            attentions=encoder_outputs.attentions,
            **self.routing_outputs(encoder_outputs, superclass_labels),
        )


def _superclass_labels(config: VMoEConfig, labels: torch.Tensor | None) -> torch.Tensor | None:
    if labels is None or config.superclass_ids is None or labels.ndim != 1:
        return None
    return torch.tensor(config.superclass_ids, device=labels.device)[labels]


def _routing_fields(outputs) -> dict:
    return {name: getattr(outputs, name) for name in ROUTING_FIELDS}


class VMoEForImageClassification(VMoEPreTrainedModel):
    """VMoE with a linear classifier on the pooled output (class token by default). `loss` includes the routing
    aux losses and, with `config.superclass_ids`, the router's super-class loss."""

    accepts_loss_kwargs = False
    _flops_head = "classification"

    def __init__(self, config: VMoEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vmoe = VMoEModel(config)
        in_features = config.hidden_size * (2 if config.pooling == "cls_mean" else 1)
        # ViT / V-MoE pre-logits: Dense(representation_size) + tanh between the pooled output and the classifier
        self.pre_logits = nn.Linear(in_features, config.representation_size) if config.representation_size else None
        in_features = config.representation_size or in_features
        self.classifier = nn.Linear(in_features, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> VMoEImageClassifierOutput:
        if labels is not None and isinstance(pixel_values, torch.Tensor) and labels.shape[:1] != pixel_values.shape[:1]:
            raise ValueError(
                f"labels have shape {tuple(labels.shape)} but pixel_values has batch size {pixel_values.shape[0]}"
            )
        if labels is not None and not labels.is_floating_point() and self.num_labels > 1:
            invalid = ((labels < 0) | (labels >= self.num_labels)) & (labels != -100)  # -100: ignored, as in transformers
            if bool(invalid.any()):
                bad = labels[invalid][0].item()
                raise ValueError(f"labels must be in [0, num_labels={self.num_labels}) (or -100 to ignore), got {bad}")
        outputs = self.vmoe(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            superclass_labels=_superclass_labels(self.config, labels),
            compute_routing_loss=True if labels is not None else None,
            **kwargs,
        )
        pooled = outputs.pooler_output
        if self.pre_logits is not None:
            pooled = torch.tanh(self.pre_logits(pooled))
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            if labels.dtype in (torch.uint8, torch.int8, torch.int16) and self.num_labels > 1:
                labels = labels.long()  # class indices in a small integer type (e.g. from numpy)
            loss = self.loss_function(labels, logits, self.config)
            if outputs.aux_loss is not None:
                loss = loss + outputs.aux_loss.to(loss.dtype)
        return VMoEImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **_routing_fields(outputs),
        )


class VMoESegmentationHead(nn.Module):
    """A light decode head on the patch-token grid: 3x3 conv + BatchNorm + GELU, 1x1 conv to classes, bilinear
    upsampling to the input resolution."""

    def __init__(self, config: VMoEConfig):
        super().__init__()
        self.conv = nn.Conv2d(config.hidden_size, config.hidden_size, kernel_size=3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(config.hidden_size)
        self.act = nn.GELU()
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(config.hidden_size, config.num_labels, kernel_size=1)

    def forward(self, feature_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        logits = self.classifier(self.dropout(self.act(self.norm(self.conv(feature_map)))))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class VMoEForSemanticSegmentation(VMoEPreTrainedModel):
    """VMoE with a light convolutional decode head. `logits` are at the input resolution; `loss` is the pixel
    cross-entropy ignoring 255 plus the routing aux losses."""

    accepts_loss_kwargs = False

    def __init__(self, config: VMoEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vmoe = VMoEModel(config)
        self.decode_head = VMoESegmentationHead(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> VMoESemanticSegmenterOutput:
        if labels is not None:
            _validate_segmentation_labels(labels, pixel_values, self.num_labels)
        outputs = self.vmoe(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            compute_routing_loss=True if labels is not None else None,
            **kwargs,
        )
        height, width = pixel_values.shape[-2:]
        patch = self.vmoe.embeddings.patch_size
        tokens = outputs.last_hidden_state[:, self.vmoe.embeddings.num_prefix_tokens:]
        feature_map = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height // patch[0], width // patch[1])
        logits = self.decode_head(feature_map, (height, width))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels.long(), ignore_index=255)
            if outputs.aux_loss is not None:
                loss = loss + outputs.aux_loss.to(loss.dtype)
        return VMoESemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **_routing_fields(outputs),
        )


def _validate_segmentation_labels(labels: torch.Tensor, pixel_values: torch.Tensor | None, num_labels: int):
    if labels.ndim != 3:
        raise ValueError(f"segmentation labels must be (batch, height, width), got shape {tuple(labels.shape)}")
    if isinstance(pixel_values, torch.Tensor) and labels.shape[0] != pixel_values.shape[0]:
        raise ValueError(
            f"segmentation labels have batch size {labels.shape[0]} but pixel_values has {pixel_values.shape[0]}"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"segmentation labels must be integers, got dtype {labels.dtype}")
    valid = ((labels >= 0) & (labels < num_labels)) | (labels == 255)
    if not bool(valid.all()):
        bad = labels[~valid][0].item()
        raise ValueError(f"segmentation labels must be in [0, num_labels={num_labels}) or 255 (ignore), got {bad}")


class VMoEBackbone(BackboneMixin, VMoEPreTrainedModel):
    """Feature maps `(batch, hidden, H / patch, W / patch)` of the chosen stages (`config.out_features`), for
    transformers' UperNet and other decode heads, with the routing fields (`aux_loss` for the head's loss)."""

    def __init__(self, config: VMoEConfig):
        super().__init__(config)
        self.num_features = [config.hidden_size for _ in range(config.num_hidden_layers + 1)]
        self.embeddings = VMoEEmbeddings(config)
        self.encoder = VMoEEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.patch_embeddings

    @can_return_tuple
    @pad_to_routing_groups
    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool | None = None,
        compute_routing_loss: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> VMoEBackboneOutput:
        r"""
        compute_routing_loss (`bool`, *optional*):
            Compute `aux_loss` and the routing statistics. None: when training (or with `output_router_logits`).
        """
        output_hidden_states = kwargs.pop("output_hidden_states", None)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        record = self.records_routing(compute_routing_loss, None, kwargs.get("output_router_logits"))
        embedding_output = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        encoded = self.encoder(embedding_output, output_routings=record, output_hidden_states=True, **kwargs)
        batch_size, _, height, width = pixel_values.shape
        patch = self.embeddings.patch_size
        feature_maps = ()
        for stage, hidden_state in zip(self.stage_names, encoded.hidden_states):
            if stage in self.out_features:
                if self.config.apply_layernorm:
                    hidden_state = self.layernorm(hidden_state)
                if self.config.reshape_hidden_states:
                    hidden_state = hidden_state[:, self.embeddings.num_prefix_tokens:]
                    hidden_state = hidden_state.reshape(batch_size, height // patch[0], width // patch[1], -1)
                    hidden_state = hidden_state.permute(0, 3, 1, 2).contiguous()
                feature_maps += (hidden_state,)
        return VMoEBackboneOutput(
            feature_maps=feature_maps,
            hidden_states=encoded.hidden_states if output_hidden_states else None,
            attentions=encoded.attentions,
            **self.routing_outputs(encoded, None),
        )


__all__ = [
    "VMoEBackbone",
    "VMoEForImageClassification",
    "VMoEForSemanticSegmentation",
    "VMoEModel",
    "VMoEPreTrainedModel",
    "VMoEEncoder",
    "VMoEExperts",
    "VMoERouter",
    "VMoETopKRouter",
    "VMoEExpertChoiceRouter",
    "VMoESoftRouter",
    "VMoESparseMoeBlock",
    "VMoERouting",
    "TopKRouting",
    "ExpertChoiceRouting",
    "SoftRouting",
    "VMoECheckpointMismatchError",
    "vmoe_routing_loss",
    "register_router",
    "update_router_biases",
    "flop_breakdown",
    "VMoEModelOutput",
    "VMoEImageClassifierOutput",
    "VMoESemanticSegmenterOutput",
    "VMoEBackboneOutput",
]
