"""Super-class guided routing: the router learns super-classes (seen through the Trainer logs via
RouterStatsCallback), and inference routing never looks at labels."""

import torch
from conftest import tiny_config
from transformers import Trainer, TrainingArguments

from hf_vmoe import VMoEForImageClassification
from hf_vmoe.integrations.callbacks import RouterStatsCallback

SUPERCLASSES = [0, 0, 1, 1, 2]


def colour_dataset(n, seed=0):
    """Class c: a colour that depends on its super-class (channel) plus a class-specific brightness, + noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 5
    pixels = torch.randn(n, 3, 32, 32, generator=g)
    for i, c in enumerate(labels.tolist()):
        pixels[i, SUPERCLASSES[c]] += 0.1 + 0.05 * (c % 2)
    return [{"pixel_values": pixels[i], "labels": labels[i]} for i in range(n)]


def superclass_config(**overrides):
    kwargs = dict(num_experts=3, superclass_ids=SUPERCLASSES, train_routing="superclass")
    kwargs.update(overrides)
    return tiny_config(**kwargs)


def test_router_learns_superclasses_and_stats_reach_the_trainer_logs(tmp_path):
    model = VMoEForImageClassification(superclass_config(superclass_loss_coef=1.0))
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=40, learning_rate=1e-3,
        logging_steps=2, eval_strategy="steps", eval_steps=40, per_device_eval_batch_size=32, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=colour_dataset(160), eval_dataset=colour_dataset(60, 1))
    stats = RouterStatsCallback.attach(trainer)
    assert trainer.callback_handler.callbacks[0] is stats
    trainer.train()
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    eval_logs = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(train_logs) == 20 and eval_logs
    for key in ("router_superclass_accuracy", "router_superclass_loss", "router_aux_loss", "expert_load_max",
                "expert_load_min", "expert_load_0", "expert_load_2"):
        assert key in train_logs[0], key
    first = train_logs[0]["router_superclass_accuracy"]
    last = sum(h["router_superclass_accuracy"] for h in train_logs[-3:]) / 3
    assert first < 0.6 and last > 0.85, (first, last)  # chance: 0.4 (the biggest super-class)
    assert train_logs[-1]["router_superclass_loss"] < train_logs[0]["router_superclass_loss"]
    # forced super-class routing in training: expert load = super-class shares (2/5, 2/5, 1/5) x 3 experts
    assert abs(train_logs[-1]["expert_load_0"] - 1.2) < 0.3 and abs(train_logs[-1]["expert_load_2"] - 0.6) < 0.3
    # at eval the router decides alone: its accuracy on held-out data is the real router accuracy
    assert eval_logs[-1]["eval_router_superclass_accuracy"] > 0.7
    assert stats.history and stats.history[-1]["step"] == 40


def test_callback_without_superclasses_logs_expert_load(tmp_path):
    model = VMoEForImageClassification(tiny_config(num_experts=3))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4, logging_steps=2,
                             report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True)
    callback = RouterStatsCallback(per_expert=False)
    trainer = Trainer(model=model, args=args, train_dataset=colour_dataset(32), callbacks=[callback])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert "router_superclass_accuracy" not in logs[0] and "expert_load_0" not in logs[0]
    assert 1.0 <= logs[0]["expert_load_max"] <= 3.0 and 0.0 <= logs[0]["expert_load_min"] <= 1.0


def test_dense_model_logs_nothing_extra(tmp_path):
    model = VMoEForImageClassification(tiny_config(moe_layers="none"))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2, logging_steps=1,
                             report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=colour_dataset(16))
    RouterStatsCallback.attach(trainer)
    trainer.train()
    assert not any(k.startswith(("router_", "expert_load")) for h in trainer.state.log_history for k in h)


def test_eval_routing_does_not_look_at_labels():
    model = VMoEForImageClassification(superclass_config(output_router_logits=True)).eval()
    x = torch.stack([d["pixel_values"] for d in colour_dataset(10)])
    labels = torch.arange(10) % 5
    wrong = (labels + 2) % 5
    with torch.no_grad():
        plain = model(pixel_values=x)
        with_labels = model(pixel_values=x, labels=labels)
        with_wrong = model(pixel_values=x, labels=wrong)
    for out in (with_labels, with_wrong):
        torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=0)
        assert torch.equal(out.expert_counts, plain.expert_counts)
        torch.testing.assert_close(out.router_logits[0], plain.router_logits[0], rtol=0, atol=0)
    # labels only add the super-class loss/accuracy on top of the same routing
    assert plain.superclass_accuracy is None and with_labels.superclass_accuracy is not None


def test_training_routing_does_follow_labels():
    """The counterpart (so the test above can fail): in training, super-class routing sends images by label."""
    model = VMoEForImageClassification(superclass_config()).train()
    x = torch.stack([d["pixel_values"] for d in colour_dataset(10)])
    labels = torch.arange(10) % 5
    out = model(pixel_values=x, labels=labels)
    expected = torch.bincount(torch.tensor(SUPERCLASSES)[labels], minlength=3)
    assert torch.equal(out.expert_counts[0], expected)
    all_zero = model(pixel_values=x, labels=torch.zeros_like(labels))
    assert all_zero.expert_counts[0].tolist() == [10, 0, 0]
