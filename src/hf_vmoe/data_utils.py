"""Small helpers shared by the example scripts, the CLI and the tools (not part of a checkpoint).

- :func:`parse_config_overrides`: the `--config_overrides "a=1,b=last:2"` syntax of both Trainer scripts;
- :func:`parse_moe_layers_arg`: a `--moe_layers` command-line value, `"9,11"` or `"last:2"`;
- :func:`size_dict`: an image size (int or (height, width)) as an image processor's `size`;
- :func:`metric_path`: the offline `evaluate` modules shipped in `hf_vmoe/metrics/` (`evaluate.load(metric_path(
  "accuracy"))`), so no metric is ever downloaded.
"""

from __future__ import annotations

import json
from importlib import resources

METRICS = ("accuracy", "mean_iou")
_WORDS = {"true": True, "false": False, "none": None, "null": None}


def _parse_value(key: str, value: str):
    try:
        return json.loads(value)  # numbers, true / false / null, quoted strings, lists without commas
    except json.JSONDecodeError:
        pass
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    word = value.lower()
    if word in _WORDS and not (key == "moe_layers" and word == "none"):
        return _WORDS[word]
    return value


def parse_config_overrides(text: str | None) -> dict:
    """`"num_experts=4,moe_layers=last:2,drop_path_rate=0.1,qkv_bias=false"` -> `{"num_experts": 4, "moe_layers":
    "last:2", "drop_path_rate": 0.1, "qkv_bias": False}`.

    Values are read as JSON (numbers, `true`/`false`/`null`), then `True`/`False`/`None` in any case, else kept as
    strings. `moe_layers=none` stays the string `"none"` (no MoE block): `moe_layers=None` would mean the default
    (the last two blocks)."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"config override {item!r} is not key=value (in {text!r})")
        key = key.strip()
        out[key] = _parse_value(key, value.strip())
    return out


def parse_moe_layers_arg(spec: str) -> tuple[int, ...] | str:
    """A `--moe_layers` value: comma-separated block indices (`"9,11"`, `"-1"`) become a tuple of ints; anything
    else (`"last:2"`, `"every:2"`, `"all"`, `"none"`) is passed on for `VMoEConfig` to resolve and validate."""
    if spec[:1].isdigit() or spec[:1] == "-":
        try:
            return tuple(int(i) for i in spec.split(","))
        except ValueError:
            raise ValueError(f"moe_layers={spec!r} is not a comma-separated list of block indices") from None
    return spec


def size_dict(image_size) -> dict[str, int]:
    """`224` or `(224, 160)` (a config's `image_size`) -> `{"height": ..., "width": ...}` for an image processor."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    return {"height": int(height), "width": int(width)}


def metric_path(name: str) -> str:
    """Directory of an offline `evaluate` module shipped with the package (`"accuracy"` or `"mean_iou"`), for
    `evaluate.load(metric_path(name))`."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; the package ships {METRICS}")
    return str(resources.files("hf_vmoe").joinpath("metrics", name))


__all__ = ["parse_config_overrides", "parse_moe_layers_arg", "size_dict", "metric_path", "METRICS"]
