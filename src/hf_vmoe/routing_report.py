"""Routing analysis of a saved VMoE (ViMoE) from the command line: class x expert heatmaps per MoE layer,
specialisation scores and a recommended config keeping only the specialised MoE layers.

    hf-vmoe analyze MODEL_DIR --data-dir IMAGEFOLDER [--output-dir routing_report] [--max-samples N] ...
    python examples/analyze_routing.py MODEL_DIR --data_dir IMAGEFOLDER ...      (the same options)

Classification reads an imagefolder (class sub-folders, matched to the model's `label2id` by folder name);
segmentation an ADE20K-layout folder (`--split`, `--reduce_labels`; per-token routing labelled by the patch's
pixels). Images are normalised with the checkpoint's image processor (preprocessor_config.json), else ImageNet's.
Writes OUTPUT_DIR/report.json, heatmap_layer{i}.png with heatmap_layer{i}_rows.csv (the rows top to bottom, with
class names) and recommended_config/config.json (see `hf_vmoe.recipes.analysis`). Every option takes `--a-b` or `--a_b`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from hf_vmoe_cli import add_analyze_arguments
from transformers import AutoConfig

from .configuration_vmoe import check_local_path
from .recipes.analysis import collect_routing
from .integrations.data import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SegmentationTransform,
    check_imagefolder,
    find_ade_pairs,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="hf-vmoe analyze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_analyze_arguments(parser).parse_args(argv)


def load_model(path):
    """(model, task) from a checkpoint directory: a VMoE UperNet, or the VMoE class its config names."""
    import hf_vmoe

    check_local_path(path)
    config = AutoConfig.from_pretrained(path)
    if config.model_type == "upernet":
        from .integrations.upernet import VMoEUperNetForSemanticSegmentation

        return VMoEUperNetForSemanticSegmentation.from_pretrained(path), "segmentation"
    architecture = (config.architectures or ["VMoEForImageClassification"])[0]
    model_class = getattr(hf_vmoe, architecture, hf_vmoe.VMoEForImageClassification)
    task = "segmentation" if "Segmentation" in architecture else "classification"
    return model_class.from_pretrained(path), task


def normalisation(path):
    """(mean, std) of the checkpoint's image processor (preprocessor_config.json), else ImageNet's: the model must
    see its inputs normalised as in training."""
    if (Path(path) / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(path)
        mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
        if mean is not None and std is not None:
            return tuple(mean), tuple(std)
    return IMAGENET_MEAN, IMAGENET_STD


def classification_batches(data_dir, model, size, batch_size, max_samples, image_mean=IMAGENET_MEAN,
                           image_std=IMAGENET_STD):
    check_imagefolder(data_dir, "--data-dir")
    folders = sorted(p for p in Path(data_dir).iterdir() if p.is_dir())
    label2id = {k: int(v) for k, v in (model.config.label2id or {}).items()}
    unknown = [folder.name for folder in folders if folder.name not in label2id]
    num_labels = model.config.num_labels
    if len(unknown) < len(folders) and unknown:  # folders are matched by name: every one must name a class
        raise ValueError(f"--data-dir {data_dir}: class folders {unknown[:5]} are not classes of the model (its "
                         f"{num_labels} classes: {sorted(label2id)[:10]}{' ...' if num_labels > 10 else ''})")
    if len(unknown) == len(folders) and len(folders) > num_labels:  # matched by position
        raise ValueError(f"--data-dir {data_dir} has {len(folders)} class folders but the model has {num_labels} "
                         "classes: give the imagefolder the model was trained on")
    files = []
    for i, folder in enumerate(folders):
        label = label2id.get(folder.name, i)
        files += [(f, label) for f in sorted(folder.rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS]
    if max_samples:
        rng = np.random.default_rng(0)
        files = [files[i] for i in sorted(rng.permutation(len(files))[:max_samples])]
    return _classification_batches(files, size, batch_size, image_mean, image_std)


def _classification_batches(files, size, batch_size, image_mean, image_std):
    mean, std = np.array(image_mean, np.float32), np.array(image_std, np.float32)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        pixels = [
            (np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR), np.float32) / 255 - mean)
            / std
            for f, _ in chunk
        ]
        yield torch.from_numpy(np.stack(pixels).transpose(0, 3, 1, 2).copy()), torch.tensor([lab for _, lab in chunk])


def segmentation_batches(data_dir, split, size, batch_size, max_samples, reduce_labels, image_mean=IMAGENET_MEAN,
                         image_std=IMAGENET_STD):
    pairs = find_ade_pairs(data_dir, split)[:max_samples]
    transform = SegmentationTransform(size=size, train=False, reduce_labels=reduce_labels, image_mean=image_mean,
                                      image_std=image_std)
    for start in range(0, len(pairs), batch_size):
        items = [transform(Image.open(i), Image.open(a)) for i, a in pairs[start : start + batch_size]]
        yield torch.stack([p for p, _ in items]), torch.stack([lab for _, lab in items])


def run(args) -> dict:
    """Analyse `args.model` on `args.data_dir`, write the report, print a short summary; returns the report."""
    if not Path(args.data_dir).is_dir():
        raise ValueError(f"--data-dir {args.data_dir} is not a directory")
    model, task = load_model(args.model)
    task = task if args.task == "auto" else args.task
    vmoe_config = getattr(model.config, "backbone_config", None) or model.config
    size = args.image_size or vmoe_config.image_size
    size = size if isinstance(size, int) else size[0]
    mean, std = normalisation(args.model)
    if task == "classification":
        batches = classification_batches(args.data_dir, model, size, args.batch_size, args.max_samples, mean, std)
    else:
        batches = segmentation_batches(args.data_dir, args.split, size, args.batch_size, args.max_samples,
                                       args.reduce_labels, mean, std)
    stats = collect_routing(model, batches, patch_label=args.patch_label)
    report = stats.report(args.output_dir, threshold=args.threshold)
    short = {layer: {k: round(v, 4) for k, v in m.items() if isinstance(v, float)}
             for layer, m in report["layers"].items()}
    print(json.dumps({"layers": short, "recommendation": report["recommendation"],
                      "output_dir": str(args.output_dir)}, indent=2))
    return report


def main(argv=None) -> dict:
    return run(parse_args(argv))


__all__ = ["parse_args", "load_model", "normalisation", "classification_batches",
           "segmentation_batches", "run", "main"]
