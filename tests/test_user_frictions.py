"""What a new user hit running the recipe on an unseen dataset (issue 16): routing-health warnings, held-out
super-class split, log interval and pinned memory defaults, the model card, heatmap labels, `hf-vmoe analyze`.
(The pipeline prompt is tests/test_pipeline_prompt.py.)"""

import csv
import json
import logging

import matplotlib.axes
import numpy as np
import pytest
import torch
from conftest import load_example, tiny_config
from PIL import Image
from transformers import Trainer, TrainingArguments
from transformers.modeling_outputs import ModelOutput

from hf_vmoe import VMoEForImageClassification
from hf_vmoe.analysis import plot_heatmap
from hf_vmoe.callbacks import RouterStatsCallback, routing_health
from hf_vmoe.cli import main as cli_main

# ----------------------------------------------------------------------------------------------------------------
# 7. heatmap labels
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def axes_spy(monkeypatch):
    calls = {"yticklabels": [], "ylabel": []}
    real_ticks, real_label = matplotlib.axes.Axes.set_yticklabels, matplotlib.axes.Axes.set_ylabel

    def ticks(self, labels, *args, **kwargs):
        calls["yticklabels"].append(([str(x) for x in labels], kwargs.get("fontsize")))
        return real_ticks(self, labels, *args, **kwargs)

    def label(self, text, *args, **kwargs):
        calls["ylabel"].append(text)
        return real_label(self, text, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_yticklabels", ticks)
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel", label)
    return calls


def _counts(num_classes, num_experts, seed=0):
    return np.random.default_rng(seed).random((num_classes, num_experts)) ** 4 * 100 + 0.01


def test_heatmap_names_101_rows_readably(tmp_path, axes_spy):
    names = [f"category_{i}" for i in range(101)]
    plotted = plot_heatmap(_counts(101, 10), tmp_path / "h.png", class_names=names, rows_csv=tmp_path / "rows.csv")
    (labels, fontsize), = axes_spy["yticklabels"]
    assert labels == [names[i] for i in plotted["order"]] and fontsize >= 7
    with open(tmp_path / "rows.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class_name"] for r in rows] == labels and [int(r["class_id"]) for r in rows] == plotted["order"]


def test_heatmap_too_many_rows_points_to_the_csv(tmp_path, axes_spy):
    names = [f"n{i}" for i in range(300)]
    plotted = plot_heatmap(_counts(300, 8), tmp_path / "h.png", class_names=names, rows_csv=tmp_path / "h_rows.csv")
    assert not plotted["labelled"] and axes_spy["yticklabels"] == []
    assert "h_rows.csv" in axes_spy["ylabel"][0]
    with open(tmp_path / "h_rows.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 300 and rows[0]["class_name"] == names[plotted["order"][0]]


def test_small_heatmap_tick_labels_are_not_tiny(tmp_path, axes_spy):  # the demo's 10 digits
    plot_heatmap(_counts(10, 5), tmp_path / "h.png", class_names=[str(i) for i in range(10)])
    (_, fontsize), = axes_spy["yticklabels"]
    assert fontsize >= 9


# ----------------------------------------------------------------------------------------------------------------
# 8. hf-vmoe analyze
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def animal_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("animals")
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "owl"):
        (root / name).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_analyze_cli_verb(tmp_path, animal_folder, capsys):
    model = VMoEForImageClassification(tiny_config(num_labels=3, id2label={0: "cat", 1: "dog", 2: "owl"}))
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "report"
    assert cli_main(["analyze", str(tmp_path / "model"), "--data-dir", str(animal_folder), "--output-dir", str(out),
                     "--batch-size", "4", "--max-samples", "7", "--threshold", "0.5"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recommendation"]["threshold"] == 0.5 and report["class_names"] == ["cat", "dog", "owl"]
    for layer in report["moe_layers"]:
        assert sum(map(sum, report["counts"][str(layer)])) == 7
        assert (out / f"heatmap_layer{layer}.png").exists()
        assert report["heatmaps"][str(layer)]["rows_csv"] == f"heatmap_layer{layer}_rows.csv"
        assert (out / f"heatmap_layer{layer}_rows.csv").read_text().count("\n") == 1 + len(
            report["heatmaps"][str(layer)]["class_order"])
    assert '"recommendation"' in capsys.readouterr().out
    # the example script's spelling works too, and bad input is an error naming it
    assert cli_main(["analyze", str(tmp_path / "model"), "--data_dir", str(animal_folder), "--output_dir",
                     str(tmp_path / "r2"), "--max_samples", "3"]) == 0
    assert cli_main(["analyze", str(tmp_path / "model"), "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# 2. routing health
# ----------------------------------------------------------------------------------------------------------------


class FixedRouting(torch.nn.Module):
    """A stand-in model whose outputs carry fixed routing statistics, as VMoE's do (for a forced collapse)."""

    def __init__(self, expert_share, superclass_accuracy):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.share = torch.tensor(expert_share, dtype=torch.float)
        self.accuracy = superclass_accuracy
        self.config = tiny_config(num_experts=len(expert_share), router_aux_loss_coef=0.01)

    def forward(self, pixel_values, labels=None):
        batch = pixel_values.shape[0]
        counts = (self.share * batch).round().unsqueeze(0)  # one router call
        return ModelOutput(loss=(self.weight * 0).sum() + 1.0, logits=torch.zeros(batch, 5) + self.weight,
                           expert_counts=counts, superclass_accuracy=torch.tensor(self.accuracy),
                           aux_loss=torch.tensor(0.1))


class Images(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        return {"pixel_values": torch.zeros(3, 8, 8), "labels": torch.tensor(i % 5)}


def _evaluate_twice(model, tmp_path, caplog):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=10, report_to="none", use_cpu=True)
    trainer = Trainer(model=model, args=args, eval_dataset=Images())
    callback = RouterStatsCallback.attach(trainer)
    with caplog.at_level(logging.INFO, logger="hf_vmoe.callbacks"):
        trainer.evaluate()
        trainer.evaluate()
    return callback, [r for r in caplog.records if r.name == "hf_vmoe.callbacks"]


def test_collapsed_routing_warns_once_per_evaluation_with_knobs(tmp_path, caplog):
    # one expert takes 60% of the images, one gets none: the collapse (balanced share = 25%)
    model = FixedRouting([0.6, 0.3, 0.1, 0.0], superclass_accuracy=0.3)
    callback, records = _evaluate_twice(model, tmp_path, caplog)
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and len(records) == 2  # one line per evaluation, nothing else
    message = warnings[0].getMessage()
    assert "routing health" in message and "unhealthy" in message
    assert "2.40x" in message and "0.00x" in message and "super-class accuracy 0.300" in message
    for knob in ("router_aux_loss_coef (now 0.01)", "superclass_loss_coef", "--warmup_ratio", "capacity_factor"):
        assert knob in message, knob
    assert callback.health["status"] == "unhealthy" and len(callback.health["problems"]) == 3
    assert callback.health["expert_load_max"] == pytest.approx(2.4)


def test_balanced_routing_logs_ok_without_warning(tmp_path, caplog):
    callback, records = _evaluate_twice(FixedRouting([0.3, 0.2, 0.2, 0.3], 0.9), tmp_path, caplog)
    assert [r.levelno for r in records] == [logging.INFO, logging.INFO]
    assert records[0].getMessage().startswith("routing health at step 0: ok")
    assert callback.health["status"] == "ok" and callback.health["problems"] == []


def test_routing_health_thresholds_and_errors():
    health = routing_health({"eval_expert_load_max": 2.64, "eval_expert_load_min": 0.086,
                             "eval_router_superclass_accuracy": 0.456})
    assert health["status"] == "unhealthy" and len(health["problems"]) == 3
    assert health["thresholds"] == {"max_load": 2.0, "min_load": 0.25, "min_superclass_accuracy": 0.5}
    assert routing_health({"eval_expert_load_max": 2.64}, max_load=3.0)["status"] == "ok"
    assert routing_health({"eval_accuracy": 0.5}) is None  # a dense model: nothing to check
    with pytest.raises(ValueError, match="min_load"):
        RouterStatsCallback(min_load=-1)
