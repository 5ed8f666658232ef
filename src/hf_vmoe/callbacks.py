"""Router statistics in the Trainer's logs.

`RouterStatsCallback` puts, next to `loss` and `eval_loss`, what a user needs to see whether MoE routing works:

* `router_superclass_accuracy`: share of images whose router top-1 expert is their label's super-class (needs
  `config.superclass_ids`; at eval the router decides alone, so `eval_router_superclass_accuracy` is the router's
  real accuracy);
* `router_superclass_loss`, `router_aux_loss`: the super-class cross-entropy and all routing losses (as added to
  `loss`);
* `expert_load_max` / `expert_load_min`: the busiest / idlest expert's share of routed items times E
  (1.0 = perfectly balanced; `expert_load_max` = E means everything went to one expert), and, with
  `per_expert=True`, `expert_load_<e>`: each expert's share.

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
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback


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
                out.update({f"{prefix}expert_load_{e}": round(float(s), 4) for e, s in enumerate(share)})
        return out


class RouterStatsCallback(TrainerCallback):
    """Logs router super-class accuracy, routing losses and expert load through the Trainer's logging (see the
    module docstring). `per_expert` adds one `expert_load_<e>` share per expert. `history` keeps every logged
    summary (train and eval) for later inspection."""

    def __init__(self, per_expert: bool = True):
        self.per_expert = per_expert
        self.train_stats = _RunningStats()
        self.eval_stats = _RunningStats()
        self.history: list[dict] = []
        self._handle = None
        self._model = None

    @classmethod
    def attach(cls, trainer, **kwargs) -> RouterStatsCallback:
        """Create the callback, put it first in `trainer`'s callbacks and hook the model. Returns the callback."""
        callback = cls(**kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        callback.hook(trainer.model)
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


__all__ = ["RouterStatsCallback"]
