"""Data helpers shared by the example scripts, the CLI and the tools (not part of a checkpoint).

- :func:`parse_config_overrides`: the `--config_overrides "a=1,b=last:2"` syntax of both Trainer scripts;
- :func:`parse_moe_layers_arg`: a `--moe_layers` command-line value, `"9,11"` or `"last:2"`;
- :func:`size_dict`: an image size (int or (height, width)) as an image processor's `size`;
- :func:`metric_path`: the offline `evaluate` modules shipped in `hf_vmoe/metrics/` (`evaluate.load(metric_path(
  "accuracy"))`), so no metric is ever downloaded;
- segmentation data: ADE20K label names and folder loading (:func:`load_ade_folder`, :func:`read_id2label`) and
  :class:`SegmentationTransform`, random crop / flip / resize augmentations in numpy + PIL (no torchvision);
- :class:`AugmentedDataset`: a training set whose random augmentations are drawn per (seed, epoch, image), so a
  resumed run sees the augmentations an uninterrupted one sees (with `callbacks.AugmentationEpochCallback`).

ADE20K conventions: annotation PNGs hold 0 = "other" (ignored) and 1..150 = classes; `reduce_labels` maps
0 -> 255 (ignore) and k -> k - 1, so the model predicts 150 classes 0..149 whose names are in
`ade20k_id2label()` (the first name of each class in the dataset's objectInfo150.txt).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..configuration_vmoe import to_pair

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

METRICS = ("accuracy", "mean_iou")
_WORDS = {"true": True, "false": False, "none": None, "null": None}


def check_imagefolder(path: str | os.PathLike, option: str = "--data_dir") -> None:
    """Raise a ValueError naming `path` (given as `option`) unless it is an imagefolder: a folder with one
    sub-folder of images per class (datasets' "imagefolder" otherwise fails with "... corresponds to no data!")."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: no such folder ({folder.resolve()})")
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{option} {path} has no class sub-folders: an imagefolder has one folder of images per "
                         f"class (e.g. {folder / 'cat' / '0001.jpg'})")
    if not any(f.suffix.lower() in IMAGE_EXTENSIONS for c in classes for f in c.rglob("*")):
        raise ValueError(f"{option} {path}: its class folders ({', '.join(c.name for c in classes[:5])}"
                         f"{' ...' if len(classes) > 5 else ''}) hold no images ({', '.join(IMAGE_EXTENSIONS)})")


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
    height, width = to_pair(image_size)
    return {"height": int(height), "width": int(width)}


def metric_path(name: str) -> str:
    """Directory of an offline `evaluate` module shipped with the package (`"accuracy"` or `"mean_iou"`), for
    `evaluate.load(metric_path(name))`."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; the package ships {METRICS}")
    return str(resources.files("hf_vmoe").joinpath("metrics", name))



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

    def __call__(self, image: Image.Image, label: Image.Image | np.ndarray, rng: np.random.Generator | None = None):
        """`rng`: the training draws' generator; None: one seeded from numpy's global state (`set_seed`)."""
        image = image.convert("RGB")
        label = np.array(label)
        if label.ndim == 3:
            label = label[..., 0]
        if self.reduce_labels:
            label = reduce_ade_labels(label)
        label = Image.fromarray(label.astype(np.uint8))
        height, width = map(int, to_pair(self.size))
        if self.train:
            rng = rng if rng is not None else np.random.default_rng(np.random.randint(2**31))
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
            top = int(rng.integers(0, img.shape[0] - height, endpoint=True))
            left = int(rng.integers(0, img.shape[1] - width, endpoint=True))
            img, lab = img[top : top + height, left : left + width], lab[top : top + height, left : left + width]
            if rng.random() < self.flip_prob:
                img, lab = img[:, ::-1], lab[:, ::-1]
        else:
            img = np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.float32)
            lab = np.asarray(label.resize((width, height), Image.NEAREST), dtype=np.int64)
        img = (img / 255.0 - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        pixel_values = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))
        return pixel_values, torch.from_numpy(np.ascontiguousarray(lab, dtype=np.int64))


class AugmentedDataset(torch.utils.data.Dataset):
    """A `datasets.Dataset` (or any dataset that a list of indices indexes into a dict of columns) seen through a
    random training transform whose draws come from a generator seeded by (seed, epoch, index): an image gets the
    same augmentation in an epoch however the run is cut (resumed from a checkpoint, mid-epoch too; data-loader
    workers), and a new one each epoch. One generator shared by the transform would restart from the seed on a
    resume, and be copied into every worker.

    `transform(batch, rngs) -> dict of columns`: `batch` the rows' columns (a dict of lists), `rngs` one
    `numpy.random.Generator` per row.

    Give the Trainer `callbacks.AugmentationEpochCallback(dataset)` too: it sets the epoch at each epoch's start.
    Without it only a single-process run that is not resumed sees the epoch (accelerate's `set_epoch` reaches the
    dataset there, not beside a distributed or a skipping sampler). The epoch lives in shared memory, so data-loader
    workers, persistent ones too, read the current one."""

    def __init__(self, dataset, transform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __getitems__(self, indices: list[int]) -> list[dict]:
        epoch = self.epoch
        rngs = [np.random.default_rng([self.seed, epoch, int(index)]) for index in indices]
        columns = self.transform(self.dataset[list(indices)], rngs)
        return [dict(zip(columns, row)) for row in zip(*columns.values(), strict=True)]  # one example per row

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]


__all__ = [
    "AugmentedDataset",
    "check_imagefolder",
    "parse_config_overrides",
    "parse_moe_layers_arg",
    "size_dict",
    "metric_path",
    "METRICS",
    "IMAGE_EXTENSIONS",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ade20k_id2label",
    "mean_iou_metric_path",
    "read_id2label",
    "reduce_ade_labels",
    "find_ade_pairs",
    "load_ade_folder",
    "SegmentationTransform",
]
