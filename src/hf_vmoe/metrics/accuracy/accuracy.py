"""Top-1 accuracy as an offline `evaluate` metric module.

`evaluate.load("accuracy")` downloads the metric script from the Hub; this copy ships inside hf_vmoe, so

    import os, evaluate, hf_vmoe
    metric = evaluate.load(os.path.join(os.path.dirname(hf_vmoe.__file__), "metrics", "accuracy"))

works without a network. Same inputs and output as the Hub's `accuracy`: `predictions`, `references`, optional
`sample_weight` and `normalize`; returns `{"accuracy": float}`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the proportion of correct predictions among all predictions (top-1 for classification)."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    normalize (`bool`, default True): return the fraction of correct predictions; False returns their count.
    sample_weight (`list` of `float`, optional): per-example weights.
Returns:
    accuracy (`float`): in [0, 1] when normalize=True.
Examples:
    >>> metric = evaluate.load(path_to_this_folder)
    >>> metric.compute(references=[0, 1, 2, 0], predictions=[0, 1, 1, 0])
    {'accuracy': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(
                f"predictions and references differ in length: {predictions.shape} vs {references.shape}"
            )
        if predictions.size == 0:
            raise ValueError("accuracy of an empty set of predictions is undefined")
        correct = (predictions == references).astype(np.float64)
        if sample_weight is not None:
            sample_weight = np.asarray(sample_weight, dtype=np.float64)
            if sample_weight.shape != correct.shape:
                raise ValueError(f"sample_weight has shape {sample_weight.shape}, expected {correct.shape}")
            score = (correct * sample_weight).sum()
            total = sample_weight.sum()
        else:
            score, total = correct.sum(), correct.size
        return {"accuracy": float(score / total) if normalize else float(score)}
