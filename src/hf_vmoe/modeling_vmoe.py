"""PyTorch VMoE: Vision Transformers with sparse mixture-of-experts MLP blocks.

One file holds every class a checkpoint needs (so `trust_remote_code` works and transformers' experts interface
can switch backends). Layout follows transformers' ViT / DINOv2 / Qwen2-MoE:

    VMoEEmbeddings -> [VMoELayer] x N -> LayerNorm -> head
    VMoELayer      = attention + (VMoEMLP | VMoESparseMoeBlock), pre-norm residuals, optional layer scale
    VMoESparseMoeBlock = router (token routing, or image routing with one router per block)
                         + VMoEExperts (stacked (E, out, in) tensors) + optional shared expert

A router returns a routing plan (`VMoERouting`: logits, chosen experts, combine weights); the MoE block applies
the plan without knowing how it was made. Image routing with `shared_router=True` (Mobile V-MoE) computes one
plan in the encoder, from the hidden states entering the first MoE block, and every MoE block applies it.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.integrations.moe import grouped_mm_experts_forward, use_experts_implementation
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import ModelOutput, logging
from transformers.utils.generic import can_return_tuple

from .configuration_vmoe import VMoEConfig

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------


@dataclass
class VMoEModelOutput(ModelOutput):
    """
    last_hidden_state: (batch, 1 + num_patches, hidden) after the final layer norm.
    pooler_output: (batch, hidden) or (batch, 2 * hidden) for `pooling="cls_mean"`.
    hidden_states / attentions: per layer, when asked for.
    router_logits: one (num_routed_items, num_experts) float32 tensor per router call, when asked for.
    aux_loss: weighted sum of the routing losses (balancing, z-loss, and the super-class loss when super-class
        labels were given); None for a dense model.
    superclass_loss / superclass_accuracy: the router's super-class cross-entropy and top-1 accuracy (image
        routing with super-class labels).
    expert_counts: (num_router_calls, num_experts) number of items each expert received (after capacity).
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
    (ignoring 255) + `aux_loss`."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None
    expert_counts: torch.LongTensor | None = None


@dataclass
class VMoEBackboneOutput(BackboneOutput):
    """`BackboneOutput` plus the routing aux loss, so a decode head can add it to its loss."""

    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class VMoERouting:
    """A routing plan for N routed items (images or tokens).

    logits: (N, E) float32 router logits (before noise); used by the losses.
    top_k_index: (N, k) chosen experts.
    top_k_weights: (N, k) combine weights (zero where capacity dropped the assignment).
    keep: (N, k) bool, False where capacity dropped the assignment; None when nothing can be dropped.
    """

    logits: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor
    keep: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------------------
# Embeddings and attention (as in transformers' ViT / DINOv2)
# --------------------------------------------------------------------------------------------------------------


def _pair(x):
    return tuple(x) if isinstance(x, (list, tuple)) else (x, x)


class VMoEPatchEmbeddings(nn.Module):
    """`(batch, channels, height, width)` pixels -> `(batch, num_patches, hidden)` patch embeddings."""

    def __init__(self, config: VMoEConfig):
        super().__init__()
        self.image_size = _pair(config.image_size)
        self.patch_size = _pair(config.patch_size)
        self.num_channels = config.num_channels
        self.num_patches = (self.image_size[0] // self.patch_size[0]) * (self.image_size[1] // self.patch_size[1])
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, self.patch_size, stride=self.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class VMoEEmbeddings(nn.Module):
    """Class token + patch embeddings + (optionally interpolated) position embeddings."""

    def __init__(self, config: VMoEConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embeddings = VMoEPatchEmbeddings(config)
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.patch_embeddings.num_patches + 1, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.image_size = self.patch_embeddings.image_size
        self.patch_size = self.patch_embeddings.patch_size

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Bicubic interpolation of the patch position embeddings to a `height x width` image (in float32)."""
        num_patches = embeddings.shape[1] - 1
        num_positions = self.position_embeddings.shape[1] - 1
        grid_h, grid_w = self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]
        new_h, new_w = height // self.patch_size[0], width // self.patch_size[1]
        if not torch.jit.is_tracing() and num_patches == num_positions and (new_h, new_w) == (grid_h, grid_w):
            return self.position_embeddings
        class_pos_embed = self.position_embeddings[:, :1]
        patch_pos_embed = self.position_embeddings[:, 1:]
        dim = embeddings.shape[-1]
        patch_pos_embed = patch_pos_embed.reshape(1, grid_h, grid_w, dim).permute(0, 3, 1, 2)
        patch_pos_embed = F.interpolate(
            patch_pos_embed.float(), size=(new_h, new_w), mode="bicubic", align_corners=False
        ).to(embeddings.dtype)
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed, patch_pos_embed), dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        batch_size, _, height, width = pixel_values.shape
        embeddings = self.patch_embeddings(pixel_values)
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

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
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
# Routing
# --------------------------------------------------------------------------------------------------------------


class VMoETopKRouter(nn.Module):
    """Bias-free linear router in float32: softmax over experts, top-k (V-MoE).

    Input: (N, hidden) routed items (tokens, or one pooled vector per image). Returns (logits, weights, index) like
    transformers' routers; `VMoESparseMoeBlock.route` turns that into a `VMoERouting` plan with capacity applied.
    Noise (`router_noise_std`) is added to the logits in training only; the returned logits are noise-free.
    """

    def __init__(self, config: VMoEConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.noise_std = config.router_noise_std
        self.normalize = config.normalize_router_weights
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor, forced_index: torch.Tensor | None = None):
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):  # float32 even under autocast
            logits = F.linear(hidden_states.float(), self.weight.float())
        noisy = logits
        if self.training and self.noise_std > 0:
            noisy = logits + torch.randn_like(logits) * self.noise_std
        probs = noisy.softmax(dim=-1)
        if forced_index is None:
            top_k_weights, top_k_index = torch.topk(probs, self.top_k, dim=-1)
        else:
            top_k_index = forced_index
            top_k_weights = probs.gather(1, top_k_index)
        if self.normalize:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return logits, top_k_weights, top_k_index


def capacity_keep_mask(
    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int, capacity: int, batch_priority: bool
) -> torch.Tensor:
    """Which (item, slot) assignments fit in the experts' buffers of size `capacity` (V-MoE).

    All first choices are served before any second choice; within a slot, items are served in batch order or, with
    batch-priority routing, by decreasing top-1 router weight. Returns a (N, k) bool mask.
    """
    num_items, top_k = top_k_index.shape
    if batch_priority:
        order = torch.argsort(top_k_weights[:, 0], descending=True, stable=True)
    else:
        order = torch.arange(num_items, device=top_k_index.device)
    ordered = top_k_index[order].t().reshape(-1)  # slot-major: (k * N,)
    one_hot = F.one_hot(ordered, num_experts)
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # position of each assignment in its buffer
    keep_ordered = (position < capacity).view(top_k, num_items).t()
    keep = torch.empty_like(keep_ordered)
    keep[order] = keep_ordered
    return keep


# --------------------------------------------------------------------------------------------------------------
# Experts
# --------------------------------------------------------------------------------------------------------------


@use_experts_implementation(has_gate=False, has_bias=True)
class VMoEExperts(nn.Module):
    """E GELU MLP experts stored as stacked tensors (E, out, in), usable by transformers' experts interface
    (`eager` = the reference loop below, `batched_mm`, `grouped_mm`)."""

    def __init__(self, config: VMoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.expert_intermediate_size
        self.up_proj = nn.Parameter(torch.empty(self.num_experts, self.intermediate_dim, self.hidden_dim))
        self.up_proj_bias = nn.Parameter(torch.zeros(self.num_experts, self.intermediate_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.down_proj_bias = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def expert_forward(self, expert_idx: int, hidden_states: torch.Tensor, params: tuple | None = None) -> torch.Tensor:
        """One expert's MLP. `params` (from `per_expert_params`) holds the stacked weights unbound per expert: a loop
        over experts that indexes through it builds one gradient buffer per parameter in backward instead of one
        full-size (E, ...) buffer per expert (what indexing the stacked parameter once per expert costs)."""
        if params is None:
            params = (self.up_proj, self.up_proj_bias, self.down_proj, self.down_proj_bias)
        up, up_bias, down, down_bias = (p[expert_idx] for p in params)
        return F.linear(self.act_fn(F.linear(hidden_states, up, up_bias)), down, down_bias)

    def per_expert_params(self) -> tuple:
        return tuple(p.unbind(0) for p in (self.up_proj, self.up_proj_bias, self.down_proj, self.down_proj_bias))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """Token routing, the `eager` experts backend. hidden_states (T, H); top_k_index / top_k_weights (T, k).
        Each expert runs one matmul pair on exactly the tokens routed to it: the (token, slot) assignments are
        sorted by expert once, each expert gathers its tokens, scales its output by their combine weights and adds
        it into the result (experts in ascending order, so the sum order is fixed). One host sync (the per-expert
        counts). On CPU this is the fastest backend (see the README (Performance)): it adds the biases inside the matmul
        instead of gathering one bias row per assignment as `grouped_mm` does. Under torch.compile (where the
        data-dependent loop would break the graph) it hands over to transformers' `grouped_mm` path, which compiles
        with `fullgraph=True` (same arithmetic)."""
        if torch.compiler.is_compiling() and not _is_exporting():
            return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        num_tokens, top_k = top_k_index.shape
        final_hidden_states = torch.zeros_like(hidden_states)
        if num_tokens == 0:
            return final_hidden_states
        with torch.no_grad():
            flat_index = top_k_index.reshape(-1)
            order = torch.argsort(flat_index, stable=True)  # assignments grouped by expert, token order inside
            counts = torch.bincount(flat_index, minlength=self.num_experts).tolist()
            token_of = order // top_k
        sorted_weights = top_k_weights.reshape(-1)[order]
        params = self.per_expert_params()
        start = 0
        for expert_idx, count in enumerate(counts):
            if not count:
                continue
            end = start + count
            tokens = token_of[start:end]
            current = self.expert_forward(expert_idx, hidden_states.index_select(0, tokens), params)
            current = current * sorted_weights[start:end, None].to(current.dtype)
            final_hidden_states.index_add_(0, tokens, current.to(final_hidden_states.dtype))
            start = end
        return final_hidden_states

    def forward_images(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """Image routing. hidden_states (B, S, H); top_k_index / top_k_weights (B, k): every token of an image goes
        to that image's experts.

        Eager: each expert used by the batch runs one matmul pair on all tokens of its images (gathered with
        `index_select`; no gather at all when a single expert takes the whole batch, e.g. batch 1), so the block
        costs what a dense MLP costs. Results are written straight into the output rows (`index_copy_` for k=1,
        `index_add_` in ascending expert order for k>1). Under tracing / compilation / export (no data-dependent
        shapes) each image gathers its experts' weights instead: one batched matmul per slot, same arithmetic."""
        batch_size, seq_len, hidden_dim = hidden_states.shape
        top_k = top_k_index.shape[1]
        weights = top_k_weights.to(hidden_states.dtype)
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or _is_exporting():
            return self._forward_images_gathered(hidden_states, top_k_index, weights)
        if batch_size == 1 and top_k == 1:  # one image, one expert: a plain MLP call
            return self.expert_forward(int(top_k_index[0, 0]), hidden_states) * weights[:, :, None]
        flat_index = top_k_index.reshape(-1)
        with torch.no_grad():
            order = torch.argsort(flat_index, stable=True)
            counts = torch.bincount(flat_index, minlength=self.num_experts).tolist()  # the one host sync
            image_of = order // top_k
        sorted_weights = weights.reshape(-1)[order, None, None]
        if top_k == 1 and max(counts) == batch_size:  # one expert for the whole batch: no gather, no scatter
            return self.expert_forward(counts.index(batch_size), hidden_states) * weights[:, :, None]
        out = (hidden_states.new_empty if top_k == 1 else hidden_states.new_zeros)(hidden_states.shape)
        params = self.per_expert_params()
        start = 0
        for expert_idx, count in enumerate(counts):
            if not count:
                continue
            end = start + count
            images = image_of[start:end]
            current = self.expert_forward(expert_idx, hidden_states.index_select(0, images), params)
            current = current * sorted_weights[start:end]
            if top_k == 1:
                out.index_copy_(0, images, current)
            else:
                out.index_add_(0, images, current)
            start = end
        return out

    def _forward_images_gathered(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, weights: torch.Tensor):
        """Static-shape image routing (tracing, torch.compile, torch.export / ONNX): every image gathers its
        experts' weights, one `baddbmm` pair per slot."""
        out = None
        for slot in range(top_k_index.shape[1]):
            idx = top_k_index[:, slot]
            h = torch.baddbmm(self.up_proj_bias[idx].unsqueeze(1), hidden_states, self.up_proj[idx].transpose(1, 2))
            down, down_bias = self.down_proj[idx].transpose(1, 2), self.down_proj_bias[idx].unsqueeze(1)
            h = torch.baddbmm(down_bias, self.act_fn(h), down)
            h = h * weights[:, slot, None, None]
            out = h if out is None else out + h
        return out


def _is_exporting() -> bool:
    try:
        return torch.compiler.is_exporting()
    except AttributeError:  # older torch
        return False


class VMoESparseMoeBlock(nn.Module):
    """An MoE MLP block: routed experts (+ an always-on shared expert, ViMoE).

    Token routing: the block's router routes each token. Image routing: the block's own router reads one pooled
    vector per image (`shared_router=False`), or the block applies the plan the encoder's shared router made.
    """

    def __init__(self, config: VMoEConfig):
        super().__init__()
        self.config = config
        self.routing_level = config.routing_level
        self.num_experts = config.num_experts
        self.router = None if (config.routing_level == "image" and config.shared_router) else VMoETopKRouter(config)
        self.experts = VMoEExperts(config)
        self.shared_expert = (
            VMoEMLP(config, config.num_shared_experts * config.shared_expert_intermediate_size)
            if config.num_shared_experts > 0
            else None
        )

    def forward(self, hidden_states: torch.Tensor, routing: VMoERouting | None = None):
        batch_size, seq_len, hidden_dim = hidden_states.shape
        if self.routing_level == "image":
            if routing is None:
                routing = route(self.router, pool_for_router(hidden_states, self.config.router_input), self.config)
            out = self.experts.forward_images(hidden_states, routing.top_k_index, routing.top_k_weights)
        else:
            flat = hidden_states.reshape(-1, hidden_dim)
            routing = route(self.router, flat, self.config)
            out = apply_token_experts(self.experts, flat, routing).view(batch_size, seq_len, hidden_dim)
        if self.shared_expert is not None:
            out = out + self.shared_expert(hidden_states)
        return out, routing


def pool_for_router(hidden_states: torch.Tensor, router_input: str) -> torch.Tensor:
    """One vector per image for image routing: the class token or the mean of the patch tokens."""
    return hidden_states[:, 0] if router_input == "cls" else hidden_states[:, 1:].mean(dim=1)


def route(router: VMoETopKRouter, items: torch.Tensor, config: VMoEConfig, forced_index=None) -> VMoERouting:
    """Run the router on (N, H) items and apply the expert capacity of the current mode (train / eval)."""
    logits, top_k_weights, top_k_index = router(items, forced_index)
    factor = config.capacity_factor if router.training else config.eval_capacity_factor
    keep = None
    if factor is not None:
        num_items = items.shape[0]
        capacity = max(1, math.ceil(num_items * router.top_k * factor / router.num_experts))
        if capacity < num_items:
            keep = capacity_keep_mask(
                top_k_index, top_k_weights, router.num_experts, capacity, config.batch_priority_routing
            )
            top_k_weights = top_k_weights * keep
    return VMoERouting(logits=logits, top_k_index=top_k_index, top_k_weights=top_k_weights, keep=keep)


def apply_token_experts(experts: VMoEExperts, flat: torch.Tensor, routing: VMoERouting) -> torch.Tensor:
    """Token routing through the experts interface. Assignments dropped by capacity are not computed: tokens with
    no kept assignment skip the experts (the residual carries them); a dropped second choice of a kept token is
    pointed at its first kept expert with weight zero."""
    if routing.keep is None:
        return experts(flat, routing.top_k_index, routing.top_k_weights)
    keep = routing.keep
    first_kept = routing.top_k_index.gather(1, keep.int().argmax(dim=1, keepdim=True))
    index = torch.where(keep, routing.top_k_index, first_kept)
    rows = keep.any(dim=1).nonzero().squeeze(1)
    out = flat.new_zeros(flat.shape)
    if rows.numel():
        out[rows] = experts(flat[rows], index[rows], routing.top_k_weights[rows])
    return out


def router_losses(routing: VMoERouting, num_experts: int, config: VMoEConfig) -> torch.Tensor:
    """Balancing losses of one router call (float32): switch load balancing (E * sum_e f_e * P_e, with f_e the
    share of top-k assignments to expert e and P_e its mean probability), V-MoE importance (squared coefficient of
    variation of the per-expert probability mass) and ST-MoE z-loss (mean squared logsumexp of the logits)."""
    logits = routing.logits
    probs = logits.softmax(dim=-1)
    loss = logits.new_zeros(())
    if config.router_aux_loss_coef:
        assigned = F.one_hot(routing.top_k_index, num_experts).float().sum(dim=1)  # (N, E)
        fraction = assigned.mean(dim=0) / routing.top_k_index.shape[1]
        loss = loss + config.router_aux_loss_coef * num_experts * (fraction * probs.mean(dim=0)).sum()
    if config.router_importance_loss_coef:
        importance = probs.sum(dim=0)
        cv2 = importance.var(unbiased=False) / (importance.mean() ** 2 + 1e-9)
        loss = loss + config.router_importance_loss_coef * cv2
    if config.router_z_loss_coef:
        loss = loss + config.router_z_loss_coef * torch.logsumexp(logits, dim=-1).pow(2).mean()
    return loss


# --------------------------------------------------------------------------------------------------------------
# Layers and encoder
# --------------------------------------------------------------------------------------------------------------


class VMoELayer(GradientCheckpointingLayer):
    """A pre-norm ViT block whose MLP is dense or a sparse MoE block."""

    def __init__(self, config: VMoEConfig, layer_idx: int):
        super().__init__()
        self.is_moe = layer_idx in config.moe_layers
        self.attention = VMoEAttention(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VMoESparseMoeBlock(config) if self.is_moe else VMoEMLP(config)
        use_scale = config.layerscale_value is not None
        self.layer_scale1 = VMoELayerScale(config) if use_scale else nn.Identity()
        self.layer_scale2 = VMoELayerScale(config) if use_scale else nn.Identity()
        self.drop_path = VMoEDropPath(config.drop_path_rate) if config.drop_path_rate > 0 else nn.Identity()
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, attention_mask=None, top_k_index=None, top_k_weights=None, **kwargs):
        """Routing tensors travel as plain tensors (not a dataclass) so gradient checkpointing, reentrant or not,
        keeps the router's gradient path. Returns (hidden_states, attention weights, router logits, top-k index,
        top-k weights, capacity keep mask); the last four are None for a dense block or a given image routing."""
        attn_output, attn_weights = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)
        hidden_states = hidden_states + self.drop_path(self.layer_scale1(self.dropout(attn_output)))
        normed = self.layernorm_after(hidden_states)
        routing = None
        if not self.is_moe:
            mlp_output = self.mlp(normed)
        elif top_k_index is not None:  # a plan made by the encoder's shared image router
            mlp_output, _ = self.mlp(normed, VMoERouting(None, top_k_index, top_k_weights))
        else:
            mlp_output, routing = self.mlp(normed)
        hidden_states = hidden_states + self.drop_path(self.layer_scale2(self.dropout(mlp_output)))
        if routing is None:
            return hidden_states, attn_weights, None, None, None, None
        return hidden_states, attn_weights, routing.logits, routing.top_k_index, routing.top_k_weights, routing.keep


@dataclass
class _EncoderOutput:
    last_hidden_state: torch.Tensor
    hidden_states: tuple | None
    attentions: tuple | None
    routings: list


class VMoEEncoder(nn.Module):
    def __init__(self, config: VMoEConfig):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([VMoELayer(config, i) for i in range(config.num_hidden_layers)])
        shared = config.is_moe and config.routing_level == "image" and config.shared_router
        self.router = VMoETopKRouter(config) if shared else None
        self.first_moe_layer = config.moe_layers[0] if config.is_moe else -1
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        superclass_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> _EncoderOutput:
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        routings = []
        shared_routing = None
        for idx, layer in enumerate(self.layer):
            if idx == self.first_moe_layer and self.router is not None:
                shared_routing = self.shared_route(hidden_states, superclass_labels)
                routings.append(shared_routing)
            index = weights = None
            if layer.is_moe and shared_routing is not None:
                index, weights = shared_routing.top_k_index, shared_routing.top_k_weights
            hidden_states, attn_weights, *plan = layer(hidden_states, None, index, weights)
            if plan[0] is not None:
                routings.append(VMoERouting(*plan))
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        return _EncoderOutput(hidden_states, all_hidden_states, all_attentions, routings)

    def shared_route(self, hidden_states: torch.Tensor, superclass_labels: torch.Tensor | None) -> VMoERouting:
        """Mobile V-MoE: one decision per image, from the hidden states entering the first MoE block. With
        `train_routing="superclass"`, training images go to their super-class's expert (slot 0)."""
        pooled = pool_for_router(hidden_states, self.config.router_input)
        forced = None
        if self.training and self.config.train_routing == "superclass" and superclass_labels is not None:
            forced = superclass_labels.view(-1, 1)
            if self.router.top_k > 1:  # fill the other slots with the router's best other experts
                with torch.no_grad():
                    scores = F.linear(pooled.float(), self.router.weight.float()).scatter(1, forced, float("-inf"))
                    forced = torch.cat([forced, scores.topk(self.router.top_k - 1, dim=-1).indices], dim=1)
        return route(self.router, pooled, self.config, forced)


# --------------------------------------------------------------------------------------------------------------
# Pre-trained model and heads
# --------------------------------------------------------------------------------------------------------------


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
    _keep_in_fp32_modules_strict = ["router"]  # the router stays float32 when loaded in fp16 / bf16

    def __init__(self, config: VMoEConfig, *inputs, **kwargs):
        config.validate_vmoe()
        super().__init__(config, *inputs, **kwargs)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """torch's grouped_mm needs expert widths that are multiples of 8: by default fall back to eager for other
        widths; when grouped_mm is asked for explicitly (`experts_implementation="grouped_mm"` at load or init,
        `set_experts_implementation("grouped_mm")`) raise a ValueError naming the widths.
        Default (nothing requested): `eager` when no GPU is present (measured fastest on CPU, the README (Performance)), else
        transformers' default `grouped_mm`."""
        config = self.config
        if requested_experts is None and not torch.cuda.is_available():
            return "eager"
        if config.is_moe and (config.hidden_size % 8 or config.expert_intermediate_size % 8):
            if requested_experts == "grouped_mm":
                config.validate_vmoe(experts_implementation="grouped_mm")
            if requested_experts is None:
                return "eager"
        return super().get_correct_experts_implementation(requested_experts)

    _head_prefixes = ("classifier.", "decode_head.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, stricter about checkpoints that do not fit (a VMoE with missing or
        re-initialised experts looks fine and predicts nonsense):

        - tensors whose shape differs from the model's (e.g. another `num_experts`) and tensors of the model body
          missing from the checkpoint (e.g. expert or router weights) raise a ValueError listing every one of them;
          with `ignore_mismatched_sizes=True` they are re-initialised with a warning, as in transformers. Missing
          task-head weights (`classifier`, `decode_head`) are re-initialised with a warning, as in transformers.
        - a truncated or corrupt `model.safetensors` raises a ValueError naming the checkpoint.
        """
        from safetensors import SafetensorError

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
        if not ignore_mismatched_sizes:
            problems = [
                f"  {key}: checkpoint shape {tuple(ckpt)} != model shape {tuple(mine)}"
                for key, ckpt, mine in sorted(info["mismatched_keys"], key=lambda item: item[0])
            ]
            problems += [
                f"  {key}: missing from the checkpoint"
                for key in sorted(info["missing_keys"])
                if not key.startswith(cls._head_prefixes)
            ]
            if problems:
                raise ValueError(
                    f"The checkpoint {pretrained_model_name_or_path!r} does not fit {cls.__name__} with this config "
                    f"(num_experts={model.config.num_experts}, moe_layers={model.config.moe_layers}):\n"
                    + "\n".join(problems)
                    + "\nPass ignore_mismatched_sizes=True to re-initialise these weights instead."
                )
        return (model, info) if output_loading_info else model

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
            init.trunc_normal_(module.cls_token, mean=0.0, std=std)
        elif isinstance(module, VMoEExperts):
            init.trunc_normal_(module.up_proj, mean=0.0, std=std)
            init.trunc_normal_(module.down_proj, mean=0.0, std=std)
            init.zeros_(module.up_proj_bias)
            init.zeros_(module.down_proj_bias)
        elif isinstance(module, VMoETopKRouter):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, VMoELayerScale):
            init.constant_(module.lambda1, self.config.layerscale_value)

    def _validate_pixel_values(self, pixel_values, interpolate_pos_encoding):
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be 4D (batch, {self.config.num_channels}, height, width), "
                f"got shape {tuple(pixel_values.shape)}"
            )
        batch, channels, height, width = pixel_values.shape
        if batch == 0:
            raise ValueError(f"pixel_values is an empty batch: shape {tuple(pixel_values.shape)}")
        if channels != self.config.num_channels:
            raise ValueError(
                f"pixel_values has {channels} channels but the model expects {self.config.num_channels}: "
                f"expected shape (batch, {self.config.num_channels}, height, width), got {tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be a floating-point tensor (normalised pixels), got dtype {pixel_values.dtype}; "
                "run the image processor first"
            )
        if not (torch.compiler.is_compiling() or torch.jit.is_tracing() or _is_exporting()):
            # one reduction: the sum is NaN/inf whenever an element is (or, harmlessly, if finite values overflow);
            # only then pay for the elementwise check that counts them. A full isfinite pass cost ~2% at batch 1.
            finite = torch.isfinite(pixel_values) if not torch.isfinite(pixel_values.sum()) else None
            if finite is not None and not bool(finite.all()):
                raise ValueError(
                    f"pixel_values contains {int((~finite).sum())} NaN or infinite values (of {pixel_values.numel()}); "
                    "the router would send such images to arbitrary experts and every output would be NaN"
                )
        image_size = _pair(self.config.image_size)
        patch = _pair(self.config.patch_size)
        if interpolate_pos_encoding:
            if height % patch[0] or width % patch[1]:
                raise ValueError(
                    f"Input image size ({height}x{width}) must be divisible by the patch size {patch[0]}x{patch[1]}"
                )
        elif (height, width) != image_size:
            raise ValueError(
                f"Input image size ({height}x{width}) doesn't match the model ({image_size[0]}x{image_size[1]}); "
                "pass interpolate_pos_encoding=True to run at another resolution"
            )


class VMoEModel(VMoEPreTrainedModel):
    """The bare VMoE transformer: embeddings, blocks, final layer norm. Computes the routing aux losses."""

    def __init__(self, config: VMoEConfig):
        super().__init__(config)
        self.embeddings = VMoEEmbeddings(config)
        self.encoder = VMoEEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.patch_embeddings

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        superclass_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> VMoEModelOutput:
        r"""
        superclass_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Super-class of each image (image routing): adds the router's super-class cross-entropy to `aux_loss` and
            drives routing in training when `config.train_routing == "superclass"`.
        """
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_router_logits = config.output_router_logits if output_router_logits is None else output_router_logits
        self._validate_pixel_values(pixel_values, interpolate_pos_encoding)
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        embeddings = self.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))
        encoded = self.encoder(
            embeddings,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            superclass_labels=superclass_labels,
        )
        sequence_output = self.layernorm(encoded.last_hidden_state)
        if config.pooling == "cls":
            pooled = sequence_output[:, 0]
        elif config.pooling == "mean":
            pooled = sequence_output[:, 1:].mean(dim=1)
        else:
            pooled = torch.cat([sequence_output[:, 0], sequence_output[:, 1:].mean(dim=1)], dim=-1)
        output = VMoEModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=pooled,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )
        routings = encoded.routings
        if routings:
            output.aux_loss = sum(router_losses(r, config.num_experts, config) for r in routings) / len(routings)
            output.expert_counts = torch.stack(
                [F.one_hot(r.top_k_index, config.num_experts).mul(
                    r.keep.unsqueeze(-1) if r.keep is not None else 1).sum(dim=(0, 1)) for r in routings]
            )
            if output_router_logits:
                output.router_logits = tuple(r.logits for r in routings)
            if superclass_labels is not None and config.routing_level == "image":
                ce = torch.stack([F.cross_entropy(r.logits, superclass_labels) for r in routings]).mean()
                acc = torch.stack([(r.logits.argmax(-1) == superclass_labels).float().mean() for r in routings]).mean()
                output.superclass_loss = ce
                output.superclass_accuracy = acc
                output.aux_loss = output.aux_loss + config.superclass_loss_coef * ce
        return output


def _superclass_labels(config: VMoEConfig, labels: torch.Tensor | None) -> torch.Tensor | None:
    if labels is None or config.superclass_ids is None or labels.ndim != 1:
        return None
    table = torch.tensor(config.superclass_ids, device=labels.device)
    return table[labels]


class VMoEForImageClassification(VMoEPreTrainedModel):
    """VMoE with a linear classifier on the pooled output (class token by default). `loss` includes the routing
    aux losses and, with `config.superclass_ids`, the router's super-class loss."""

    accepts_loss_kwargs = False

    def __init__(self, config: VMoEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vmoe = VMoEModel(config)
        in_features = config.hidden_size * (2 if config.pooling == "cls_mean" else 1)
        self.classifier = nn.Linear(in_features, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
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
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits,
            superclass_labels=_superclass_labels(self.config, labels),
        )
        logits = self.classifier(outputs.pooler_output)
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
            router_logits=outputs.router_logits,
            aux_loss=outputs.aux_loss,
            superclass_loss=outputs.superclass_loss,
            superclass_accuracy=outputs.superclass_accuracy,
            expert_counts=outputs.expert_counts,
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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> VMoESemanticSegmenterOutput:
        if labels is not None:
            _validate_segmentation_labels(labels, pixel_values, self.num_labels)
        outputs = self.vmoe(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits,
        )
        height, width = pixel_values.shape[-2:]
        patch = self.vmoe.embeddings.patch_size
        tokens = outputs.last_hidden_state[:, 1:]
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
            router_logits=outputs.router_logits,
            aux_loss=outputs.aux_loss,
            expert_counts=outputs.expert_counts,
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
    transformers' UperNet and other decode heads. `aux_loss` carries the routing losses."""

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
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs,
    ) -> VMoEBackboneOutput:
        config = self.config
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_router_logits = config.output_router_logits if output_router_logits is None else output_router_logits
        self._validate_pixel_values(pixel_values, interpolate_pos_encoding)
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        embeddings = self.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))
        encoded = self.encoder(embeddings, output_attentions=output_attentions, output_hidden_states=True)
        batch_size, _, height, width = pixel_values.shape
        patch = self.embeddings.patch_size
        feature_maps = ()
        for stage, hidden_state in zip(self.stage_names, encoded.hidden_states):
            if stage in self.out_features:
                if config.apply_layernorm:
                    hidden_state = self.layernorm(hidden_state)
                if config.reshape_hidden_states:
                    hidden_state = hidden_state[:, 1:].reshape(batch_size, height // patch[0], width // patch[1], -1)
                    hidden_state = hidden_state.permute(0, 3, 1, 2).contiguous()
                feature_maps += (hidden_state,)
        routings = encoded.routings
        aux_loss = None
        if routings:
            aux_loss = sum(router_losses(r, config.num_experts, config) for r in routings) / len(routings)
        return VMoEBackboneOutput(
            feature_maps=feature_maps,
            hidden_states=encoded.hidden_states if output_hidden_states else None,
            attentions=encoded.attentions,
            aux_loss=aux_loss,
            router_logits=tuple(r.logits for r in routings) if (routings and output_router_logits) else None,
        )


__all__ = [
    "VMoEBackbone",
    "VMoEForImageClassification",
    "VMoEForSemanticSegmentation",
    "VMoEModel",
    "VMoEPreTrainedModel",
    "VMoEExperts",
    "VMoETopKRouter",
    "VMoESparseMoeBlock",
    "VMoERouting",
    "VMoEModelOutput",
    "VMoEImageClassifierOutput",
    "VMoESemanticSegmenterOutput",
    "VMoEBackboneOutput",
]
