"""Defaults the example Trainer scripts apply on top of `TrainingArguments` (not part of a checkpoint).

- :func:`apply_script_defaults`: unless the command line sets them, log about `LOG_LINES_PER_RUN` (20) times per run
  (`logging_steps = 1 / 20`, a ratio the Trainer turns into steps once it knows the run's length; the stock default of
  500 steps prints no training loss at all in a short run), and turn `dataloader_pin_memory` off when the run is on
  the CPU (pinned memory only speeds up copies to an accelerator; on a CPU-only machine torch warns once per
  dataloader that no accelerator is found). With `--eval_strategy steps` and no `--eval_steps`, evaluation follows
  the logging interval, as in the Trainer.
- :func:`flag_given`: whether a `TrainingArguments` field was set on the command line (or in the JSON file).
"""

from __future__ import annotations

import json
import logging

logger = logging.getLogger(__name__)

LOG_LINES_PER_RUN = 20


def flag_given(argv: list[str] | None, name: str) -> bool:
    """True when `argv` sets the field `name` (`--name`, `--name=...`, `--name-with-dashes`), or when `argv` is a
    single JSON file with that key."""
    argv = list(argv or [])
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0]) as f:
            return name in json.load(f)
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    return any(arg.split("=", 1)[0] in spellings for arg in argv)


def apply_script_defaults(training_args, argv: list[str] | None) -> dict:
    """Set the example scripts' defaults on `training_args` (in place) where `argv` does not set the field;
    returns what was changed, `{field: new value}`, and logs it."""
    changed = {}
    if not flag_given(argv, "logging_steps") and str(getattr(training_args.logging_strategy, "value",
                                                            training_args.logging_strategy)) == "steps":
        training_args.logging_steps = 1 / LOG_LINES_PER_RUN
        changed["logging_steps"] = training_args.logging_steps
        eval_strategy = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy))
        if eval_strategy == "steps" and not flag_given(argv, "eval_steps"):  # it had copied the old logging_steps
            training_args.eval_steps = training_args.logging_steps
            changed["eval_steps"] = training_args.eval_steps
    if (training_args.dataloader_pin_memory and not flag_given(argv, "dataloader_pin_memory")
            and training_args.device.type == "cpu"):
        training_args.dataloader_pin_memory = False
        changed["dataloader_pin_memory"] = False
    if changed:
        logger.info("script defaults: %s (set the flags to override)",
                    ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in changed.items()))
    return changed


__all__ = ["apply_script_defaults", "flag_given", "LOG_LINES_PER_RUN"]
