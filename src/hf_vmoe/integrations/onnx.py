"""ONNX export (`torch.onnx.export(dynamo=True)`, run with onnxruntime), in float32 or int8 (onnxruntime
quantization, dynamic or static), and `OnnxVMoE`, an onnxruntime CPU session of an exported file.

onnx, onnxruntime and onnxscript are the `onnx` extra (`pip install "hf-vmoe[onnx]"`); they are imported when a
function here is called, not when the module is imported. Overview and usage: `hf_vmoe.integrations.export`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .export_utils import (
    INPUT_NAME,
    _calibration_batches,
    _check_model,
    _check_outputs,
    _check_quantize,
    _check_router_logits,
    _example,
    _export_ready,
    _ExportWrapper,
    _staged,
    int8_expert_weights,
)
from .extras import muted_loggers, require

__all__ = ["ONNX_QUANTIZATION_MODES", "OPSET_VERSION", "OnnxVMoE", "export_onnx", "quantize_onnx"]

OPSET_VERSION = 18
ONNX_QUANTIZATION_MODES = ("dynamic", "static")


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
