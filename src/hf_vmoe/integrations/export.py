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
(the `eager` experts gather each image's expert weights and run one batched matmul), so the graph has no
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

The code lives by runtime: `hf_vmoe.integrations.onnx` (`export_onnx`, `quantize_onnx`, `OnnxVMoE`),
`hf_vmoe.integrations.executorch` (`export_executorch`, `ExecuTorchVMoE`, `set_executorch_threads`) and what they share
in `hf_vmoe.integrations.export_utils` (the checks, the export wrapper, `int8_expert_weights`). This module re-exports
their public names and holds `hf-vmoe export` (`run_cli`, `calibration_images`). Importing any of them imports torch
only; onnx, onnxruntime and ExecuTorch are imported when an exporter or runtime is used.

onnx, onnxruntime and onnxscript are the `onnx` extra (`pip install "hf-vmoe[onnx]"`); ExecuTorch is the
`executorch` extra (`pip install "hf-vmoe[executorch]"`, executorch 1.4.x, built for torch 2.13).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .executorch import ExecuTorchVMoE, export_executorch, set_executorch_threads
from .export_utils import (
    INT8_MIN_CORRELATION,
    QUANTIZE_CHOICES,
    TOKEN_ROUTING_EXECUTORCH,
    _expected_shape,
    _model_dtype,
    int8_expert_weights,
)
from .onnx import ONNX_QUANTIZATION_MODES, OPSET_VERSION, OnnxVMoE, export_onnx, quantize_onnx

__all__ = [
    "export_onnx",
    "quantize_onnx",
    "OnnxVMoE",
    "export_executorch",
    "ExecuTorchVMoE",
    "set_executorch_threads",
    "OPSET_VERSION",
    "ONNX_QUANTIZATION_MODES",
    "QUANTIZE_CHOICES",
    "INT8_MIN_CORRELATION",
    "TOKEN_ROUTING_EXECUTORCH",
    "int8_expert_weights",
    "calibration_images",
    "run_cli",
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
