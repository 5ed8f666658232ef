"""Convert Google's V-MoE checkpoints (google-research/vmoe, JAX/Flax) into hf_vmoe folders.

Reads both file formats vmoe writes (sharded and Flax msgpack), with numpy and msgpack only (no JAX, TensorFlow or
GPU). The parameter tree of `vmoe.nn.vit_moe.VisionTransformerMoe` (at the top, or under `params`) maps onto the
state dict of `VMoEForImageClassification`; the architecture is read from the tree's shapes and checked against the
vmoe model config (a preset named after the released checkpoint, or fields given as JSON), which also gives what the
tree cannot show (k, capacities, batch-priority routing, group size, losses). What hf_vmoe cannot represent is
reported: structurally different models (E^3 ensembles, MAP heads, ...) raise a ValueError; numerics that would differ
at inference (with a VMoEConfig lacking a parity option) warn, or raise with `strict=True`; training-only
differences (expert dropout, router noise samples, ...) are listed in the result and in `config.vmoe_reference`.

This module ties the parts in `hf_vmoe.integrations.vmoe_checkpoint` and re-exports their public names:
- `vmoe_checkpoint.readers`: `read_flax_msgpack`, `read_vmoe_sharded`, `load_vmoe_params`, `VMoEIndexInfo`;
- `vmoe_checkpoint.params`: `infer_vmoe_architecture`, `vmoe_params_to_state_dict`;
- `vmoe_checkpoint.config`: `VMOE_PRESETS`, `resolve_vmoe_config`, `hf_config_from_vmoe`;
- here: `convert_vmoe_checkpoint`, `ConversionResult` and `run_cli` (`hf-vmoe convert-vmoe`).

The exact spec of what vmoe computes and how each field maps is docs/vmoe-parity-spec.md; usage is
docs/vmoe-checkpoints.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from .vmoe_checkpoint.config import VMOE_PRESETS, hf_config_from_vmoe, resolve_vmoe_config
from .vmoe_checkpoint.params import infer_vmoe_architecture, vmoe_params_to_state_dict
from .vmoe_checkpoint.readers import VMoEIndexInfo, load_vmoe_params, read_flax_msgpack, read_vmoe_sharded

__all__ = [
    "VMOE_PRESETS",
    "ConversionResult",
    "VMoEIndexInfo",
    "convert_vmoe_checkpoint",
    "hf_config_from_vmoe",
    "infer_vmoe_architecture",
    "load_vmoe_params",
    "read_flax_msgpack",
    "read_vmoe_sharded",
    "resolve_vmoe_config",
    "vmoe_params_to_state_dict",
]

# ----------------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ConversionResult:
    """What `convert_vmoe_checkpoint` wrote: the folder, its config, and what hf_vmoe computes differently from
    vmoe (`inexact`: changes inference outputs; `training`: training only), each naming the missing option."""

    output_dir: Path
    config: object
    inexact: list[str]
    training: list[str]


def _read_labels(labels, num_labels: int) -> dict[int, str] | None:
    if labels is None:
        return None
    if isinstance(labels, (str, os.PathLike)):
        path = Path(labels)
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
            names = [data[str(i)] for i in range(len(data))] if isinstance(data, dict) else list(data)
        else:
            names = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        names = list(labels)
    if len(names) != num_labels:
        raise ValueError(f"the label list has {len(names)} names but the checkpoint has {num_labels} classes")
    return {i: str(n) for i, n in enumerate(names)}


def convert_vmoe_checkpoint(prefix, config, output_dir, *, strict: bool = False, overwrite: bool = False,
                            labels=None) -> ConversionResult:
    """Convert a vmoe checkpoint into a folder that `VMoEForImageClassification.from_pretrained` and
    `pipeline("image-classification")` load: `config.json` (with `vmoe_reference`: the vmoe fields and what is not
    reproduced), `model.safetensors` (float32), `preprocessor_config.json`, and the remote-code files that every
    saved VMoE folder has.

    prefix: a sharded checkpoint's prefix (`<prefix>.index`, `<prefix>.data-nnnnn-of-NNNNN`) or a Flax msgpack file.
    config: a preset name (`VMOE_PRESETS`: the released checkpoints), or vmoe model-config fields as a dict / JSON
        string / JSON file (`{"preset": ..., "model": {...}, "eval_overrides": {...}, "image_size": N}`, see
        `resolve_vmoe_config`); the architecture is read from the checkpoint and must agree with it.
    strict: raise instead of warning when hf_vmoe would compute different outputs at inference.
    overwrite: replace an existing non-empty `output_dir` (otherwise a ValueError).
    labels: class names (a list, a text file with one name a line, or a JSON list / id->name object).

    Anything that does not fit raises a ValueError naming it, and nothing is written: the folder is assembled in a
    temporary directory beside `output_dir` and moved into place at the end."""
    from ..configuration_vmoe import VMoEConfig
    from ..image_processing_vmoe import VMoEImageProcessor

    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise ValueError(f"{str(output_dir)!r} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    spec = resolve_vmoe_config(config)
    params = load_vmoe_params(prefix)
    arch = infer_vmoe_architecture(params)
    kwargs, reference, issues = hf_config_from_vmoe(spec, arch)
    inexact = [f"{i.message} [needs VMoEConfig.{i.option}]" for i in issues if i.scope == "inference"]
    training = [f"{i.message} [needs VMoEConfig.{i.option}]" if i.option != "(none)" else i.message
                for i in issues if i.scope == "training"]
    if inexact and strict:
        raise ValueError("hf_vmoe cannot reproduce this checkpoint's inference exactly (strict=True):\n"
                         + "\n".join(f"  {m}" for m in inexact))
    for message in inexact:
        warnings.warn(f"converted model differs from vmoe at inference: {message}", stacklevel=2)
    reference["not_reproduced"] = {"inference": inexact, "training": training}
    id2label = _read_labels(labels, kwargs["num_labels"])
    if id2label:
        kwargs["id2label"] = id2label
        kwargs["label2id"] = {v: k for k, v in id2label.items()}
    try:
        hf_config = VMoEConfig(**kwargs, vmoe_reference=reference, architectures=["VMoEForImageClassification"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"the mapped config is not a valid VMoEConfig: {err}") from None
    state_dict = vmoe_params_to_state_dict(params, arch)
    del params
    model = _model_with_weights(hf_config, state_dict)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)  # as any VMoE folder: safetensors + remote-code files
        size = hf_config.image_size if isinstance(hf_config.image_size, (list, tuple)) else [hf_config.image_size] * 2
        # vmoe's input pipeline: value_range(-1, 1) = pixels / 127.5 - 1, bilinear resize to the model size
        VMoEImageProcessor(size={"height": size[0], "width": size[1]}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                           resample=2).save_pretrained(tmp)
        if output_dir.exists():
            if output_dir.is_dir():
                shutil.rmtree(output_dir)
            else:
                output_dir.unlink()
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConversionResult(output_dir=output_dir, config=hf_config, inexact=inexact, training=training)


def _model_with_weights(config, state_dict: Mapping[str, torch.Tensor]):
    """A VMoEForImageClassification holding the converted tensors (built on the meta device, the tensors assigned:
    no second copy). The state dict must have exactly the model's keys and shapes."""
    from ..modeling_vmoe import VMoEForImageClassification

    with torch.device("meta"):
        model = VMoEForImageClassification(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"  {k}: missing from the converted weights (shape {s})" for k, s in sorted(expected.items())
                if k not in state_dict]
    problems += [f"  {k}: not a parameter of VMoEForImageClassification" for k in sorted(state_dict) if k not in expected]
    problems += [f"  {k}: converted shape {tuple(v.shape)} != model shape {expected[k]}"
                 for k, v in sorted(state_dict.items()) if k in expected and tuple(v.shape) != expected[k]]
    if problems:
        raise ValueError("the converted weights do not fit VMoEForImageClassification:\n" + "\n".join(problems))
    model.load_state_dict(state_dict, strict=True, assign=True)
    leftover = [name for name, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftover:
        raise ValueError(f"the converted model has tensors without values: {leftover[:5]}")
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# `hf-vmoe convert-vmoe`
# ----------------------------------------------------------------------------------------------------------------


def run_cli(args) -> int:
    """`hf-vmoe convert-vmoe` (its arguments: `hf_vmoe_cli.add_convert_vmoe_arguments`): prints what was written and what hf_vmoe does differently; ValueErrors propagate (the
    CLI prints them and exits with 2)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same messages are printed below
        result = convert_vmoe_checkpoint(args.checkpoint, args.config, args.output_dir, strict=args.strict,
                                         overwrite=args.overwrite, labels=args.labels)
    config = result.config
    print(f"wrote {result.output_dir}: VMoEForImageClassification, {config.num_hidden_layers} blocks x "
          f"{config.hidden_size}, MoE blocks {list(config.moe_layers)}, {config.num_experts} experts, "
          f"k={config.num_experts_per_tok}, {config.num_labels} classes, {config.image_size} px")
    for message in result.inexact:
        print(f"  differs at inference: {message}")
    for message in result.training:
        print(f"  differs in training: {message}")
    if not result.inexact:
        print("  inference: the same computation as vmoe's (see docs/vmoe-parity-spec.md)")
    return 0
