"""Device export: ONNX (through `torch.onnx.export(..., dynamo=True)`) and onnxruntime inference.

    from hf_vmoe.export import export_onnx, OnnxVMoE
    export_onnx(model, "vmoe.onnx")                    # dynamic batch; batch_size=1 + dynamic_batch=False for a fixed one
    logits = OnnxVMoE("vmoe.onnx")(pixel_values)       # numpy in, numpy out (onnxruntime, CPU)

Image routing (Mobile V-MoE) exports as is: under `torch.export` the experts take their trace-friendly path
(`VMoEExperts.forward_images` gathers each image's expert weights and runs one batched matmul), so the graph has no
data-dependent shapes, handles any batch size, and each image still only uses its own k experts' weights.

Token routing exports with the experts interface's `batched_mm` backend (`export_onnx` switches to it for the export
and switches back afterwards): `grouped_mm` lowers to a transformers custom op (`transformers::grouped_mm_fallback`)
with no ONNX translation, and `eager` loops over the experts that received tokens, a data-dependent shape
`torch.export` rejects. `batched_mm` gathers a copy of the expert weights per token, so the exported token-routed
model is correct but memory hungry (per MoE block: tokens x k x 2 x hidden x expert width floats). A capacity at
inference (`eval_capacity_factor`) is not exportable (data-dependent token dropping); the default is dropless.

onnx, onnxruntime and onnxscript are the `onnx` extra: `pip install "hf-vmoe[onnx]"`.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from torch import nn

OPSET_VERSION = 18
INPUT_NAME = "pixel_values"


class _ExportWrapper(nn.Module):
    """pixel_values -> logits (+ the first router call's logits, float32, when `with_router_logits`)."""

    def __init__(self, model: nn.Module, with_router_logits: bool):
        super().__init__()
        self.model = model
        self.with_router_logits = with_router_logits

    def forward(self, pixel_values: torch.Tensor):
        out = self.model(pixel_values=pixel_values, output_router_logits=self.with_router_logits)
        logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
        if self.with_router_logits:
            return logits, out.router_logits[0]
        return logits


@contextlib.contextmanager
def _export_ready(model):
    """Eval mode and, for token routing, the `batched_mm` experts backend; restored afterwards."""
    config = model.config
    was_training = model.training
    previous = None
    if config.is_moe and config.routing_level == "token":
        if config.eval_capacity_factor is not None:
            raise ValueError(
                f"eval_capacity_factor={config.eval_capacity_factor} cannot be exported: token dropping has "
                "data-dependent shapes; set config.eval_capacity_factor = None (dropless) before exporting"
            )
        previous = model.get_experts_implementation()
        model.set_experts_implementation("batched_mm")
    model.eval()
    try:
        yield
    finally:
        if previous is not None:
            model.set_experts_implementation(previous)
        model.train(was_training)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    batch_size: int = 1,
    dynamic_batch: bool = True,
    with_router_logits: bool = False,
    opset_version: int = OPSET_VERSION,
    verify: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Export a VMoE model (classification head: logits; bare model: last hidden state) to ONNX at `path`.

    batch_size: the example batch used to trace. dynamic_batch: the batch dimension is symbolic (any size at run
        time); False fixes it to `batch_size`.
    with_router_logits: a second output `router_logits` (first router call, (batch, E) for image routing).
    verify: run the file with onnxruntime on the example batch and raise if it differs from PyTorch by > atol.
    Returns the path. The model is left in the mode (train/eval) and experts backend it came in.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.config
    size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(batch_size, config.num_channels, *size, generator=generator)
    example = example.to(next(model.parameters()).dtype)
    output_names = ["logits", "router_logits"] if with_router_logits else ["logits"]
    with _export_ready(model), torch.no_grad():
        wrapper = _ExportWrapper(model, with_router_logits).eval()
        dynamic_shapes = {INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset_version,
                external_data=False,
                verbose=False,
            )
        if verify:
            expected = wrapper(example)
            expected = expected if isinstance(expected, tuple) else (expected,)
            got = OnnxVMoE(path).run(example)
            for name, e, g in zip(output_names, expected, got):
                diff = float((torch.from_numpy(g) - e.float()).abs().max())
                if diff > atol:
                    raise RuntimeError(f"ONNX output {name!r} differs from PyTorch by {diff:.3g} (> atol={atol})")
    return path


class OnnxVMoE:
    """An onnxruntime CPU session of an exported VMoE. `__call__(pixel_values)` returns the logits;
    `run(pixel_values)` returns every output. Accepts torch tensors or numpy arrays."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, intra_op_num_threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if intra_op_num_threads is not None:
            options.intra_op_num_threads = intra_op_num_threads
        self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, pixel_values):
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.detach().cpu().float().numpy()
        return self.session.run(None, {INPUT_NAME: pixel_values})

    def __call__(self, pixel_values):
        return self.run(pixel_values)[0]


__all__ = ["export_onnx", "OnnxVMoE", "OPSET_VERSION"]
