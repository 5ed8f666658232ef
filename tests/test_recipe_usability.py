"""The recipe on an unseen dataset, as a new user runs it: routing-health warnings, held-out
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
from hf_vmoe.recipes.analysis import plot_heatmap
from hf_vmoe.integrations.callbacks import RouterStatsCallback, routing_health
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
    with caplog.at_level(logging.INFO, logger="hf_vmoe.integrations.callbacks"):
        trainer.evaluate()
        trainer.evaluate()
    return callback, [r for r in caplog.records if r.name == "hf_vmoe.integrations.callbacks"]


def test_collapsed_routing_warns_once_per_evaluation_with_knobs(tmp_path, caplog):
    # one expert takes 60% of the images, one gets none: the collapse (balanced share = 25%)
    model = FixedRouting([0.6, 0.3, 0.1, 0.0], superclass_accuracy=0.3)
    callback, records = _evaluate_twice(model, tmp_path, caplog)
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and len(records) == 2  # one line per evaluation, nothing else
    message = warnings[0].getMessage()
    assert "routing health" in message and "unhealthy" in message
    assert "2.40x" in message and "0.00x" in message and "super-class accuracy 0.300" in message
    for knob in ("router_aux_loss_coef (now 0.01)", "router_bias_update_rate=1e-3", "superclass_loss_coef",
                 "--warmup_ratio", "capacity_factor"):
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


# ----------------------------------------------------------------------------------------------------------------
# 6. model card
# ----------------------------------------------------------------------------------------------------------------


def _card(**kwargs):
    from hf_vmoe.integrations.hub import build_model_card

    config = tiny_config(superclass_ids=[0, 1, 2, 3, 0])
    return str(build_model_card(config, "org/moe", trained_on="a toy set", **kwargs))


def _meta(text):
    import yaml

    return yaml.safe_load(text.split("---\n")[1])


def test_card_says_what_the_model_was_trained_from(tmp_path):
    scratch = _card(trained_from="scratch")
    assert "Trained from scratch (random initialisation)." in scratch
    assert "huggingface.co/" not in scratch and "Fine-tuned" not in scratch and "base_model" not in _meta(scratch)
    local = tmp_path / "dense"
    local.mkdir()
    upcycled = _card(trained_from=str(local), upcycled=True)
    assert f"Upcycled from the dense model `{local}`, a local checkpoint not on the Hub" in upcycled
    assert "huggingface.co/" not in upcycled and "base_model" not in _meta(upcycled)
    hub = _card(trained_from="org/vit-dense")
    assert "Fine-tuned from [org/vit-dense](https://huggingface.co/org/vit-dense)." in hub
    assert _meta(hub)["base_model"] == "org/vit-dense"
    unstated = _card()
    assert "scratch" not in unstated and "Fine-tuned" not in unstated
    with pytest.raises(ValueError, match="trained_on"):
        from hf_vmoe.integrations.hub import build_model_card

        build_model_card(tiny_config(), "org/x", trained_from="scratch")  # untrained weights trained from?


def test_card_expert_load_in_one_named_unit():
    health = routing_health({"eval_expert_load_max": 2.64, "eval_expert_load_min": 0.086,
                             "eval_router_superclass_accuracy": 0.456})
    text = _card(trained_from="scratch", routing_health=health, expert_load=[0.66, 0.0215, 0.16, 0.1585])
    section = text.split("## Routing health")[1].split("\n## ")[0]
    assert "**unhealthy**" in section and "percent of the routed images (balanced: 25.0% each)" in section
    assert "busiest expert 66.0% (> 50.0%)" in section and "idlest expert 2.1% (< 6.2%)" in section
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| |")]
    assert len(rows) == 7 and all(line.rstrip(" |").endswith("%") for line in rows), rows
    assert "| expert 1 | 2.1% |" in section and "| busiest expert | 66.0% |" in section
    assert "x a balanced" not in section and "0.0215" not in section  # no second unit


# ----------------------------------------------------------------------------------------------------------------
# 4. super-classes from a held-out share of train
# ----------------------------------------------------------------------------------------------------------------

SPLIT_CLASSES = 5


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(1)
    for c in range(SPLIT_CLASSES):
        colour = rng.integers(0, 255, 3)
        for split, count in (("train", 10), ("val", 3)):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(colour + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _paths(dataset):
    from datasets import Image as ImageFeature

    return [row["path"] for row in dataset.cast_column("image", ImageFeature(decode=False))["image"]]


@pytest.mark.parametrize("with_validation_dir", [True, False])
def test_heldout_split_never_overlaps_evaluation_or_training(small_folder, with_validation_dir):
    script = load_example("run_image_classification")
    data_args = script.DataTrainingArguments(train_dir=str(small_folder / "train"),
                                             validation_dir=str(small_folder / "val") if with_validation_dir else None)
    dataset = script.load_data(data_args)
    train_before = _paths(dataset["train"])
    train, heldout = script.split_heldout(dataset["train"], 0.2, seed=3)
    train_paths, held_paths, eval_paths = _paths(train), _paths(heldout), _paths(dataset["validation"])
    assert not set(held_paths) & set(eval_paths) and not set(held_paths) & set(train_paths)
    assert sorted(train_paths + held_paths) == sorted(train_before)
    per_class = np.bincount(heldout["label"], minlength=SPLIT_CLASSES)
    expected = [max(1, round(0.2 * n)) for n in np.bincount(dataset["train"]["label"], minlength=SPLIT_CLASSES)]
    assert per_class.tolist() == expected  # the share of each class, not of the whole set
    again = script.split_heldout(dataset["train"], 0.2, seed=3)[1]
    assert _paths(again) == held_paths and _paths(script.split_heldout(dataset["train"], 0.2, seed=4)[1]) != held_paths
    with pytest.raises(ValueError, match="superclass_heldout_share"):
        script.DataTrainingArguments(train_dir="x", superclass_heldout_share=1.0)


def _args(root, out, *extra):
    # no --logging_steps and no --use_cpu: the script's defaults are under test
    return ["--train_dir", str(root / "train"), "--validation_dir", str(root / "val"), "--output_dir", str(out),
            "--image_size", "24", "--patch_size", "8", "--do_train", "--do_eval", "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "8", "--learning_rate", "1e-3", "--report_to", "none",
            "--save_strategy", "no", "--disable_tqdm", "true", "--seed", "0", *extra]


def test_recipe_defaults_heldout_health_and_card(small_folder, tmp_path, caplog):
    import warnings

    from hf_vmoe.recipes.flops import count_flops

    script = load_example("run_image_classification")
    dense_dir, moe_dir = tmp_path / "dense", tmp_path / "moe"
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        dense = script.main(["--preset", "vit-3x64", "--compute_superclasses", "2", "--max_steps", "40"]
                            + _args(small_folder, dense_dir))
    assert not [w for w in caught if "pin_memory" in str(w.message)]
    assert dense.args.dataloader_pin_memory is False
    # 5. about 20 training-loss lines (40 steps, every 2), not none (the stock 500-step interval)
    assert [h["step"] for h in dense.state.log_history if "loss" in h] == list(range(2, 41, 2))
    # 4. super-classes from 10% of each class's training images (1 of 10), never the 15 validation images
    superclasses = json.loads((dense_dir / "superclasses.json").read_text())
    # soft counts (probabilities) saved to 4 decimals: each of the 5 x 5 entries off by at most 5e-5
    assert abs(np.asarray(superclasses["confusion_matrix"]).sum() - SPLIT_CLASSES) <= SPLIT_CLASSES ** 2 * 5e-5
    assert any("holding out 5 training images" in r.getMessage() for r in caplog.records)
    # 6. the card of a dense model trained from a preset: from scratch, no link to a preset "repo"
    # 3. the dense run counts its training FLOPs the same way (3 x forward FLOPs x images), so runs compare
    dense_results = json.loads((dense_dir / "all_results.json").read_text())
    images = dense.state.global_step * 4 - 4 * 3 + 3 * (45 % 4)  # 40 steps of 4 over 45 images: 3 short batches
    assert dense_results["total_flos"] == 3 * images * count_flops(dense.model.config).flops
    card = (dense_dir / "README.md").read_text()
    assert "Trained from scratch" in card and "huggingface.co/vit-3x64" not in card and "fine-tuned" not in card

    caplog.clear()
    with caplog.at_level(logging.INFO):
        moe = script.main(["--preset", "mobile-vmoe-3x64", "--config_overrides", "num_experts=2",
                           "--superclasses_file", str(dense_dir / "superclasses.json"), "--init_from_dense",
                           str(dense_dir), "--num_train_epochs", "2"] + _args(small_folder, moe_dir))
    # the MoE holds out the dense run's 5 images too: 2 epochs of 45 images in batches of 4, 24 steps, a log every 2
    steps = moe.state.global_step
    assert steps == 24
    loss_logs = [h for h in moe.state.log_history if "loss" in h]
    assert len(loss_logs) == steps // 2 and all("expert_load_max" in h for h in loss_logs)
    # 2. one routing-health line per evaluation, and the same summary in all_results.json and the card
    health_lines = [r.getMessage() for r in caplog.records if r.name == "hf_vmoe.integrations.callbacks"]
    assert len(health_lines) == 1 and health_lines[0].startswith(f"routing health at step {steps}: ")
    results = json.loads((moe_dir / "all_results.json").read_text())
    assert health_lines[0].endswith(results["eval_routing_health"])
    # 3. total_flos: the active training FLOPs (3 x forward) of the 90 images trained on, not 6 x pixels x params
    assert results["total_flos"] == 3 * 90 * count_flops(moe.model.config).flops
    card = (moe_dir / "README.md").read_text()
    assert f"Upcycled from the dense model `{dense_dir}`, a local checkpoint not on the Hub" in card
    assert "## Routing health" in card and "(balanced: 50.0% each)" in card
    status = "ok" if results["eval_routing_health"].startswith("ok") else "unhealthy"
    assert f"Routing health on the evaluation split: **{status}**" in card


def test_explicit_heldout_folder_matches_the_cli(small_folder, tmp_path):
    from hf_vmoe.recipes.superclasses import load_superclass_map

    script = load_example("run_image_classification")
    out = tmp_path / "dense"
    script.main(["--preset", "vit-3x64", "--compute_superclasses", "2", "--max_steps", "4",
                 "--superclass_heldout_dir", str(small_folder / "val")] + _args(small_folder, out))
    superclasses = json.loads((out / "superclasses.json").read_text())
    # every image of that folder (the script partitions the soft matrix: each image adds probabilities summing to 1)
    # soft counts saved to 4 decimals: each of the 5 x 5 entries off by at most 5e-5
    assert abs(np.asarray(superclasses["confusion_matrix"]).sum() - 3 * SPLIT_CLASSES) <= SPLIT_CLASSES ** 2 * 5e-5
    cli_file = tmp_path / "cli.json"
    assert cli_main(["superclasses", "from-model", "--model", str(out), "--validation-dir", str(small_folder / "val"),
                     "--num-experts", "2", "--soft", "-o", str(cli_file)]) == 0
    names = [f"c{c}" for c in range(SPLIT_CLASSES)]
    assert load_superclass_map(cli_file, class_names=names) == superclasses["superclass_ids"]


def test_script_defaults_respect_the_command_line(tmp_path):
    from hf_vmoe.integrations.script_defaults import apply_script_defaults, flag_given

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    assert args.logging_steps == 500 and args.dataloader_pin_memory
    assert apply_script_defaults(args, ["--output_dir", "x"]) == {"logging_steps": 0.05,
                                                                   "dataloader_pin_memory": False}
    kept = TrainingArguments(output_dir=str(tmp_path), report_to="none", logging_steps=7)
    assert apply_script_defaults(kept, ["--logging_steps=7", "--dataloader-pin-memory", "true"]) == {}
    assert kept.logging_steps == 7 and kept.dataloader_pin_memory
    steps = TrainingArguments(output_dir=str(tmp_path), report_to="none", eval_strategy="steps")
    apply_script_defaults(steps, [])
    assert steps.eval_steps == steps.logging_steps == 0.05
    (tmp_path / "a.json").write_text(json.dumps({"logging_steps": 3}))
    assert flag_given([str(tmp_path / "a.json")], "logging_steps") and not flag_given(["--logging_stepsx"],
                                                                                        "logging_steps")
