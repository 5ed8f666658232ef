"""Optional dependencies: import one where it is used, or say which extra of hf-vmoe installs it.

    onnx = require("onnx", purpose="ONNX export")      # ImportError: ONNX export needs onnx, in the `onnx` extra: ...
"""

from __future__ import annotations

import contextlib
import logging

import importlib

# top-level module -> (extra of hf-vmoe that installs it, what to add to the message)
EXTRAS = {
    "onnx": ("onnx", ""),
    "onnxruntime": ("onnx", ""),
    "onnxscript": ("onnx", ""),
    "executorch": ("executorch", "executorch 1.4.x, built for torch 2.13"),
    "torchao": ("executorch", "torchao comes with executorch"),
}


def require(module: str, *, purpose: str):
    """`importlib.import_module(module)`; when it (or a module it needs) is missing, an ImportError that names the
    extra to install: `pip install "hf-vmoe[<extra>]"`."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing = getattr(err, "name", None) or module
        extra, note = EXTRAS.get(missing.split(".")[0], EXTRAS.get(module.split(".")[0], (None, "")))
        how = f'pip install "hf-vmoe[{extra}]"' + (f" ({note})" if note else "") if extra else f"pip install {missing}"
        raise ImportError(f"{purpose} needs {missing.split('.')[0]}, which is not installed: {how}") from err


__all__ = ["EXTRAS", "require"]


@contextlib.contextmanager
def muted_loggers(*names: str):
    """Raise these Python loggers to ERROR for the duration; their levels are restored afterwards."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
