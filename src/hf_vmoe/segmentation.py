"""Semantic segmentation helpers: UperNet on a VMoE backbone that keeps the MoE aux loss, ADE20K label names and
folder loading, and random crop / flip / resize augmentations (numpy + PIL, no torchvision).

UperNet: transformers' `UperNetForSemanticSegmentation` builds any registered backbone, so
`UperNetConfig(backbone_config=VMoEConfig(...))` already runs on `VMoEBackbone`; but its loss is only the pixel
cross-entropy, and the routing aux loss the backbone returns is dropped, so the routers get no balancing signal.
:class:`VMoEUperNetForSemanticSegmentation` is a thin subclass (same weights, same config, same checkpoint layout)
whose `loss` adds the backbone's `aux_loss`; a checkpoint saved from it also loads into the stock class.

ADE20K conventions: annotation PNGs hold 0 = "other" (ignored) and 1..150 = classes; `reduce_labels` maps
0 -> 255 (ignore) and k -> k - 1, so the model predicts 150 classes 0..149 whose names are in
`ade20k_id2label()` (the first name of each class in the dataset's objectInfo150.txt).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import UperNetConfig, UperNetForSemanticSegmentation
from transformers.modeling_outputs import SemanticSegmenterOutput

from .configuration_vmoe import VMoEConfig
from .modeling_vmoe import ROUTING_FIELDS, VMoEBackbone
from .data_utils import metric_path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------------------
# UperNet on a VMoE backbone, keeping the aux loss
# --------------------------------------------------------------------------------------------------------------


@dataclass
class VMoEUperNetOutput(SemanticSegmenterOutput):
    """`SemanticSegmenterOutput` plus the backbone's routing fields (`aux_loss` is already included in `loss`)."""

    router_logits: tuple[torch.FloatTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None
    superclass_loss: torch.FloatTensor | None = None
    superclass_accuracy: torch.FloatTensor | None = None
    expert_counts: torch.LongTensor | None = None


class VMoEUperNetForSemanticSegmentation(UperNetForSemanticSegmentation):
    """`UperNetForSemanticSegmentation` whose loss also includes the MoE backbone's routing aux loss.

    Use with `UperNetConfig(backbone_config=VMoEConfig(..., out_indices=[...]))` (see :func:`vmoe_upernet_config`).
    `loss` = decode-head cross-entropy + `auxiliary_loss_weight` * auxiliary-head cross-entropy (both ignoring
    `config.loss_ignore_index`) + backbone `aux_loss`. With a non-MoE backbone it behaves exactly like the stock class.
    """

    accepts_loss_kwargs = False

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        if labels is not None and self.config.num_labels == 1:
            raise ValueError(
                f"The number of labels should be greater than one, got num_labels={self.config.num_labels}"
            )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        backbone_kwargs = dict(output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        if isinstance(self.backbone, VMoEBackbone):  # the aux loss whenever there is a loss; router logits if asked
            backbone_kwargs.update(compute_routing_loss=True if labels is not None else None,
                                   output_router_logits=kwargs.get("output_router_logits"))
        outputs = self.backbone.forward_with_filtered_kwargs(pixel_values, **backbone_kwargs)
        features = outputs.feature_maps
        size = pixel_values.shape[2:]
        logits = nn.functional.interpolate(self.decode_head(features), size=size, mode="bilinear", align_corners=False)
        auxiliary_logits = None
        if self.auxiliary_head is not None:
            auxiliary_logits = nn.functional.interpolate(
                self.auxiliary_head(features), size=size, mode="bilinear", align_corners=False
            )
        aux_loss = getattr(outputs, "aux_loss", None)
        loss = None
        if labels is not None:
            loss_fct = nn.CrossEntropyLoss(ignore_index=self.config.loss_ignore_index)
            loss = loss_fct(logits, labels)
            if auxiliary_logits is not None:
                loss = loss + self.config.auxiliary_loss_weight * loss_fct(auxiliary_logits, labels)
            if aux_loss is not None:
                loss = loss + aux_loss.to(loss.dtype)
        output = VMoEUperNetOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{name: getattr(outputs, name, None) for name in ROUTING_FIELDS},
        )
        return output if return_dict else output.to_tuple()


def vmoe_upernet_config(
    backbone_config: VMoEConfig,
    out_indices: list[int] | tuple[int, ...] | None = None,
    hidden_size: int = 512,
    **kwargs,
) -> UperNetConfig:
    """UperNet config on a VMoE backbone. `out_indices` (default: four evenly spaced blocks ending with the last,
    e.g. 3, 6, 9, 12 of 12) are the blocks whose outputs feed the decode head; `kwargs` go to `UperNetConfig`
    (`num_labels`/`id2label`, `use_auxiliary_head`, `auxiliary_in_channels`, `pool_scales`, ...)."""
    config = VMoEConfig(**backbone_config.to_dict())
    n = config.num_hidden_layers
    if out_indices is None:
        step = max(1, n // 4)
        out_indices = sorted({min(n, step * i) for i in range(1, 5)} | {n})[-4:]
    config.set_output_features_output_indices(out_indices=list(out_indices), out_features=None)
    kwargs.setdefault("auxiliary_in_channels", config.hidden_size)
    return UperNetConfig(backbone_config=config, hidden_size=hidden_size, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------------------


def mean_iou_metric_path() -> str:
    """Directory of the offline mean-IoU `evaluate` module shipped with the package: `evaluate.load(path)`."""
    return metric_path("mean_iou")


def ade20k_id2label() -> dict[int, str]:
    """The 150 ADE20K (SceneParsing) class names, ids 0..149 after `reduce_labels` (annotation value k -> k - 1)."""
    text = resources.files("hf_vmoe").joinpath("data/ade20k_id2label.json").read_text()
    return {int(k): v for k, v in json.loads(text).items()}


def read_id2label(path: str | os.PathLike, reduce_labels: bool = True) -> dict[int, str]:
    """Class names from a label file: a JSON `{id: name}`, ADE20K's `objectInfo150.txt` (tab-separated, 1-based
    `Idx` ... `Name`), or a text file of `value name` lines / one name per line (e.g. CamVid's `classes.txt`, where
    value 0 is the ignored class). Values are annotation values; with `reduce_labels` value k becomes id k - 1 and
    value 0 is dropped."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        mapping = {int(k): str(v) for k, v in json.loads(text).items()}
        return mapping  # JSON files hold model ids already
    values: dict[int, str] = {}
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and lines[0].lower().startswith("idx"):  # objectInfo150.txt
        for line in lines[1:]:
            parts = line.split("\t")
            values[int(parts[0])] = parts[-1].split(",")[0].strip()
    else:
        for i, line in enumerate(lines):
            head, _, rest = line.strip().partition(" ")
            if head.isdigit() and rest:
                values[int(head)] = rest.strip()
            else:
                values[i] = line.strip()
    if reduce_labels:
        return {v - 1: name for v, name in sorted(values.items()) if v > 0}
    return dict(sorted(values.items()))


def reduce_ade_labels(label: np.ndarray) -> np.ndarray:
    """ADE20K `reduce_labels`: 0 (other) -> 255 (ignored), k -> k - 1; 255 (already ignored) stays 255, as in
    transformers' image processors."""
    label = np.asarray(label).astype(np.int64)
    return np.where((label == 0) | (label == IGNORE_INDEX), IGNORE_INDEX, label - 1).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# ADE20K-layout folders
# --------------------------------------------------------------------------------------------------------------


def find_ade_pairs(directory: str | os.PathLike, split: str) -> list[tuple[str, str]]:
    """(image, annotation) path pairs of an ADE20K-layout folder: `directory/images/<split>/*.jpg` with
    `directory/annotations/<split>/*.png` (ADEChallengeData2016), or `directory/images/*` with
    `directory/annotations/*` (a folder for one split). Pairs are matched by file stem."""
    directory = Path(directory)
    images_dir, annotations_dir = directory / "images" / split, directory / "annotations" / split
    if not images_dir.is_dir():
        images_dir, annotations_dir = directory / "images", directory / "annotations"
    if not images_dir.is_dir() or not annotations_dir.is_dir():
        raise ValueError(
            f"{directory} is not an ADE20K-layout folder: expected images/{split}/ and annotations/{split}/ "
            "(or images/ and annotations/)"
        )
    annotations = {p.stem: p for p in annotations_dir.iterdir() if p.suffix.lower() == ".png"}
    pairs = []
    for image in sorted(images_dir.iterdir()):
        if image.suffix.lower() in IMAGE_EXTENSIONS and image.stem in annotations:
            pairs.append((str(image), str(annotations[image.stem])))
    if not pairs:
        raise ValueError(f"no image / annotation pairs found in {images_dir} and {annotations_dir}")
    return pairs


def load_ade_folder(directory: str | os.PathLike, split: str):
    """A `datasets.Dataset` with `image` and `annotation` image columns (the `scene_parse_150` layout)."""
    from datasets import Dataset, Features, Image as ImageFeature

    pairs = find_ade_pairs(directory, split)
    features = Features({"image": ImageFeature(), "annotation": ImageFeature()})
    return Dataset.from_dict(
        {"image": [p[0] for p in pairs], "annotation": [p[1] for p in pairs]}, features=features
    )


# --------------------------------------------------------------------------------------------------------------
# Augmentations
# --------------------------------------------------------------------------------------------------------------


def _size(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)


@dataclass
class SegmentationTransform:
    """Image + label map -> (`pixel_values` float32 (3, H, W), `labels` int64 (H, W)).

    Training (`train=True`, mmsegmentation's ADE20K recipe): random rescale by a factor in `scale_range` of
    `size`, pad to `size` (label pad = 255), random crop of `size`, horizontal flip with probability `flip_prob`.
    Evaluation: resize to `size` (bilinear image, nearest labels). Then rescale to [0, 1] and normalise.
    `reduce_labels` applies the ADE20K convention (0 -> 255, k -> k - 1) before anything else.
    """

    size: int | tuple[int, int] = 512
    train: bool = True
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip_prob: float = 0.5
    reduce_labels: bool = False
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self):
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {self.scale_range}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")

    def __call__(self, image: Image.Image, label: Image.Image | np.ndarray, rng: random.Random | None = None):
        rng = rng or random
        image = image.convert("RGB")
        label = np.array(label)
        if label.ndim == 3:
            label = label[..., 0]
        if self.reduce_labels:
            label = reduce_ade_labels(label)
        label = Image.fromarray(label.astype(np.uint8))
        height, width = _size(self.size)
        if self.train:
            scale = rng.uniform(*self.scale_range)
            # resize so the image covers `scale` x the crop size along its shorter side (aspect ratio kept)
            factor = scale * max(height / image.height, width / image.width)
            new_w, new_h = max(1, round(image.width * factor)), max(1, round(image.height * factor))
            image = image.resize((new_w, new_h), Image.BILINEAR)
            label = label.resize((new_w, new_h), Image.NEAREST)
            img, lab = np.asarray(image, dtype=np.float32), np.asarray(label, dtype=np.int64)
            pad_h, pad_w = max(0, height - new_h), max(0, width - new_w)
            if pad_h or pad_w:
                img = np.pad(img, ((0, pad_h), (0, pad_w), (0, 0)))
                lab = np.pad(lab, ((0, pad_h), (0, pad_w)), constant_values=self.ignore_index)
            top = rng.randint(0, img.shape[0] - height)
            left = rng.randint(0, img.shape[1] - width)
            img, lab = img[top : top + height, left : left + width], lab[top : top + height, left : left + width]
            if rng.random() < self.flip_prob:
                img, lab = img[:, ::-1], lab[:, ::-1]
        else:
            img = np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.float32)
            lab = np.asarray(label.resize((width, height), Image.NEAREST), dtype=np.int64)
        img = (img / 255.0 - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        pixel_values = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))
        return pixel_values, torch.from_numpy(np.ascontiguousarray(lab, dtype=np.int64))


__all__ = [
    "VMoEUperNetForSemanticSegmentation",
    "VMoEUperNetOutput",
    "vmoe_upernet_config",
    "ade20k_id2label",
    "mean_iou_metric_path",
    "read_id2label",
    "reduce_ade_labels",
    "find_ade_pairs",
    "load_ade_folder",
    "SegmentationTransform",
]
