"""Router statistics in the Trainer's logs.

`RouterStatsCallback` puts, next to `loss` and `eval_loss`, what a user needs to see whether MoE routing works:

* `router_superclass_accuracy`: share of images whose router top-1 expert is their label's super-class (needs
  `config.superclass_ids`; at eval the router decides alone, so `eval_router_superclass_accuracy` is the router's
  real accuracy);
* `router_superclass_loss`, `router_aux_loss`: the super-class cross-entropy and all routing losses (as added to
  `loss`);
* `expert_load_max` / `expert_load_min` and, with `per_expert=True`, `expert_load_<e>`: the busiest / idlest /
  e-th expert's load, all in one unit: multiples of a balanced share (its share of the routed items times E;
  1.0 = balanced, E = everything went to this expert, 0 = idle).

A callback never sees model outputs, so the callback registers a forward hook on the model:
the hook (registered when the Trainer is built, or by `attach`) adds each forward's `superclass_accuracy`, `expert_counts`, `aux_loss` and `superclass_loss` to running
sums (train and eval kept apart by `model.training`); `on_log` turns the sums since the last log into averages.

`Trainer.log` stores a copy of `logs` in `state.log_history` *before* callbacks run, and calls callbacks in the
order they were added (the progress bar and reporters first). `on_log` therefore also updates the history entry,
and `RouterStatsCallback.attach(trainer)` inserts the callback at the front so the progress bar and every reporter
(TensorBoard, W&B, ...) see the router statistics too:

    trainer = Trainer(model=model, args=args, ...)
    RouterStatsCallback.attach(trainer)
    trainer.train()

Routing health. After every evaluation the callback checks the evaluation's routing against three thresholds
(constructor arguments; the defaults are `HEALTH_THRESHOLDS`):

* `max_load` = 2.0: the busiest expert gets more than twice a balanced share (`eval_expert_load_max` > 2.0);
* `min_load` = 0.25: the idlest expert gets under a quarter of a balanced share (`eval_expert_load_min` < 0.25);
* `min_superclass_accuracy` = 0.5: the router sends half the images or more to an expert outside their
  super-class (`eval_router_superclass_accuracy` < 0.5; only with super-classes).

It logs one line per evaluation through the `hf_vmoe.integrations.callbacks` logger: INFO "routing health: ok ..." or, when a
threshold is crossed, a WARNING naming each problem and the knobs that help: the balancing loss
(`router_aux_loss_coef`) or loss-free balancing (`router_bias_update_rate`), the super-class loss weight (`superclass_loss_coef`), a learning-rate warm-up
(`--warmup_ratio` / `--warmup_steps`, so the router does not lock in early) and an expert capacity
(`capacity_factor`). `callback.health` keeps the last check (`routing_health` computes it from any metrics dict).
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

HEALTH_THRESHOLDS = {"max_load": 2.0, "min_load": 0.25, "min_superclass_accuracy": 0.5}


def _vmoe_config(model):
    config = getattr(model, "config", None)
    return getattr(config, "backbone_config", None) or config


def routing_health(metrics: dict, prefix: str = "eval_", config=None, max_load: float = 2.0,
                   min_load: float = 0.25, min_superclass_accuracy: float = 0.5) -> dict | None:
    """Check the router statistics in `metrics` (keys `{prefix}expert_load_max`, `{prefix}expert_load_min`,
    `{prefix}router_superclass_accuracy`, as `RouterStatsCallback` logs them) against the thresholds.

    Returns None when `metrics` has no router statistics, else `{"status": "ok" | "unhealthy", "problems": [...],
    "knobs": [...], "summary": one line, "thresholds": {...}, <the values checked>}`. `config` (the VMoE config)
    lets the knobs quote the current values."""
    thresholds = {"max_load": max_load, "min_load": min_load, "min_superclass_accuracy": min_superclass_accuracy}
    values = {k: metrics.get(f"{prefix}{k}") for k in ("expert_load_max", "expert_load_min",
                                                        "router_superclass_accuracy")}
    values = {k: float(v) for k, v in values.items() if v is not None}
    if not values:
        return None

    def now(name, default="?"):
        return getattr(config, name, default) if config is not None else default

    problems, knobs = [], []
    load_bad = False
    if values.get("expert_load_max", 0.0) > max_load:
        problems.append(f"busiest expert gets {values['expert_load_max']:.2f}x a balanced share (> {max_load:g})")
        load_bad = True
    if "expert_load_min" in values and values["expert_load_min"] < min_load:
        problems.append(f"idlest expert gets {values['expert_load_min']:.2f}x a balanced share (< {min_load:g})")
        load_bad = True
    accuracy = values.get("router_superclass_accuracy")
    if accuracy is not None and accuracy < min_superclass_accuracy:
        problems.append(f"router super-class accuracy {accuracy:.3f} (< {min_superclass_accuracy:g})")
        knobs.append(f"raise the super-class loss weight superclass_loss_coef (now {now('superclass_loss_coef')})")
    if load_bad:
        if not now("router_bias_update_rate", 0):
            knobs.append("balance without a loss weight: router_bias_update_rate=1e-3 (loss-free balancing, top-k "
                         "routers; RouterBiasUpdateCallback applies it)")
        knobs.append(f"raise the balancing loss router_aux_loss_coef (now {now('router_aux_loss_coef')})")
        knobs.append(f"set an expert capacity capacity_factor, e.g. 1.25 (now {now('capacity_factor')})")
    if problems:
        knobs.append("warm up the learning rate (--warmup_ratio 0.1 or --warmup_steps) so the router does not lock "
                     "in early")
    shown = ", ".join(f"{k} {v:.3f}" for k, v in values.items())
    if problems:
        summary = (f"unhealthy: {'; '.join(problems)}. Knobs (--config_overrides / TrainingArguments): "
                   f"{'; '.join(knobs)}")
    else:
        summary = f"ok ({shown})"
    return {"status": "unhealthy" if problems else "ok", "problems": problems, "knobs": knobs, "summary": summary,
            "thresholds": thresholds, **values}


class _RunningStats:
    def __init__(self):
        self.reset()

    def reset(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.expert_counts: torch.Tensor | None = None

    def add(self, name: str, value: torch.Tensor | None, weight: int = 1):
        if value is None:
            return
        self.sums[name] = self.sums.get(name, 0.0) + float(value.detach().float()) * weight
        self.counts[name] = self.counts.get(name, 0) + weight

    def add_counts(self, counts: torch.Tensor | None):
        if counts is None:
            return
        counts = counts.detach().float().sum(dim=0).cpu()  # sum over router calls
        self.expert_counts = counts if self.expert_counts is None else self.expert_counts + counts

    def summary(self, prefix: str, per_expert: bool) -> dict[str, float]:
        out = {f"{prefix}{k}": round(self.sums[k] / self.counts[k], 4) for k in self.sums if self.counts[k]}
        if self.expert_counts is not None and self.expert_counts.sum() > 0:
            share = self.expert_counts / self.expert_counts.sum()
            num_experts = share.numel()
            out[f"{prefix}expert_load_max"] = round(float(share.max()) * num_experts, 4)
            out[f"{prefix}expert_load_min"] = round(float(share.min()) * num_experts, 4)
            if per_expert:
                out.update({f"{prefix}expert_load_{e}": round(float(s) * num_experts, 4) for e, s in enumerate(share)})
        return out


class RouterStatsCallback(TrainerCallback):
    """Logs router super-class accuracy, routing losses and expert load through the Trainer's logging (see the
    module docstring). `per_expert` adds `expert_load_<e>` per expert (multiples of a balanced share). `history` keeps every logged
    summary (train and eval) for later inspection.

    After each evaluation the routing is checked against `max_load`, `min_load` and `min_superclass_accuracy`
    (see the module docstring); one line is logged (a WARNING with the knobs when a threshold is crossed) and the
    result is kept in `health` (and every check in `health_history`)."""

    def __init__(self, per_expert: bool = True, max_load: float = HEALTH_THRESHOLDS["max_load"],
                 min_load: float = HEALTH_THRESHOLDS["min_load"],
                 min_superclass_accuracy: float = HEALTH_THRESHOLDS["min_superclass_accuracy"]):
        for name, value in (("max_load", max_load), ("min_load", min_load),
                            ("min_superclass_accuracy", min_superclass_accuracy)):
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        self.per_expert = per_expert
        self.thresholds = {"max_load": float(max_load), "min_load": float(min_load),
                           "min_superclass_accuracy": float(min_superclass_accuracy)}
        self.health: dict | None = None
        self.health_history: list[dict] = []
        self.train_stats = _RunningStats()
        self.eval_stats = _RunningStats()
        self.history: list[dict] = []
        self._handle = None
        self._model = None

    @classmethod
    def attach(cls, trainer, **kwargs) -> RouterStatsCallback:
        """Create the callback, put it first in `trainer`'s callbacks, hook the model, and make the trainer count
        active FLOPs (`count_active_flops`). Returns the callback."""
        callback = cls(**kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        callback.hook(trainer.model)
        count_active_flops(trainer)
        return callback

    # -- the forward hook ------------------------------------------------------------------------------------------

    def hook(self, model):
        """Register the forward hook on `model` (done automatically when training begins)."""
        if self._model is model and self._handle is not None:
            return
        self.remove_hook()
        self._model = model
        self._handle = model.register_forward_hook(self._on_forward)

    def remove_hook(self):
        if self._handle is not None:
            self._handle.remove()
        self._handle = None
        self._model = None

    def _on_forward(self, module, args, output):
        if not hasattr(output, "get"):
            return  # return_dict=False: nothing named to read
        stats = self.train_stats if module.training else self.eval_stats
        batch = None
        counts = output.get("expert_counts")
        if counts is not None and counts.numel():
            batch = int(counts[0].sum().item()) or None
        weight = batch or 1
        stats.add("router_superclass_accuracy", output.get("superclass_accuracy"), weight)
        stats.add("router_superclass_loss", output.get("superclass_loss"), weight)
        stats.add("router_aux_loss", output.get("aux_loss"), weight)
        stats.add_counts(counts)

    # -- Trainer events ---------------------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.hook(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.hook(model)
        self.train_stats.reset()

    def on_evaluate(self, args, state, control, **kwargs):
        self.eval_stats.reset()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        is_eval = any(k.startswith("eval_") for k in logs)
        if is_eval:
            summary = self.eval_stats.summary("eval_", self.per_expert)
            self.eval_stats.reset()
        elif "loss" in logs or "train_loss" in logs:
            summary = self.train_stats.summary("", self.per_expert)
            self.train_stats.reset()
        else:
            return
        if not summary:
            return
        logs.update(summary)
        if state.log_history:
            state.log_history[-1].update(summary)
        self.history.append({"step": state.global_step, **summary})
        if is_eval:
            self._check_health(summary, state.global_step)

    def _check_health(self, summary: dict, step: int):
        health = routing_health(summary, "eval_", _vmoe_config(self._model), **self.thresholds)
        if health is None:
            return
        health["step"] = step
        self.health = health
        self.health_history.append(health)
        if health["status"] == "ok":
            logger.info("routing health at step %d: %s", step, health["summary"])
        else:
            logger.warning("routing health at step %d: %s", step, health["summary"])


class RouterBiasUpdateCallback(TrainerCallback):
    """Loss-free load balancing in the Trainer (`config.router_bias_update_rate > 0`): after every optimizer step
    (so over all gradient-accumulation micro-batches), `hf_vmoe.update_router_biases` moves each router's selection
    bias towards balance. A no-op for models without such routers, so scripts can always add it:

        trainer.add_callback(RouterBiasUpdateCallback())
    """

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            from ..modeling_vmoe import update_router_biases

            update_router_biases(model)


class AugmentationEpochCallback(TrainerCallback):
    """Tells an `integrations.data.AugmentedDataset` the epoch at the start of each training epoch, the epoch a
    resumed run starts in too, before the Trainer's data loader hands its workers the epoch's indices."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))  # a resumed run's state.epoch is e.g. 4.5: epoch 4


def count_active_flops(trainer) -> None:
    """Make `trainer`'s `total_flos` the active training FLOPs of a VMoE model (3 x the forward FLOPs of the
    experts each image uses, `VMoEPreTrainedModel.floating_point_ops`). transformers' Trainer counts
    6 x pixels x every parameter, which charges a MoE for all of its experts; it has no model-side hook."""
    from transformers import Trainer

    from ..modeling_vmoe import VMoEPreTrainedModel

    def floating_point_ops(inputs):
        model = trainer.accelerator.unwrap_model(trainer.model)
        if isinstance(model, VMoEPreTrainedModel):
            return model.floating_point_ops(inputs)
        return Trainer.floating_point_ops(trainer, inputs)

    trainer.floating_point_ops = floating_point_ops


__all__ = ["RouterStatsCallback", "RouterBiasUpdateCallback", "AugmentationEpochCallback", "routing_health",
           "HEALTH_THRESHOLDS", "count_active_flops"]
