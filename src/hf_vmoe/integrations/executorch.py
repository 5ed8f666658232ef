"""ExecuTorch export (`torch.export` -> `to_edge_transform_and_lower` with the XNNPACK partitioner -> `.pte`), in
float32 or int8 (PT2E with ExecuTorch's XNNPACK quantizer), and `ExecuTorchVMoE`, an exported program in
ExecuTorch's Python runtime. Image routing (Mobile V-MoE) only: token routing is refused
(`TOKEN_ROUTING_EXECUTORCH`).

ExecuTorch is the `executorch` extra (`pip install "hf-vmoe[executorch]"`, executorch 1.4.x, built for torch 2.13);
it is imported when a function here is called, not when the module is imported. Overview and usage:
`hf_vmoe.integrations.export`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .export_utils import (
    TOKEN_ROUTING_EXECUTORCH,
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
from .extras import require

__all__ = ["TOKEN_ROUTING_EXECUTORCH", "ExecuTorchVMoE", "export_executorch", "set_executorch_threads"]


def _require_executorch():
    require("executorch.exir", purpose="ExecuTorch export")


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
