"""Device export: ONNX (onnxruntime) and ExecuTorch (XNNPACK delegate, `.pte`), in float32 or int8.

    from hf_vmoe.integrations.export import export_onnx, OnnxVMoE, export_executorch, ExecuTorchVMoE
    export_onnx(model, "vmoe.onnx")                    # dynamic batch; batch_size=1 + dynamic_batch=False for a fixed one
    logits = OnnxVMoE("vmoe.onnx")(pixel_values)       # numpy in, numpy out (onnxruntime, CPU)
    export_executorch(model, "vmoe.pte")               # batch 1 (the example's shape), XNNPACK
    logits = ExecuTorchVMoE("vmoe.pte")(pixel_values)  # torch in, torch out (ExecuTorch's Python runtime)
    # int8, calibrated on real images (a (N, C, H, W) tensor or an iterable of batches):
    export_executorch(model, "vmoe-int8.pte", quantize="int8", calibration=pixel_values)
    export_onnx(model, "vmoe-int8.onnx", quantize="int8", calibration=pixel_values)

Image routing (Mobile V-MoE) exports as is: under `torch.export` the experts take their trace-friendly path
(`VMoEExperts.forward_images` gathers each image's expert weights and runs one batched matmul), so the graph has no
data-dependent shapes and each image still only uses its own k experts' weights. Shared experts and the dense twin
(`moe_layers="none"`) export the same way; so does transformers' `ViTForImageClassification` (the benchmarks'
dense reference).

Token routing exports to ONNX with the experts interface's `batched_mm` backend (`export_onnx` switches to it for
the export and switches back afterwards): `grouped_mm` lowers to a transformers custom op
(`transformers::grouped_mm_fallback`) with no ONNX translation, and `eager` loops over the experts that received
tokens, a data-dependent shape `torch.export` rejects. `batched_mm` gathers a copy of the expert weights per token,
so the exported token-routed model is correct but memory hungry (per MoE block: tokens x k x 2 x hidden x expert
width floats). ExecuTorch refuses token routing for that reason (see `TOKEN_ROUTING_EXECUTORCH`). A capacity at
inference (`eval_capacity_factor`) is not exportable to either (data-dependent dropping, and an image's result
would depend on the other images of its batch); the default is dropless.

int8 (`quantize="int8"`):
- ExecuTorch: PT2E static quantization with ExecuTorch's `XNNPACKQuantizer` (symmetric int8, per-channel weights,
  activations calibrated on `calibration`), lowered to XNNPACK's int8 kernels. The experts' stacked weights are
  gathered per image at run time, so they stay float32 (XNNPACK quantizes linear layers with constant weights).
- ONNX Runtime: `onnxruntime.quantization` dynamic (default: int8 weights, activations quantized per call, no
  calibration needed) or static (QDQ, calibrated on `calibration`).
- The image router stays float32: in ExecuTorch always (it runs in the model's autocast-disabled region, a wrapped
  submodule the PT2E quantizer does not enter); in ONNX Runtime dynamic mode always (the router is a `Gemm`, which
  dynamic quantization leaves alone), and in static mode unless `quantize_router=True`. Measured on the demo model
  it made no difference to accuracy, and the router is a few thousand multiply-adds per image.
Accuracy and agreement with float32 on real images are measured in `benchmarks/bench_quantization.py` and
reported in docs/export.md.

Every file is written atomically: built and verified in a temporary folder beside `path`, then renamed onto it; an
error leaves nothing behind (and an existing file at `path` untouched).

onnx, onnxruntime and onnxscript are the `onnx` extra (`pip install "hf-vmoe[onnx]"`); ExecuTorch is the
`executorch` extra (`pip install "hf-vmoe[executorch]"`, executorch 1.4.x, built for torch 2.13).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from ..configuration_vmoe import to_pair
from .extras import muted_loggers, require

OPSET_VERSION = 18
INPUT_NAME = "pixel_values"
QUANTIZE_CHOICES = (None, "int8")
ONNX_QUANTIZATION_MODES = ("dynamic", "static")

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


# --------------------------------------------------------------------------------------------------------------
# Checks shared by both exporters
# --------------------------------------------------------------------------------------------------------------


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
def _native_stderr_without(*markers: str):
    """Hold back the lines containing one of `markers` that native code writes to file descriptor 2 for the
    duration; the other lines are written out afterwards. (ExecuTorch's runtime reports from C++, through no logger,
    every probe of /sys/devices/... its CPU detection makes and every thread-pool resize.)"""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().splitlines(keepends=True)
                    if not any(marker.encode() in line for marker in markers)]
            if kept:
                os.write(2, b"".join(kept))


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


# --------------------------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------------------------


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example: torch.Tensor | None = None,
    *,
    batch_size: int = 1,
    dynamic_batch: bool = True,
    with_router_logits: bool = False,
    quantize: str | None = None,
    quantization: str = "dynamic",
    calibration=None,
    quantize_router: bool = False,
    quantize_experts: bool = True,
    opset_version: int = OPSET_VERSION,
    verify: bool = True,
    atol: float | None = None,
) -> Path:
    """Export a VMoE model (classification head: logits; bare model: last hidden state) to ONNX at `path`.

    example: the (B, C, H, W) batch to trace with (default: `batch_size` random images). dynamic_batch: the batch
        dimension is symbolic (any size at run time); False fixes it to the example's batch.
    with_router_logits: a second output `router_logits` (first router call, (batch, E) for image routing).
    quantize: None (float32) or "int8" (onnxruntime quantization; `quantization="dynamic"`, the default, needs no
        data; `"static"` calibrates activation ranges on `calibration`). quantize_router: also quantize the
        router's linear layer (static mode only; default False: it stays float32). quantize_experts: the experts'
        stacked weights (gathered per image, which onnxruntime's quantizer does not cover) become weight-only int8
        (`int8_expert_weights`, applied before the ONNX export); False keeps them float32.
    verify: run the file with onnxruntime on the example and raise if it differs from PyTorch by more than `atol`
        (float32, default 1e-4); int8 must correlate with float32 (per-image Pearson correlation of the outputs
        >= INT8_MIN_CORRELATION = 0.8) on the first calibration batch (without `calibration`, int8 is only checked to run: shapes and finite values; the
        ranges of random pixels say nothing about real images).
    Returns the path. The model is left in the mode (train/eval) and experts backend it came in. Raises ValueError
    (before writing anything) for a capacity at inference, a bad example or bad options.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    _check_model(model, "onnx")
    _check_quantize(quantize)
    _check_router_logits(model, with_router_logits)
    if quantization not in ONNX_QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {ONNX_QUANTIZATION_MODES}, got {quantization!r}")
    example = _example(model, example, batch_size)
    calib = None
    if quantize and quantization == "static":
        calib = _calibration_batches(model, calibration, None if dynamic_batch else example.shape[0])
    if atol is None:
        atol = 1e-4
    for module in ("onnxscript", "onnx") + (("onnxruntime",) if verify or quantize else ()):
        require(module, purpose="ONNX export")  # torch.onnx.export(dynamo=True) needs onnxscript and onnx
    path = Path(path)
    output_names = ["logits", "router_logits"] if with_router_logits else ["logits"]
    with _export_ready(model), torch.no_grad():
        wrapper = _ExportWrapper(model, with_router_logits).eval()
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
        with _staged(path) as staged:
            fp32_path = staged.with_name("fp32-" + staged.name) if quantize else staged
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                source = wrapper
                if quantize and quantize_experts:
                    # torch.export specialises a size-1 dimension: trace a dynamic batch with two images
                    trace = example.repeat(2, 1, 1, 1) if dynamic_batch and example.shape[0] == 1 else example
                    source = torch.export.export(wrapper, (trace,), dynamic_shapes=dynamic_shapes).module()
                    int8_expert_weights(source)
                # the exporter logs one "torchvision is not installed" line per torchvision op it would register
                with muted_loggers("torch.onnx._internal.exporter._registration"):
                    torch.onnx.export(
                        source,
                        (example,),
                        str(fp32_path),
                        dynamo=True,
                        input_names=[INPUT_NAME],
                        output_names=output_names,
                        dynamic_shapes=dynamic_shapes,
                        opset_version=opset_version,
                        external_data=False,
                        verbose=False,
                    )
            if quantize:
                quantize_onnx(fp32_path, staged, mode=quantization, calibration=calib,
                              quantize_router=quantize_router)
            if verify:  # int8: values on a real (calibration) batch; random pixels only check that it runs
                fixed = None if dynamic_batch else example.shape[0]
                real = calib or (_calibration_batches(model, calibration, fixed) if quantize and calibration is not None
                                 else None)
                check = real[0] if quantize and real else example
                _check_outputs("ONNX", output_names, wrapper(check), OnnxVMoE(staged).run(check), atol,
                               int8=bool(quantize), compare_values=not quantize or bool(real))
    return path


def _onnx_router_nodes(model_proto) -> list[str]:
    """Names of the nodes the exporter traced from a router module (`VMoETopKRouter`), read from the
    `pkg.torch.onnx.class_hierarchy` metadata torch.onnx's dynamo exporter writes on every node."""
    names = []
    for node in model_proto.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        if "VMoETopKRouter" in props.get("pkg.torch.onnx.class_hierarchy", ""):
            names.append(node.name)
    return names


class _Reader:
    """onnxruntime CalibrationDataReader over a list of batches."""

    def __init__(self, batches):
        self._batches = iter(batches)

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch.detach().cpu().float().numpy()}


def quantize_onnx(
    src: str | Path,
    dst: str | Path,
    *,
    mode: str = "dynamic",
    calibration=None,
    quantize_router: bool = False,
    per_channel: bool = True,
    reduce_range: bool = True,
) -> Path:
    """int8 copy of an exported float32 ONNX file (onnxruntime.quantization). mode="dynamic": int8 weights,
    activations quantized on the fly (MatMulInteger); "static": QDQ with activation ranges from `calibration` (a list
    of (B, C, H, W) batches). Router nodes stay float32 unless `quantize_router`.

    reduce_range: 7-bit weights. onnxruntime's int8 kernels on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI)
    add pairs of 8-bit products in 16 bits, which saturates with full-range weights; measured on a digits model on
    such a CPU, 8-bit weights routed 89% (dynamic) / 95% (static) of the images like float32, 7-bit weights 99%.
    The file may run on any CPU, so 7 bits is the default; False gives 8-bit weights for ARM or VNNI targets."""
    onnx = require("onnx", purpose="ONNX int8 quantization")
    require("onnxruntime.quantization", purpose="ONNX int8 quantization")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode not in ONNX_QUANTIZATION_MODES:
        raise ValueError(f"mode must be one of {ONNX_QUANTIZATION_MODES}, got {mode!r}")
    src, dst = Path(src), Path(dst)
    exclude = [] if quantize_router else _onnx_router_nodes(onnx.load(str(src), load_external_data=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "dynamic":
            quantize_dynamic(str(src), str(dst), per_channel=per_channel, reduce_range=reduce_range,
                             weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                             op_types_to_quantize=["MatMul", "Gemm", "Conv"])
        else:
            if not calibration:
                raise ValueError("static ONNX quantization needs calibration batches")
            quantize_static(
                str(src), str(dst), _Reader(calibration), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                reduce_range=reduce_range, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude, op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
    return dst


class OnnxVMoE:
    """An onnxruntime CPU session of an exported VMoE. `__call__(pixel_values)` returns the logits;
    `run(pixel_values)` returns every output. Accepts torch tensors or numpy arrays."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, intra_op_num_threads: int | None = None):
        ort = require("onnxruntime", purpose="Running an ONNX file")

        options = ort.SessionOptions()
        if intra_op_num_threads is not None:
            options.intra_op_num_threads = intra_op_num_threads
            if intra_op_num_threads == 1:
                options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, pixel_values):
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.detach().cpu().float().numpy()
        return self.session.run(None, {INPUT_NAME: pixel_values})

    def __call__(self, pixel_values):
        return self.run(pixel_values)[0]


# --------------------------------------------------------------------------------------------------------------
# ExecuTorch
# --------------------------------------------------------------------------------------------------------------


def _require_executorch():
    require("executorch.exir", purpose="ExecuTorch export")


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


def _pt2e_int8(exported, batches):
    """PT2E static int8 with ExecuTorch's XNNPACK quantizer (symmetric, per-channel weights), calibrated on
    `batches`. Returns the converted GraphModule (q/dq reference ops in PyTorch)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    require("torchao.quantization.pt2e.quantize_pt2e", purpose="ExecuTorch int8 (PT2E)")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(exported.module(), quantizer)
    for batch in batches:
        prepared(batch)
    return convert_pt2e(prepared)


def export_executorch(
    model: nn.Module,
    path: str | Path,
    example: torch.Tensor | None = None,
    *,
    quantize: str | None = None,
    calibration=None,
    quantize_experts: bool = True,
    with_router_logits: bool = False,
    verify: bool = True,
    atol: float | None = None,
) -> Path:
    """Export an image-routed VMoE (or its dense twin, or a transformers ViT) to an ExecuTorch program at `path`:
    `torch.export` -> `to_edge_transform_and_lower` with the XNNPACK partitioner -> `.pte`.

    example: the (B, C, H, W) float batch the program is specialised to (default: one random image: batch 1, the
        on-device case). Must be contiguous and of the model's image shape and dtype.
    quantize: None (float32) or "int8" (PT2E with the XNNPACK quantizer; `calibration` = real preprocessed images,
        a (N, C, H, W) tensor or an iterable of batches, run through the observers `B` images at a time). The
        router always stays float32 (it runs in the model's autocast-disabled region, which the quantizer does
        not enter). quantize_experts: the experts' stacked weights (gathered per image at run time, which the
        XNNPACK quantizer does not cover) become weight-only int8 (`int8_expert_weights`); False keeps them float32.
    with_router_logits: a second output, the first router call's logits (B, E).
    verify: load the file in ExecuTorch's runtime, run the example and raise if it differs from PyTorch eager by
        more than `atol` (float32, default 1e-4); int8: run the first calibration batch, whose outputs must
        correlate with float32 eager's (per-image Pearson correlation >= INT8_MIN_CORRELATION = 0.8).
    Raises ValueError before writing anything for a token-routed model (`TOKEN_ROUTING_EXECUTORCH`), a capacity at
    inference, a bad example or bad options. Returns the path; the model is left in the mode it came in.
    """
    _check_model(model, "executorch")
    _check_quantize(quantize)
    _check_router_logits(model, with_router_logits)
    example = _example(model, example, 1)
    batches = _calibration_batches(model, calibration, example.shape[0]) if quantize else None
    if atol is None:
        atol = 1e-4
    _require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    path = Path(path)
    output_names = ["logits", "router_logits"] if with_router_logits else ["logits"]
    with _export_ready(model, token_backend=None), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapper = _ExportWrapper(model, with_router_logits).eval()
        exported = torch.export.export(wrapper, (example,))
        if quantize:
            converted = _pt2e_int8(exported, batches)
            if quantize_experts:
                int8_expert_weights(converted)
            exported = torch.export.export(converted, (example,))
        program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
        with _staged(path) as staged:
            staged.write_bytes(program.buffer)
            if verify:  # int8: on a real (calibration) batch; random pixels are outside the calibrated ranges
                check = batches[0] if quantize else example
                got = ExecuTorchVMoE(staged).run(check)
                _check_outputs("ExecuTorch", output_names, wrapper(check), got, atol, int8=bool(quantize))
    return path


def set_executorch_threads(num_threads: int) -> None:
    """Size of ExecuTorch's (process-wide) CPU thread pool, used by the XNNPACK delegate."""
    portable_lib = require("executorch.extension.pybindings.portable_lib", purpose="ExecuTorch's runtime")
    portable_lib._unsafe_reset_threadpool(int(num_threads))


class ExecuTorchVMoE:
    """An exported `.pte` program in ExecuTorch's Python runtime (`executorch.runtime`). `__call__(pixel_values)`
    returns the logits; `run(pixel_values)` returns every output (torch tensors). Accepts torch tensors or numpy
    arrays of the shape the program was exported with (`input_shape`).

    num_threads: resize ExecuTorch's process-wide thread pool (XNNPACK) first; None leaves it as it is."""

    def __init__(self, path: str | Path, num_threads: int | None = None):
        _require_executorch()
        from executorch.runtime import Runtime

        self.path = Path(path)
        with _native_stderr_without("cpuinfo_utils.cpp", "threadpool.cpp"):  # the thread pool probes the CPU
            if num_threads is not None:
                set_executorch_threads(num_threads)
            self.program = Runtime.get().load_program(self.path)
            self.method = self.program.load_method("forward")
        meta = self.method.metadata
        self.input_shape = tuple(meta.input_tensor_meta(0).sizes())
        self.num_outputs = meta.num_outputs()

    def run(self, pixel_values) -> list[torch.Tensor]:
        if not isinstance(pixel_values, torch.Tensor):
            pixel_values = torch.from_numpy(pixel_values)
        pixel_values = pixel_values.detach().cpu().float().contiguous()
        if tuple(pixel_values.shape) != self.input_shape:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; this program was exported for "
                f"{self.input_shape} (ExecuTorch programs have a fixed input shape: export another batch size "
                "with example=)"
            )
        return list(self.method.execute([pixel_values]))

    def __call__(self, pixel_values) -> torch.Tensor:
        return self.run(pixel_values)[0]


__all__ = [
    "export_onnx",
    "quantize_onnx",
    "OnnxVMoE",
    "export_executorch",
    "ExecuTorchVMoE",
    "set_executorch_threads",
    "OPSET_VERSION",
    "TOKEN_ROUTING_EXECUTORCH",
    "int8_expert_weights",
    "calibration_images",
]


# --------------------------------------------------------------------------------------------------------------
# Command line: hf-vmoe export MODEL_DIR --format onnx|executorch [--int8] -o PATH
# --------------------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def calibration_images(folder: str | Path, processor, limit: int = 128) -> torch.Tensor:
    """Up to `limit` images from `folder` (searched recursively; evenly spread over the sorted file list, so an
    imagefolder's classes are all represented), preprocessed by `processor` into a (N, C, H, W) float tensor."""
    from PIL import Image

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {folder}")
    if len(files) > limit:
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    images = []
    for f in files:
        with Image.open(f) as image:
            images.append(image.convert("RGB"))
    return processor(images=images, return_tensors="pt")["pixel_values"].float().contiguous()


def run_cli(args) -> int:
    """`hf-vmoe export` (its arguments: `hf_vmoe_cli.add_export_arguments`): load, export (verified against
    PyTorch), print what was written."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from .. import VMoEConfig  # noqa: F401  (registers the Auto classes)
    from ..configuration_vmoe import check_local_path

    check_local_path(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForImageClassification.from_pretrained(args.model).eval()
    calibration = None
    needs_data = args.int8 and (args.format == "executorch" or args.onnx_quantization == "static")
    if needs_data and not args.calibration_dir:
        raise ValueError(f"--int8 for {args.format}" + (f" ({args.onnx_quantization})" if args.format == "onnx" else "")
                         + " needs --calibration-dir: a folder of real images to calibrate activation ranges on")
    if args.calibration_dir:
        try:
            processor = AutoImageProcessor.from_pretrained(args.model)
        except (OSError, ValueError) as err:
            raise ValueError(f"{args.model} has no image processor to prepare the calibration images ({err})") from err
        calibration = calibration_images(args.calibration_dir, processor, args.calibration_images)
    example = None
    if args.batch_size != 1 or args.format == "executorch":
        shape = _expected_shape(model)
        example = torch.randn(args.batch_size, *shape, generator=torch.Generator().manual_seed(0))
        example = example.to(_model_dtype(model))
    quantize = "int8" if args.int8 else None
    if args.format == "onnx":
        path = export_onnx(model, args.output, example, batch_size=args.batch_size,
                           dynamic_batch=not args.static_batch, with_router_logits=args.with_router_logits,
                           quantize=quantize, quantization=args.onnx_quantization, calibration=calibration,
                           quantize_experts=not args.float_experts)
    else:
        path = export_executorch(model, args.output, example, quantize=quantize, calibration=calibration,
                                 quantize_experts=not args.float_experts, with_router_logits=args.with_router_logits)
    detail = "int8" + (f" ({args.onnx_quantization})" if args.format == "onnx" else "") if args.int8 else "float32"
    checked = ("checked to run (values are compared on real images only: pass --calibration-dir)"
               if args.int8 and calibration is None else "verified against PyTorch")
    print(f"wrote {path} ({args.format}, {detail}, {path.stat().st_size / 2**20:.2f} MiB; {checked})")
    return 0
