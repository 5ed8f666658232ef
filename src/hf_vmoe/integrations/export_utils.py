"""What the ONNX (`integrations.onnx`) and ExecuTorch (`integrations.executorch`) exporters share: the checks of the
model, example and calibration images (each raising a ValueError that names what does not fit, before anything is
written), the wrapper that turns a model into `pixel_values -> logits (+ router logits)`, eval mode and the export
experts backend for the duration of an export, atomic writes, the comparison of an exported program's outputs with
PyTorch's, and `int8_expert_weights` (weight-only int8 for the experts' stacked weights, used by both).

Imports torch only: the runtimes are imported by the exporters when they are used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..configuration_vmoe import to_pair

__all__ = ["INPUT_NAME", "INT8_MIN_CORRELATION", "QUANTIZE_CHOICES", "TOKEN_ROUTING_EXECUTORCH", "int8_expert_weights"]

INPUT_NAME = "pixel_values"
QUANTIZE_CHOICES = (None, "int8")

TOKEN_ROUTING_EXECUTORCH = (
    "token routing (routing_level='token') cannot be exported to ExecuTorch without per-token copies of the expert "
    "weights: the `eager` experts backend sizes each expert's matmul by how many tokens it receives, a "
    "data-dependent shape torch.export rejects; `grouped_mm` exports but lowers to transformers' custom op "
    "`transformers::grouped_mm_fallback` (plus `aten.histc`, outside the Core ATen opset), which has no ExecuTorch "
    "kernel; and the static-shape `batched_mm` (the one that lowers) gathers one copy of the k experts' weights per "
    "token, tokens x k x 2 x hidden x expert width floats per MoE block (about 230 MB for 197 tokens, k=2, "
    "192 x 768). Running every expert on every token instead would cost E/k times the active FLOPs. Export image "
    "routing (Mobile V-MoE) to ExecuTorch, or a token-routed model with export_onnx"
)


def _is_moe(model) -> bool:
    return bool(getattr(model.config, "is_moe", False))


def _check_model(model, runtime: str) -> None:
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or config is None:
        raise ValueError(f"model must be a transformers image model with a .config, got {type(model).__name__}")
    for name in ("image_size", "num_channels"):
        if getattr(config, name, None) is None:
            raise ValueError(f"model.config has no {name!r}: cannot build or check the example input")
    if not _is_moe(model):
        return
    if config.eval_capacity_factor is not None:
        raise ValueError(
            f"eval_capacity_factor={config.eval_capacity_factor} cannot be exported: dropping at inference has "
            "data-dependent shapes and makes an image's output depend on the other images of its batch; set "
            "config.eval_capacity_factor = None (dropless, the default) before exporting"
        )
    if runtime == "executorch" and config.routing_level == "token":
        raise ValueError(TOKEN_ROUTING_EXECUTORCH)


def _check_quantize(quantize) -> None:
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _expected_shape(model) -> tuple[int, int, int]:
    return (model.config.num_channels, *to_pair(model.config.image_size))


def _check_images(model, images, what: str) -> torch.Tensor:
    """`images` as a (B, C, H, W) float tensor of the model's shape and dtype, contiguous and finite; ValueError
    naming `what` otherwise."""
    shape = _expected_shape(model)
    wanted = f"(batch, {shape[0]}, {shape[1]}, {shape[2]})"
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor of shape {wanted}, got {type(images).__name__}")
    if images.dim() != 4 or tuple(images.shape[1:]) != shape or images.shape[0] < 1:
        raise ValueError(f"{what} has shape {tuple(images.shape)}, but the model expects {wanted}")
    if not images.is_floating_point():
        raise ValueError(f"{what} must be floating point (normalised pixels), got {images.dtype}")
    if not images.is_contiguous():
        raise ValueError(
            f"{what} is not contiguous (strides {images.stride()}): the exported program takes its input layout "
            f"from the example; pass {what}.contiguous()"
        )
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{what} contains NaN or infinite values")
    if images.device != torch.device("cpu"):
        raise ValueError(f"{what} must be on the CPU, got {images.device}")
    dtype = _model_dtype(model)
    if images.dtype != dtype:
        raise ValueError(f"{what} has dtype {images.dtype} but the model's parameters are {dtype}")
    return images


def _example(model, example, batch_size: int) -> torch.Tensor:
    if example is not None:
        return _check_images(model, example, "example")
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, *_expected_shape(model), generator=generator).to(_model_dtype(model))


def _calibration_batches(model, calibration, batch_size: int | None) -> list[torch.Tensor]:
    """Calibration images as a list of batches of `batch_size` images (None: the batches as given). A trailing
    partial batch is dropped when a fixed size is needed (a batch-1 program needs batches of one)."""
    if calibration is None:
        raise ValueError(
            "quantize='int8' needs calibration=...: real images, a (N, C, H, W) tensor or an iterable of such "
            "batches, preprocessed like the model's inputs (activation ranges calibrated on noise are wrong)"
        )
    batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
    if not batches:
        raise ValueError("calibration is empty")
    checked = []
    for i, batch in enumerate(batches):
        if isinstance(batch, dict):
            batch = batch.get(INPUT_NAME)
        if isinstance(batch, torch.Tensor):
            batch = batch.to(_model_dtype(model)).contiguous()
        checked.append(_check_images(model, batch, f"calibration batch {i}"))
    if batch_size is None:
        return checked
    images = torch.cat(checked)
    if images.shape[0] < batch_size:
        raise ValueError(f"calibration has {images.shape[0]} images, fewer than one batch of {batch_size}")
    usable = images.shape[0] - images.shape[0] % batch_size
    return list(images[:usable].split(batch_size))


class _ExportWrapper(nn.Module):
    """pixel_values -> logits (+ the first router call's logits, float32, when `with_router_logits`). Works for
    VMoE models and for transformers' dense image classifiers (no router)."""

    def __init__(self, model: nn.Module, with_router_logits: bool):
        super().__init__()
        self.model = model
        self.with_router_logits = with_router_logits
        self.is_vmoe = getattr(model.config, "model_type", None) == "vmoe"

    def forward(self, pixel_values: torch.Tensor):
        kwargs = {"output_router_logits": self.with_router_logits} if self.is_vmoe else {}
        out = self.model(pixel_values=pixel_values, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
        if self.with_router_logits:
            return logits, out.router_logits[0]
        return logits


def _check_router_logits(model, with_router_logits: bool) -> None:
    if with_router_logits and not _is_moe(model):
        raise ValueError("with_router_logits=True needs an MoE model (this one has no router)")


@contextlib.contextmanager
def _export_ready(model, token_backend: str | None = "batched_mm"):
    """Eval mode and, for token routing, the `batched_mm` experts backend; restored afterwards."""
    config = model.config
    was_training = model.training
    previous = None
    if token_backend and _is_moe(model) and config.routing_level == "token":
        previous = model.get_experts_implementation()
        model.set_experts_implementation(token_backend)
    model.eval()
    try:
        yield
    finally:
        if previous is not None:
            model.set_experts_implementation(previous)
        model.train(was_training)


@contextlib.contextmanager
def _staged(path: Path):
    """Yield a path in a fresh temporary folder beside `path`; on success it is renamed onto `path` (atomic on one
    file system), on any error it is deleted with its folder. Nothing partial is ever left at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        staged = folder / path.name
        yield staged
        if not staged.is_file():
            raise RuntimeError(f"the exporter wrote no file for {path}")
        os.replace(staged, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _max_abs_diff(expected: torch.Tensor, got) -> float:
    got = torch.as_tensor(got)
    return float((got.float() - expected.float()).abs().max())


INT8_MIN_CORRELATION = 0.8


def _min_correlation(expected: torch.Tensor, got: torch.Tensor) -> float:
    """Smallest per-image Pearson correlation between two (B, ...) outputs (1.0 for identical outputs)."""
    e = expected.float().reshape(expected.shape[0], -1)
    g = got.float().reshape(got.shape[0], -1)
    e, g = e - e.mean(dim=1, keepdim=True), g - g.mean(dim=1, keepdim=True)
    denom = (e.norm(dim=1) * g.norm(dim=1)).clamp(min=1e-12)
    corr = (e * g).sum(dim=1) / denom
    same = (e - g).abs().amax(dim=1) <= 1e-6  # constant outputs that agree
    return float(torch.where(same, torch.ones_like(corr), corr).min())


def _check_outputs(runtime: str, names, expected, got, atol: float, int8: bool, compare_values: bool = True) -> None:
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    if len(got) != len(expected):
        raise RuntimeError(f"{runtime} program returned {len(got)} outputs, expected {len(expected)}")
    for name, e, g in zip(names, expected, got):
        g = torch.as_tensor(g)
        if tuple(g.shape) != tuple(e.shape):
            raise RuntimeError(f"{runtime} output {name!r} has shape {tuple(g.shape)}, PyTorch {tuple(e.shape)}")
        if not bool(torch.isfinite(g).all()):
            raise RuntimeError(f"{runtime} output {name!r} has NaN or infinite values")
        if not compare_values:
            continue
        if int8:  # vs float32 PyTorch: int8 changes the values; this catches a broken program, not small drift
            corr = _min_correlation(e, g)
            if corr < INT8_MIN_CORRELATION:
                raise RuntimeError(
                    f"int8 {runtime} output {name!r} correlates with float32 PyTorch at only {corr:.3f} "
                    f"(< {INT8_MIN_CORRELATION}, the worst image of the check batch): quantization broke the model"
                )
            continue
        diff = _max_abs_diff(e, g)
        if diff > atol:
            raise RuntimeError(f"{runtime} output {name!r} differs from PyTorch by {diff:.3g} (> atol={atol})")


def int8_expert_weights(gm: torch.fx.GraphModule) -> int:
    """Weight-only int8 for the experts' stacked weights, in place on an (unlifted) exported GraphModule.

    Each float (E, out, in) stack read through `aten.index.Tensor(stack, [index])` (the per-image gather of the
    static image-routing path, or `batched_mm`'s per-token gather) becomes an int8 stack plus one float32 scale per
    (expert, output row) (symmetric, round to nearest): the program gathers the int8 rows and the scales of the
    selected experts only and dequantizes just those (E / k times less work than dequantizing the stack). Returns
    how many stacks were replaced."""
    replaced = {}  # stack's get_attr target -> (int8 target, scale target)
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.index.Tensor:
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or source.op != "get_attr":
            continue
        owner_path, _, leaf = source.target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        weight = getattr(owner, leaf)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or not weight.is_floating_point():
            continue
        if source.target not in replaced:  # one int8 copy per stack, however many slots gather from it
            with torch.no_grad():
                w = weight.detach().float()
                scale = (w.abs().amax(dim=2, keepdim=True) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
                q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
            owner.register_buffer(f"{leaf}_int8", q)
            owner.register_buffer(f"{leaf}_int8_scale", scale.to(weight.dtype))
            prefix = f"{owner_path}." if owner_path else ""
            replaced[source.target] = (f"{prefix}{leaf}_int8", f"{prefix}{leaf}_int8_scale")
        q_target, s_target = replaced[source.target]
        with graph.inserting_before(node):
            q_node = graph.get_attr(q_target)
            s_node = graph.get_attr(s_target)
            q_rows = graph.call_function(torch.ops.aten.index.Tensor, (q_node, *node.args[1:]))
            s_rows = graph.call_function(torch.ops.aten.index.Tensor, (s_node, *node.args[1:]))
            as_float = graph.call_function(torch.ops.aten._to_copy.default, (q_rows,), {"dtype": weight.dtype})
            dequantized = graph.call_function(torch.ops.aten.mul.Tensor, (as_float, s_rows))
        node.replace_all_uses_with(dequantized)
        graph.erase_node(node)
        if not source.users:
            graph.erase_node(source)
            if isinstance(getattr(owner, leaf), nn.Parameter):
                delattr(owner, leaf)
            else:
                owner._buffers.pop(leaf, None)
    graph.lint()
    gm.recompile()
    return len(replaced)
