"""The Trainer: loss goes down, predictions are plain logits, an interrupted run resumes to the same parameters,
seeded training is reproducible. CPU, tiny configs, in-memory random data."""

import numpy as np
import pytest
import torch
from conftest import tiny_config
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_vmoe import VMoEForImageClassification, VMoEForSemanticSegmentation

ROUTINGS = [dict(routing_level="image", num_experts_per_tok=2),
            dict(routing_level="token", num_shared_experts=1, capacity_factor=1.0)]


class RandomImages(torch.utils.data.Dataset):
    """A fixed set of random images; with `segmentation`, per-pixel labels that depend on the image."""

    def __init__(self, size=16, seed=0, segmentation=False):
        generator = torch.Generator().manual_seed(seed)
        self.pixels = torch.randn(size, 3, 32, 32, generator=generator)
        self.segmentation = segmentation
        if segmentation:
            patch_means = torch.nn.functional.avg_pool2d(self.pixels[:, :2], 8)  # labels constant per 8x8 patch
            patch_labels = (patch_means[:, 0] > 0).long() + (patch_means[:, 1] > 0).long()
            self.labels = patch_labels.repeat_interleave(8, 1).repeat_interleave(8, 2)
        else:
            self.labels = torch.randint(0, 5, (size,), generator=generator)

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, index):
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


def arguments(path, **overrides):
    kwargs = dict(output_dir=str(path), per_device_train_batch_size=4, per_device_eval_batch_size=8,
                  learning_rate=3e-3, max_steps=40, use_cpu=True, report_to=[], seed=0, logging_steps=1,
                  save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, weight_decay=0.01,
                  lr_scheduler_type="linear", warmup_steps=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


@pytest.mark.parametrize("overrides", ROUTINGS, ids=["image", "token"])
def test_trainer_lowers_the_loss(overrides, tmp_path):
    torch.manual_seed(0)
    data = RandomImages()
    model = VMoEForImageClassification(tiny_config(**overrides))
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=data, eval_dataset=data)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.6 * before, (before, after)
    predictions = trainer.predict(data)
    assert isinstance(predictions.predictions, np.ndarray) and predictions.predictions.shape == (16, 5)


def test_trainer_segmentation_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    data = RandomImages(size=8, segmentation=True)
    model = VMoEForSemanticSegmentation(tiny_config(routing_level="token", num_labels=3))
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=30), train_dataset=data, eval_dataset=data)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < 0.8 * before


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


@pytest.mark.parametrize("overrides", ROUTINGS, ids=["image", "token"])
def test_resume_from_checkpoint_reaches_the_same_parameters(overrides, tmp_path):
    # noise and dropout make the run depend on the restored RNG state as well
    config = dict(overrides, router_noise_std=0.5, hidden_dropout_prob=0.1, drop_path_rate=0.1)
    data = RandomImages()
    args = dict(max_steps=6, save_strategy="steps", save_steps=3)

    torch.manual_seed(0)
    straight = Trainer(model=VMoEForImageClassification(tiny_config(**config)),
                       args=arguments(tmp_path / "straight", **args), train_dataset=data)
    straight.train()

    torch.manual_seed(0)
    interrupted = Trainer(model=VMoEForImageClassification(tiny_config(**config)),
                          args=arguments(tmp_path / "resumed", **args), train_dataset=data,
                          callbacks=[StopAt(3)])
    interrupted.train()
    assert interrupted.state.global_step == 3
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    assert (checkpoint / "model.safetensors").exists()
    assert not (checkpoint / "pytorch_model.bin").exists()  # weights in safetensors only

    torch.manual_seed(123)  # a different process state: everything must come from the checkpoint
    resumed = Trainer(model=VMoEForImageClassification(tiny_config(**config)),
                      args=arguments(tmp_path / "resumed", **args), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    expected = dict(straight.model.named_parameters())
    for name, parameter in resumed.model.named_parameters():
        torch.testing.assert_close(parameter, expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("overrides", ROUTINGS, ids=["image", "token"])
def test_seeded_training_is_reproducible(overrides):
    config = tiny_config(**overrides, router_noise_std=0.5, hidden_dropout_prob=0.1, drop_path_rate=0.1)
    data = RandomImages(size=8)

    def run():
        torch.manual_seed(0)
        model = VMoEForImageClassification(config).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for step in range(3):
            batch = slice(4 * (step % 2), 4 * (step % 2) + 4)
            loss = model(data.pixels[batch], labels=data.labels[batch]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return model.state_dict()

    first, second = run(), run()
    for name in first:
        assert torch.equal(first[name], second[name]), name
