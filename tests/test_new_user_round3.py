"""What a new user hit, third round (issue 27): fine-tuning a super-class MoE to new labels, missing extras, our own
errors before upstream's, import noise, a fast `hf-vmoe --help`, docs that match a run."""

import logging

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForImageClassification, Trainer, TrainingArguments

from hf_vmoe import VMoEForImageClassification

# ----------------------------------------------------------------------------------------------------------------
# 1. a super-class MoE fine-tuned to a new label set
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def superclass_moe(tmp_path):
    path = tmp_path / "superclass-moe"
    config = tiny_config(num_labels=8, superclass_ids=[0, 0, 1, 1, 2, 2, 3, 3], train_routing="superclass")
    VMoEForImageClassification(config).save_pretrained(path)
    return path


def test_new_labels_reset_the_superclass_map_and_log_it(superclass_moe, caplog):
    with caplog.at_level(logging.WARNING):
        model = AutoModelForImageClassification.from_pretrained(superclass_moe, num_labels=3,
                                                                ignore_mismatched_sizes=True)
    assert model.config.num_labels == 3 and model.classifier.out_features == 3
    assert model.config.superclass_ids is None and model.config.train_routing == "router"
    assert "superclass_ids reset to None" in caplog.text and "learned router" in caplog.text
    assert "8 entries" in caplog.text and "num_labels is now 3" in caplog.text
    same = AutoModelForImageClassification.from_pretrained(superclass_moe, num_labels=8)
    assert same.config.superclass_ids == [0, 0, 1, 1, 2, 2, 3, 3]  # the same label count keeps the map


@pytest.mark.parametrize("superclass_ids", [None, [0, 1, 1]])
def test_an_explicit_superclass_ids_kwarg_is_used(superclass_moe, superclass_ids):
    model = AutoModelForImageClassification.from_pretrained(superclass_moe, num_labels=3, superclass_ids=superclass_ids,
                                                            train_routing="router", ignore_mismatched_sizes=True)
    assert model.config.superclass_ids == superclass_ids


def test_trainer_fine_tunes_a_superclass_moe_on_new_labels(superclass_moe, tmp_path):
    model = AutoModelForImageClassification.from_pretrained(superclass_moe, num_labels=3, ignore_mismatched_sizes=True)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(12, 3, 32, 32, generator=generator)
    labels = (pixels[:, 0].mean((1, 2)) > 0).long() + (pixels[:, 1].mean((1, 2)) > 0).long()  # learnable labels
    data = [{"pixel_values": p, "labels": y} for p, y in zip(pixels, labels)]
    router_before = model.vmoe.encoder.router.weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=3e-3,
                             max_steps=12, use_cpu=True, report_to=[], seed=0, logging_steps=1, save_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) < sum(losses[:3]), losses
    assert not torch.equal(model.vmoe.encoder.router.weight.detach(), router_before)  # the router learns
