"""Mean Intersection-over-Union for semantic segmentation, as an offline `evaluate` metric module.

Same inputs and outputs as the Hub's `evaluate-metric/mean_iou`, with no download:

    import evaluate
    from hf_vmoe.integrations.data import mean_iou_metric_path
    metric = evaluate.load(mean_iou_metric_path())                       # or evaluate.load("<dir>/mean_iou")
    metric.add_batch(predictions=pred_maps, references=label_maps)       # lists / arrays of (H, W) integer maps
    result = metric.compute(num_labels=150, ignore_index=255)

Returns `mean_iou`, `mean_accuracy`, `overall_accuracy` (floats) and `per_category_iou`,
`per_category_accuracy` (arrays of `num_labels`; NaN for a class absent from both predictions and references,
or `nan_to_num` when given). Pixels whose reference is `ignore_index` are skipped. `reduce_labels=True` applies the
ADE20K convention to the references first (0 -> 255, k -> k - 1); `label_map` remaps reference values.
The computation is one confusion matrix (`np.bincount`). For large evaluations, `evaluate` keeps every map until
`compute`; a training loop can instead sum the module's `confusion_matrix(prediction, reference, ...)` per batch and
finish with `metrics_from_confusion(total)` (both are plain functions of this module; the segmentation example
does this, with `batch_eval_metrics`).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Mean IoU: the per-class intersection over union of predicted and reference segmentation maps,
averaged over classes that occur; plus mean per-class accuracy and overall pixel accuracy."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of (H, W) integer maps (predicted class ids).
    references: list of (H, W) integer maps (ground-truth class ids, `ignore_index` for ignored pixels).
    num_labels (int): number of classes.
    ignore_index (int): reference value to ignore (e.g. 255).
    nan_to_num (float, optional): value for classes absent from both predictions and references.
    label_map (dict, optional): old reference id -> new id, applied first.
    reduce_labels (bool): ADE20K convention on references: 0 -> 255, k -> k - 1.
Returns:
    mean_iou, mean_accuracy, overall_accuracy, per_category_iou, per_category_accuracy.
Example:
    >>> metric = evaluate.load("path/to/mean_iou")
    >>> metric.compute(predictions=[[[0, 1]]], references=[[[0, 1]]], num_labels=2, ignore_index=255)["mean_iou"]
    1.0
"""

_CITATION = """@software{MMSegmentation_Contributors_OpenMMLab_Semantic_Segmentation_2020,
author = {{MMSegmentation Contributors}},
title = {{OpenMMLab Semantic Segmentation Toolbox and Benchmark}},
url = {https://github.com/open-mmlab/mmsegmentation},
year = {2020}
}"""


def confusion_matrix(prediction, reference, num_labels, ignore_index, label_map=None, reduce_labels=False):
    """(num_labels, num_labels) counts, rows = reference class, columns = predicted class."""
    prediction = np.asarray(prediction).astype(np.int64)
    reference = np.asarray(reference).astype(np.int64)
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} != reference shape {reference.shape}")
    if label_map:
        mapped = reference.copy()
        for old, new in label_map.items():
            mapped[reference == int(old)] = int(new)
        reference = mapped
    if reduce_labels:
        reference = np.where(reference == 0, 255, reference - 1)
        reference = np.where(reference == 254, 255, reference)
    valid = reference != ignore_index
    valid &= (reference >= 0) & (reference < num_labels)
    pred = prediction[valid]
    if pred.size and (pred.min() < 0 or pred.max() >= num_labels):
        bad = pred[(pred < 0) | (pred >= num_labels)][0]
        raise ValueError(f"prediction contains class {bad}, outside [0, num_labels={num_labels})")
    return np.bincount(reference[valid] * num_labels + pred, minlength=num_labels**2).reshape(num_labels, num_labels)


def metrics_from_confusion(confusion, nan_to_num=None):
    """mean IoU, mean accuracy, overall accuracy and per-class values from a confusion matrix."""
    confusion = np.asarray(confusion, dtype=np.float64)
    intersect = np.diag(confusion)
    area_label = confusion.sum(axis=1)
    area_pred = confusion.sum(axis=0)
    union = area_label + area_pred - intersect
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersect / union
        acc = intersect / area_label
    total = area_label.sum()
    result = {
        "mean_iou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "mean_accuracy": float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
        "overall_accuracy": float(intersect.sum() / total) if total else float("nan"),
        "per_category_iou": iou,
        "per_category_accuracy": acc,
    }
    if nan_to_num is not None:
        result = {k: np.nan_to_num(v, nan=nan_to_num) if isinstance(v, np.ndarray) else
                  (nan_to_num if v != v else v) for k, v in result.items()}
    return result


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                }
            ),
            reference_urls=["https://github.com/open-mmlab/mmsegmentation"],
        )

    def _compute(self, predictions, references, num_labels, ignore_index, nan_to_num=None, label_map=None,
                 reduce_labels=False):
        if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
        for prediction, reference in zip(predictions, references):
            confusion += confusion_matrix(prediction, reference, num_labels, ignore_index, label_map, reduce_labels)
        return metrics_from_confusion(confusion, nan_to_num)
