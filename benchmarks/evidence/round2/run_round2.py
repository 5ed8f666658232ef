#!/usr/bin/env python
"""Round-2 evidence runner (issue 15): every run of A, B and C, two at a time, one torch thread each, resumable.

    python benchmarks/evidence/round2/run_round2.py list   [--tier 2] [--group A]     # the plan, with states
    python benchmarks/evidence/round2/run_round2.py run    [--tier 1] [--group A,C] [--only NAME,...] [--jobs 2]
    python benchmarks/evidence/round2/run_round2.py run --dry_run                    # print the commands only
    python benchmarks/evidence/round2/run_round2.py projection [--sec_per_epoch 52]  # projected wall times

What it guarantees
* Every run is defined here (name, group, tier, seed, command line); `PROTOCOL.md` explains the choices.
* Skips a run whose final results exist (`all_results.json` with eval metrics + `model.safetensors`, or a step's
  output file). Resumes an interrupted training from its newest `checkpoint-*` (`--resume_from_checkpoint`;
  every training saves each epoch with `--save_total_limit 1`); one without a checkpoint restarts.
* Runs `--jobs` (default 2) at a time, each with OMP_NUM_THREADS=MKL_NUM_THREADS=1 (one torch thread), in plan
  order as soon as the runs it depends on are done.
* Appends one record per attempt to `$EVD2/runs_log.json`: name, group, tier, seed, threads, the exact command
  (shell-quoted and argv), cwd, start / end (UTC), wall seconds, exit code, status, the checkpoint it resumed
  from, the load average at the start. stdout+stderr of each run: `$EVD2/runs/<name>.log` (appended).
* The epoch choice (PROTOCOL.md, "epochs"): the scouting run `A-scout` (dense, constant learning rate, evaluated
  every epoch on 2,000 TRAINING images) is watched; once its training accuracy stops rising by the pre-registered
  rule the runner stops it and writes `$EVD2/choices.json` (`epochs_a`, `m_b`, the curve). Runs that need those
  numbers wait for that file.

Ctrl-C (or SIGTERM) stops the children (their process groups) and records them as interrupted; run the same
command again to resume. Paths: $EVD2 (default /tmp/evd2; data links from prepare_data.py under $EVD2/tin200),
$HF_VMOE_REAL_DATA (default ../shared/data), $HF_VMOE_SCRIPTS_ROOT (the folder whose examples/ run, default the
repository; the runner's own helper scripts always come from this folder).
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
# where examples/ is run from (cwd of every run): the repository, or e.g. an exported snapshot for a dry test
SCRIPTS_ROOT = Path(os.environ.get("HF_VMOE_SCRIPTS_ROOT", ROOT))
EVD2 = Path(os.environ.get("EVD2", "/tmp/evd2"))
DATA = Path(os.environ.get("HF_VMOE_REAL_DATA", ROOT.parent / "shared/data"))
RUNS = EVD2 / "runs"
LOG = EVD2 / "runs_log.json"
CHOICES = EVD2 / "choices.json"
TIN = EVD2 / "tin200"
PY = os.environ.get("PY", sys.executable)
CLS = "examples/run_image_classification.py"
# environment added to every run (round 3 pins the kernels' instruction set here, see `configure`)
RUN_ENV: dict[str, str] = {}
SEG = "examples/run_semantic_segmentation.py"

FINAL_SEEDS = (42, 43, 44)
STEPS_PER_EPOCH_A = math.ceil(18000 / 64)  # 282 optimizer steps per epoch (18,000 images, batch 64)

# --- pre-registered numbers (PROTOCOL.md); the epochs of A and M of B come from the scouting run -------------------
SCOUT_MAX_EPOCHS = 35        # the scouting run's budget
PLATEAU_WINDOW = 5           # epochs
PLATEAU_GAIN = 0.01          # stop-rising: best train accuracy of the last 5 epochs < 1 point above all before
EPOCHS_A_RANGE = (10, 30)    # the chosen epochs are clipped to this range (30: the CPU budget cap)
LR_A, LR_CONT = 1e-3, 5e-4   # from scratch / continuation (B, C) peak learning rates
EVAL_EVERY_A = 5             # epochs between validation passes in A (10,000 images; the final one is always run)
EVAL_EVERY_B = 2
EPOCHS_C_DENSE, M_C = 30, 15  # C: dense pre-training on CamVid, then M_C epochs of every continuation arm


def m_b_rule(epochs_a: int) -> int:
    return math.ceil(epochs_a / 2)


def budget_cut(epochs_a: int | None) -> list[str]:
    """The pre-registered cut (PROTOCOL.md, "budget"): tier-1 runs moved to tier 2 when the chosen epochs make tier 1
    longer than ~2.5 h on 2 lanes. Cheapest information loss first: the WordNet arm's extra seeds, then the learned
    router's extra seeds, then B's learned-router and token-MoE arms."""
    if epochs_a is None:
        return []
    cut = []
    if epochs_a >= 18:
        cut += ["A-moe-wordnet-s43", "A-moe-wordnet-s44"]
    if epochs_a >= 23:
        cut += ["A-moe-learned-s43", "A-moe-learned-s44"]
    if epochs_a >= 27:
        cut += ["B-moe-learned-s42", "B-token-shared-init-s42", "B-token-shared-s42"]
    return cut


# --------------------------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    group: str                      # A, B, C, probe, selftest
    tier: int                       # 1 = in the proposed cut, 2 = if time allows
    seed: int
    argv: list                      # command after the interpreter; "{epochs_a}" etc. filled from choices.json
    kind: str = "train"             # train (a Trainer run in RUNS/name) | step (output file) | scout
    deps: tuple = ()
    needs: tuple = ()               # keys of choices.json
    output: str | None = None       # for steps: the file whose existence means done
    what: str = ""
    epochs_key: str | None = None   # for the projection: which epoch count the run trains for
    cost: float = 1.0               # relative cost per epoch (projection)

    @property
    def out_dir(self) -> Path:
        return RUNS / self.name


def cls_common(seed: int, lr: float, eval_every: int | None, data_dir: Path | None = None) -> list:
    data_dir = data_dir or TIN
    args = ["--train_dir", str(TIN / "train"), "--validation_dir", str(data_dir / "validation"),
            "--do_train", "--do_eval", "--per_device_train_batch_size", "64", "--per_device_eval_batch_size", "256",
            "--learning_rate", str(lr), "--weight_decay", "0.05", "--warmup_steps", "0.05",
            "--lr_scheduler_type", "cosine", "--save_strategy", "epoch", "--save_total_limit", "1",
            "--logging_steps", "20", "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0",
            "--seed", str(seed), "--data_seed", str(seed)]
    if eval_every:
        args += ["--eval_strategy", "steps", "--eval_steps", str(eval_every * STEPS_PER_EPOCH_A)]
    else:
        args += ["--eval_strategy", "epoch"]
    return args


SIZE = ["--image_size", "64", "--patch_size", "8"]
MOBILE = ["--preset", "mobile-vmoe-3x64", *SIZE]  # E=10, k=1, last 2 of 3 blocks, image routing, shared router
WORDNET = str(HERE / "wordnet_superclasses.json")
SEG_BACKBONE = "hidden_size=96,num_hidden_layers=6,num_attention_heads=3,intermediate_size=384,patch_size=8"
TOKEN_MOE = "routing_level=token,num_experts=4,num_experts_per_tok=1,moe_layers=last:2"


def seg_common(seed: int, lr: float, epochs: str) -> list:
    camvid = str(DATA / "camvid-ade")
    return ["--train_dir", camvid, "--validation_dir", camvid, "--reduce_labels", "--crop_size", "128",
            "--min_scale", "0.75", "--max_scale", "1.5", "--do_train", "--do_eval", "--num_train_epochs", epochs,
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--learning_rate", str(lr),
            "--weight_decay", "0.05", "--warmup_steps", "0.05", "--lr_scheduler_type", "cosine",
            "--eval_strategy", "epoch", "--save_strategy", "epoch", "--save_total_limit", "1", "--logging_steps", "5",
            "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0", "--seed", str(seed),
            "--data_seed", str(seed)]


def plan() -> list[Run]:
    runs: list[Run] = []
    add = runs.append
    # ---- probes (the timing probe of PROTOCOL.md; also the collect script's test data) --------------------------
    probe = [*SIZE, "--train_dir", str(TIN / "train"), "--validation_dir", str(TIN / "validation"), "--do_train",
             "--do_eval", "--per_device_train_batch_size", "64", "--per_device_eval_batch_size", "256",
             "--learning_rate", "1e-3", "--weight_decay", "0.05", "--warmup_steps", "0.05", "--lr_scheduler_type",
             "cosine", "--save_strategy", "epoch", "--save_total_limit", "1", "--logging_steps", "20", "--use_cpu",
             "--report_to", "none", "--dataloader_num_workers", "0", "--seed", "0", "--data_seed", "0"]
    add(Run("probe-dense", "probe", 0, 0, [CLS, "--preset", "vit-3x64", "--num_train_epochs", "1",
                                          "--eval_strategy", "epoch", *probe], what="timing: dense 1 epoch"))
    add(Run("probe-moe-router", "probe", 0, 0, [CLS, "--preset", "mobile-vmoe-3x64", "--max_steps", "300",
                                               "--eval_strategy", "no", *probe], what="timing: MoE 300 steps"))
    # ---- selftest: tiny runs that exercise skip / resume / steps / upcycling in a minute or two ------------------
    tiny = ["--max_train_samples", "256", "--max_eval_samples", "256"]
    add(Run("selftest-dense", "selftest", 0, 0, [CLS, "--preset", "vit-3x64", *SIZE, "--num_train_epochs", "3",
                                                *cls_common(0, LR_A, None), "--max_train_samples", "2048",
                                                "--max_eval_samples", "256"]))
    add(Run("selftest-sc", "selftest", 0, 0,
            ["-m", "hf_vmoe.cli", "superclasses", "from-model", "--model", str(RUNS / "selftest-dense"),
             "--validation-dir", str(TIN / "heldout"), "--num-experts", "10", "--soft", "--seed", "0",
             "--output", str(RUNS / "selftest-sc" / "superclasses.json")],
            kind="step", deps=("selftest-dense",), output=str(RUNS / "selftest-sc" / "superclasses.json")))
    add(Run("selftest-moe-conf", "selftest", 0, 0, [CLS, *MOBILE, "--superclasses_file",
                                                   str(RUNS / "selftest-sc" / "superclasses.json"),
                                                   "--train_routing", "router", "--num_train_epochs", "2",
                                                   *cls_common(0, LR_A, None), *tiny], deps=("selftest-sc",)))
    add(Run("selftest-up", "selftest", 0, 0,
            [str(HERE / "upcycle_vmoe.py"), "--dense", str(RUNS / "selftest-dense"), "--output",
             str(RUNS / "selftest-up"), "--mode", "split_shared", "--config_overrides", TOKEN_MOE],
            kind="step", deps=("selftest-dense",), output=str(RUNS / "selftest-up" / "model.safetensors")))
    add(Run("selftest-cont", "selftest", 0, 0, [CLS, "--model_name_or_path", str(RUNS / "selftest-up"),
                                               "--num_train_epochs", "2", *cls_common(0, LR_CONT, None), *tiny],
            deps=("selftest-up",)))

    # the scout's stop-by-rule path on tiny data; run it with a separate EVD2 (it writes that root's choices.json)
    add(Run("selftest-scout", "selftest", 0, 0,
            [CLS, "--preset", "vit-3x64", *SIZE, "--num_train_epochs", str(SCOUT_MAX_EPOCHS),
             *[a if a != "cosine" else "constant_with_warmup" for a in cls_common(0, LR_A, None)], *tiny],
            kind="scout", epochs_key="scout"))
    seg_tiny = ["--max_train_samples", "16", "--max_eval_samples", "8"]
    add(Run("selftest-seg-dense", "selftest", 0, 0, [SEG, *seg_common(0, LR_A, "1"), "--head", "linear",
                                                    "--config_overrides", SEG_BACKBONE, "--moe_layers", "none",
                                                    *seg_tiny]))
    add(Run("selftest-seg-up", "selftest", 0, 0,
            [str(HERE / "upcycle_vmoe.py"), "--dense", str(RUNS / "selftest-seg-dense"), "--output",
             str(RUNS / "selftest-seg-up"), "--mode", "split_shared", "--config_overrides", TOKEN_MOE],
            kind="step", deps=("selftest-seg-dense",), output=str(RUNS / "selftest-seg-up" / "model.safetensors")))
    add(Run("selftest-seg-cont", "selftest", 0, 0, [SEG, "--model_name_or_path", str(RUNS / "selftest-seg-up"),
                                                   *seg_common(0, LR_CONT, "1"), *seg_tiny],
            deps=("selftest-seg-up",)))
    add(Run("selftest-seg-vit", "selftest", 0, 0,
            [str(HERE / "upcycle_vmoe.py"), "--dense", str(RUNS / "selftest-seg-dense"), "--output",
             str(RUNS / "selftest-seg-vit"), "--mode", "vit"],
            kind="step", deps=("selftest-seg-dense",), output=str(RUNS / "selftest-seg-vit" / "model.safetensors")))
    add(Run("selftest-seg-upernet", "selftest", 0, 0,
            [SEG, "--head", "upernet", "--upernet_hidden_size", "96", "--upcycle_from", str(RUNS / "selftest-seg-vit"),
             *seg_common(0, LR_CONT, "1"), "--routing_level", "token", "--num_experts", "4",
             "--num_experts_per_tok", "1", "--moe_layers", "last:2", *seg_tiny], deps=("selftest-seg-vit",)))

    # ---- A: from scratch, 200 classes, 64 px, patch 8, 3x64 ----------------------------------------------------
    add(Run("A-scout", "A", 1, 0,
            [CLS, "--preset", "vit-3x64", *SIZE, "--num_train_epochs", str(SCOUT_MAX_EPOCHS),
             *[a if a != "cosine" else "constant_with_warmup" for a in cls_common(0, LR_A, None, data_dir=None)]],
            kind="scout", what="dense, constant lr, eval on 2,000 training images: the epoch rule",
            epochs_key="scout"))
    runs[-1].argv[runs[-1].argv.index("--validation_dir") + 1] = str(TIN / "trainprobe")
    # C's dense pre-training does not depend on A: it is listed early so the second lane has work during A-scout
    for s in FINAL_SEEDS:
        add(Run(f"C-dense-s{s}", "C", 1 if s == 42 else 2, s,
                [SEG, *seg_common(s, LR_A, str(EPOCHS_C_DENSE)), "--head", "linear", "--config_overrides",
                 SEG_BACKBONE, "--moe_layers", "none"],
                what="dense 6x96 on CamVid from scratch (the start of C)", epochs_key="c_dense", cost=0.4))
    for s in FINAL_SEEDS:
        epochs = ["--num_train_epochs", "{epochs_a}"]
        add(Run(f"A-dense-s{s}", "A", 1, s, [CLS, "--preset", "vit-3x64", *SIZE, *epochs,
                                              *cls_common(s, LR_A, EVAL_EVERY_A)], needs=("epochs_a",),
                what="dense ViT 3x64", epochs_key="epochs_a"))
        add(Run(f"A-sc-s{s}", "A", 1, s,
                ["-m", "hf_vmoe.cli", "superclasses", "from-model", "--model", str(RUNS / f"A-dense-s{s}"),
                 "--validation-dir", str(TIN / "heldout"), "--num-experts", "10", "--soft", "--seed", "0",
                 "--output", str(RUNS / f"A-sc-s{s}" / "superclasses.json")],
                kind="step", deps=(f"A-dense-s{s}",), output=str(RUNS / f"A-sc-s{s}" / "superclasses.json"),
                what="10 balanced super-classes from the dense model's soft confusion on the held-out 2,000"))
    for s in FINAL_SEEDS:
        epochs = ["--num_train_epochs", "{epochs_a}"]
        common = cls_common(s, LR_A, EVAL_EVERY_A)
        add(Run(f"A-moe-conf-s{s}", "A", 1, s,
                [CLS, *MOBILE, "--superclasses_file", str(RUNS / f"A-sc-s{s}" / "superclasses.json"),
                 "--train_routing", "router", *epochs, *common], deps=(f"A-sc-s{s}",), needs=("epochs_a",),
                what="Mobile V-MoE, super-class router (confusion super-classes of the same seed's dense)",
                epochs_key="epochs_a"))
        add(Run(f"A-moe-learned-s{s}", "A", 1, s, [CLS, *MOBILE, *epochs, *common], needs=("epochs_a",),
                what="Mobile V-MoE, end-to-end learned router", epochs_key="epochs_a"))
        add(Run(f"A-moe-wordnet-s{s}", "A", 1, s,
                [CLS, *MOBILE, "--superclasses_file", WORDNET, "--train_routing", "router", *epochs, *common],
                needs=("epochs_a",), what="Mobile V-MoE, super-class router (WordNet super-classes)",
                epochs_key="epochs_a"))

    # ---- B: continuation of A's dense model for M epochs at equal active compute ---------------------------------
    for s in FINAL_SEEDS:
        tier = 1 if s == 42 else 2
        dense = str(RUNS / f"A-dense-s{s}")
        epochs = ["--num_train_epochs", "{m_b}"]
        common = cls_common(s, LR_CONT, EVAL_EVERY_B)
        add(Run(f"B-dense-s{s}", "B", tier, s, [CLS, "--model_name_or_path", dense, *epochs, *common],
                deps=(f"A-dense-s{s}",), needs=("m_b",), what="dense continuation", epochs_key="m_b"))
        add(Run(f"B-moe-conf-s{s}", "B", tier, s,
                [CLS, *MOBILE, "--init_from_dense", dense, "--superclasses_file",
                 str(RUNS / f"A-sc-s{s}" / "superclasses.json"), "--train_routing", "router", *epochs, *common],
                deps=(f"A-sc-s{s}",), needs=("m_b",), what="Mobile V-MoE upcycled, super-class router",
                epochs_key="m_b"))
        add(Run(f"B-moe-learned-s{s}", "B", tier, s, [CLS, *MOBILE, "--init_from_dense", dense, *epochs, *common],
                deps=(f"A-dense-s{s}",), needs=("m_b",), what="Mobile V-MoE upcycled, learned router",
                epochs_key="m_b"))
        add(Run(f"B-token-shared-init-s{s}", "B", tier, s,
                [str(HERE / "upcycle_vmoe.py"), "--dense", dense, "--output", str(RUNS / f"B-token-shared-init-s{s}"),
                 "--mode", "split_shared", "--config_overrides", TOKEN_MOE, "--seed", str(s)],
                kind="step", deps=(f"A-dense-s{s}",), output=str(RUNS / f"B-token-shared-init-s{s}" / "model.safetensors"),
                what="upcycle: token MoE E=4 half-width + half-width shared expert (split of the dense MLP)"))
        add(Run(f"B-token-shared-s{s}", "B", tier, s,
                [CLS, "--model_name_or_path", str(RUNS / f"B-token-shared-init-s{s}"), *epochs, *common],
                deps=(f"B-token-shared-init-s{s}",), needs=("m_b",),
                what="token MoE + shared expert (ViMoE) upcycled", epochs_key="m_b"))
    # tier-2 ablation: the upcycled super-class MoE with renormalised top-1 weights starts exactly at the dense model
    add(Run("B-moe-conf-exact-s42", "B", 2, 42,
            [CLS, *MOBILE, "--config_overrides", "normalize_router_weights=true", "--init_from_dense",
             str(RUNS / "A-dense-s42"), "--superclasses_file", str(RUNS / "A-sc-s42" / "superclasses.json"),
             "--train_routing", "router", "--num_train_epochs", "{m_b}", *cls_common(42, LR_CONT, EVAL_EVERY_B)],
            deps=("A-sc-s42",), needs=("m_b",), what="ablation: exact (function-preserving) upcycled start",
            epochs_key="m_b"))

    # ---- C: segmentation continuation from the CamVid dense model ------------------------------------------------
    for s in FINAL_SEEDS:
        tier = 1 if s == 42 else 2
        dense = str(RUNS / f"C-dense-s{s}")
        common = seg_common(s, LR_CONT, str(M_C))
        add(Run(f"C-dense-cont-s{s}", "C", tier, s, [SEG, "--model_name_or_path", dense, *common],
                deps=(f"C-dense-s{s}",), what="dense continuation", epochs_key="m_c", cost=0.4))
        for arm, mode in (("token", "copy"), ("token-shared", "split_shared")):
            init = RUNS / f"C-{arm}-init-s{s}"
            add(Run(f"C-{arm}-init-s{s}", "C", tier, s,
                    [str(HERE / "upcycle_vmoe.py"), "--dense", dense, "--output", str(init), "--mode", mode,
                     "--config_overrides", TOKEN_MOE, "--seed", str(s)],
                    kind="step", deps=(f"C-dense-s{s}",), output=str(init / "model.safetensors"),
                    what=f"upcycle ({mode}) the CamVid dense model"))
            add(Run(f"C-{arm}-s{s}", "C", tier, s, [SEG, "--model_name_or_path", str(init), *common],
                    deps=(f"C-{arm}-init-s{s}",), epochs_key="m_c", cost=0.4,
                    what={"token": "token MoE E=4 full-width experts, k=1, upcycled",
                          "token-shared": "token MoE E=4 half-width + half-width shared expert, upcycled"}[arm]))
    vit = RUNS / "C-vit-s42"
    add(Run("C-vit-s42", "C", 2, 42, [str(HERE / "upcycle_vmoe.py"), "--dense", str(RUNS / "C-dense-s42"),
                                      "--output", str(vit), "--mode", "vit"],
            kind="step", deps=("C-dense-s42",), output=str(vit / "model.safetensors"),
            what="the CamVid dense backbone as a transformers ViT checkpoint (for --upcycle_from ... --head upernet)"))
    upernet = ["--head", "upernet", "--upernet_hidden_size", "96", "--upcycle_from", str(vit),
               *seg_common(42, LR_CONT, str(M_C))]
    add(Run("C-upernet-token-s42", "C", 2, 42, [SEG, *upernet, "--routing_level", "token", "--num_experts", "4",
                                                "--num_experts_per_tok", "1", "--moe_layers", "last:2"],
            deps=("C-vit-s42",), what="UperNet head (new) on the upcycled token MoE backbone", epochs_key="m_c",
            cost=0.6))
    add(Run("C-upernet-dense-s42", "C", 2, 42, [SEG, *upernet, "--moe_layers", "none"], deps=("C-vit-s42",),
            what="UperNet head (new) on the dense backbone: the UperNet run's pair", epochs_key="m_c", cost=0.6))
    return runs


# --------------------------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------------------------


def load_choices() -> dict:
    return json.loads(CHOICES.read_text()) if CHOICES.is_file() else {}


def is_done(run: Run) -> bool:
    if run.kind == "step":
        return Path(run.output).is_file()
    if run.kind == "scout":
        return "epochs_a" in load_choices()
    res = run.out_dir / "all_results.json"
    if not (res.is_file() and (run.out_dir / "model.safetensors").is_file()):
        return False
    try:
        return any(k.startswith("eval_") for k in json.loads(res.read_text()))
    except json.JSONDecodeError:
        return False


def last_checkpoint(run: Run) -> Path | None:
    ckpts = [p for p in run.out_dir.glob("checkpoint-*") if p.is_dir() and (p / "trainer_state.json").is_file()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1])) if ckpts else None


class _Keep(dict):
    def __missing__(self, key):  # a dry run before the epoch choice shows the placeholder
        return "{" + key + "}"


def fill(argv: list, choices: dict) -> list:
    return [a.format_map(_Keep(choices)) if "{" in a else a for a in argv]


def command(run: Run, choices: dict) -> tuple[list, Path | None]:
    argv = [PY, *fill(run.argv, choices)]
    resume = None
    if run.kind in ("train", "scout"):
        argv += ["--output_dir", str(run.out_dir)]
        resume = last_checkpoint(run)
        if resume is not None:
            argv += ["--resume_from_checkpoint", str(resume)]
    return argv, resume


_log_lock = threading.Lock()


def append_log(record: dict):
    """Append under a thread lock and a file lock: two runner processes may share one root (e.g. one per lane)."""
    with _log_lock:
        EVD2.mkdir(parents=True, exist_ok=True)
        with open(LOG.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = json.loads(LOG.read_text()) if LOG.is_file() else {"runs": []}
            data["runs"].append(record)
            tmp = LOG.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(LOG)


def git_state() -> dict:
    """The code the runs use: commit, and whether src/ or examples/ differ from it (then the runs are not
    reproducible from the commit alone)."""
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=SCRIPTS_ROOT, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty_src_examples": bool(git("status", "--porcelain", "--", "src", "examples"))}


MACHINE_PROBE = """
import json, platform, subprocess, torch, transformers
cpu = platform.processor() or platform.machine()
try:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
except OSError:
    lscpu = ""
for line in lscpu.splitlines():
    if line.startswith("Model name:"):
        cpu = line.split(":", 1)[1].strip()
print(json.dumps({"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                  "transformers": transformers.__version__, "python": platform.python_version()}))
"""


def machine_facts(env: dict) -> dict:
    """The CPU model, the kernels' instruction set as torch reports it under the run's environment
    (`torch.backends.cpu.get_cpu_capability()`), torch / transformers / Python versions, and the pinned variables."""
    out = subprocess.run([PY, "-c", MACHINE_PROBE], env=env, capture_output=True, text=True, check=False)
    facts = json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-500:]}
    facts["pinned_env"] = dict(RUN_ENV)
    return facts


def configure(root: Path, plan_fn, run_env: dict | None = None):
    """Point the runner at another evidence round: its output root (runs, log, choices, data links under
    root/tin200), its plan and the environment added to every run. Round 3 uses this; round 2 keeps the defaults."""
    global EVD2, RUNS, LOG, CHOICES, TIN, plan, RUN_ENV
    EVD2, plan, RUN_ENV = Path(root), plan_fn, dict(run_env or {})
    RUNS, LOG, CHOICES, TIN = EVD2 / "runs", EVD2 / "runs_log.json", EVD2 / "choices.json", EVD2 / "tin200"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------------------------------
# The epoch rule (scouting run)
# --------------------------------------------------------------------------------------------------------------------


def scout_curve(run: Run) -> list[tuple[float, float]]:
    ckpt = last_checkpoint(run)
    state = run.out_dir / "trainer_state.json"
    path = (ckpt / "trainer_state.json") if ckpt is not None else state
    if not path.is_file():
        return []
    hist = json.loads(path.read_text()).get("log_history", [])
    return [(float(h["epoch"]), float(h["eval_accuracy"])) for h in hist if "eval_accuracy" in h]


def plateau_epoch(curve: list[tuple[float, float]]) -> tuple[int, int] | None:
    """(N, detected_at): the first epoch N >= window after which `window` more epochs raise the best training
    accuracy by less than PLATEAU_GAIN (max(acc[N:N+w]) - max(acc[:N]) < gain): where the curve stopped rising.
    It is detected at epoch N + window; None while the curve still rises."""
    acc = [a for _, a in sorted(curve)]
    w = PLATEAU_WINDOW
    for n in range(w, len(acc) - w + 1):
        if max(acc[n:n + w]) - max(acc[:n]) < PLATEAU_GAIN:
            return n, n + w
    return None


def write_choice(run: Run, curve, stopped_at: int | None):
    found = plateau_epoch(curve)
    plateaued = found is not None
    if found is None:
        e = int(round(max(ep for ep, _ in curve))) if curve else SCOUT_MAX_EPOCHS
    else:
        e = found[0]
    epochs = min(max(e, EPOCHS_A_RANGE[0]), EPOCHS_A_RANGE[1])
    choice = {"epochs_a": epochs, "m_b": m_b_rule(epochs), "plateau_epoch": e if plateaued else None,
              "plateaued": plateaued, "rule": f"first epoch N with max(acc[N:N+{PLATEAU_WINDOW}]) - max(acc[:N]) < "
                                              f"{PLATEAU_GAIN} (training accuracy, constant lr), clipped to "
                                              f"{EPOCHS_A_RANGE}; m_b = ceil(epochs_a / 2)",
              "scout_curve_train_accuracy": curve, "scout_stopped_at_epoch": stopped_at, "written": now()}
    CHOICES.write_text(json.dumps(choice, indent=1))
    print(f"[runner] epoch choice: epochs_a={epochs}, m_b={choice['m_b']} (plateau at {choice['plateau_epoch']})",
          flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------------------------------


def _claim_path(run: Run) -> Path:
    return RUNS / f"{run.name}.claim"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _claimer(run: Run) -> tuple[str, int] | None:
    """(boot id, pid) of the runner process that claimed the run, or None."""
    try:
        boot, pid = _claim_path(run).read_text().split()
        return boot, int(pid)
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claimed_elsewhere(run: Run) -> bool:
    """Another live runner process of this boot is running this run (RUNS/<name>.claim: boot id and pid; a claim
    from before a restart is stale even if its pid was reused)."""
    owner = _claimer(run)
    return owner is not None and owner[0] == _boot_id() and owner[1] != os.getpid() and _alive(owner[1])


def claim(run: Run) -> bool:
    """Take a run for this runner process, so that several runner processes (one per lane) can share a root. The
    check and the write happen under one file lock; a claim whose process is gone is taken over."""
    RUNS.mkdir(parents=True, exist_ok=True)
    with open(RUNS / ".claims.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if claimed_elsewhere(run):
            return False
        _claim_path(run).write_text(f"{_boot_id()} {os.getpid()}")
        return True


class Runner:
    def __init__(self, runs: list[Run], jobs: int, dry_run: bool, cut: bool = True):
        self.cut = cut
        self.runs = runs
        self.jobs = jobs
        self.dry_run = dry_run
        self.lock = threading.Lock()
        self.started: set[str] = set()
        self.failed: set[str] = set()
        self.procs: dict[str, subprocess.Popen] = {}
        self.running = 0
        self.finished: set[str] = set()
        self.stop = threading.Event()
        self.all_runs = {r.name: r for r in plan()}
        self.git = git_state()
        self._machine = None

    def machine(self, env: dict) -> dict:
        if self._machine is None:
            self._machine = machine_facts(env)
        return self._machine

    def ready(self, run: Run) -> bool:
        for d in run.deps:
            # a dependency started here must also have exited (its results appear before its process ends)
            dep = self.all_runs[d]
            if d in self.failed or not is_done(dep) or (d in self.started and d not in self.finished) or (
                    claimed_elsewhere(dep)):  # its process may still be writing its results
                return False
        choices = load_choices()
        return all(k in choices for k in run.needs)

    def blocked_forever(self, run: Run) -> bool:
        """A dependency failed, or is neither done nor scheduled in this invocation."""
        names = {r.name for r in self.runs}
        for d in run.deps:
            if d in self.failed or (not is_done(self.all_runs[d]) and d not in names):
                return True
        if run.needs and not all(k in load_choices() for k in run.needs):
            return "A-scout" not in names or "A-scout" in self.failed
        return False

    def next_run(self) -> Run | None | bool:
        """A run to start, None to wait (running jobs, here or in another runner process, may unlock more), False
        when nothing is left."""
        with self.lock:
            cut = set(budget_cut(load_choices().get("epochs_a"))) if self.cut else set()
            pending = [r for r in self.runs if r.name not in self.started and r.name not in self.failed
                       and not is_done(r) and not (r.tier == 1 and r.name in cut)]
            live = [r for r in pending if not self.blocked_forever(r)]
            for r in live:
                if self.ready(r) and claim(r):
                    if is_done(r):  # another runner finished it meanwhile
                        _claim_path(r).unlink(missing_ok=True)
                        continue
                    self.started.add(r.name)
                    self.running += 1
                    return r
            elsewhere = any(claimed_elsewhere(r) for r in self.all_runs.values())
            return None if live and (self.running or elsewhere) else False

    def execute(self, run: Run):
        choices = load_choices()
        argv, resume = command(run, choices)
        shown = " ".join(shlex.quote(a) for a in argv)
        if self.dry_run:
            print(f"[dry-run] {run.name}: {shown}")
            return
        RUNS.mkdir(parents=True, exist_ok=True)
        if run.kind == "step" and run.output:
            Path(run.output).parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **RUN_ENV}
        record = {"name": run.name, "group": run.group, "tier": run.tier, "seed": run.seed, "threads": 1,
                  "kind": run.kind, "command": shown, "argv": argv, "cwd": str(SCRIPTS_ROOT), "start": now(),
                  "resumed_from": str(resume) if resume else None, "loadavg_start": os.getloadavg(),
                  "git": self.git, "machine": self.machine(env)}
        print(f"[runner] {record['start']} start {run.name}" + (f" (resume {resume.name})" if resume else ""),
              flush=True)
        t0 = time.monotonic()
        status = None
        with open(RUNS / f"{run.name}.log", "a") as log:
            log.write(f"\n===== {record['start']} {shown}\n")
            log.flush()
            proc = subprocess.Popen(argv, cwd=SCRIPTS_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            with self.lock:
                self.procs[run.name] = proc
            while proc.poll() is None:
                time.sleep(5)
                if self.stop.is_set():
                    status = "interrupted"
                    self.kill(proc)
                elif run.kind == "scout":
                    curve = scout_curve(run)
                    if plateau_epoch(curve) is not None:
                        write_choice(run, curve, stopped_at=len(curve))
                        status = "stopped_by_rule"
                        self.kill(proc)
        rc = proc.returncode
        with self.lock:
            self.procs.pop(run.name, None)
        if status is None:
            status = "ok" if rc == 0 else "failed"
        if run.kind == "scout" and status == "ok":
            write_choice(run, scout_curve(run) or self.final_curve(run), stopped_at=None)
        if status == "ok" and not is_done(run):
            status = "failed"  # exited 0 without its results
        record.update(end=now(), wall_s=round(time.monotonic() - t0, 1), rc=rc, status=status)
        append_log(record)
        print(f"[runner] {record['end']} end {run.name}: {status} rc={rc} {record['wall_s']:.0f}s", flush=True)
        _claim_path(run).unlink(missing_ok=True)
        if status == "failed":
            with self.lock:
                self.failed.add(run.name)

    @staticmethod
    def final_curve(run: Run):
        state = run.out_dir / "trainer_state.json"
        if not state.is_file():
            return []
        hist = json.loads(state.read_text()).get("log_history", [])
        return [(float(h["epoch"]), float(h["eval_accuracy"])) for h in hist if "eval_accuracy" in h]

    @staticmethod
    def kill(proc: subprocess.Popen):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()

    def worker(self):
        while not self.stop.is_set():
            run = self.next_run()
            if run is False:
                return
            if run is None:
                time.sleep(5)
                continue
            try:
                self.execute(run)
            finally:
                with self.lock:
                    self.running -= 1
                    self.finished.add(run.name)

    def go(self):
        if self.dry_run:
            for r in self.runs:
                if is_done(r):
                    print(f"[dry-run] {r.name}: done, skipped")
                else:
                    self.execute(r)
            return 0
        def handler(signum, frame):
            print(f"[runner] signal {signum}: stopping the running jobs (resume by running again)", flush=True)
            self.stop.set()
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        threads = [threading.Thread(target=self.worker, daemon=True) for _ in range(self.jobs)]
        for i, t in enumerate(threads):
            t.start()
            time.sleep(2 if i == 0 else 0)  # the second lane starts after the first has claimed its run
        while any(t.is_alive() for t in threads):
            time.sleep(1)
        left = [r.name for r in self.runs if not is_done(r)]
        print(f"[runner] finished; not done: {left or 'none'}; failed: {sorted(self.failed) or 'none'}", flush=True)
        return 1 if self.failed or self.stop.is_set() else 0


# --------------------------------------------------------------------------------------------------------------------
# Projection
# --------------------------------------------------------------------------------------------------------------------


def projection(runs: list[Run], sec_per_epoch: float, overhead: float, eval_s: float, epochs_a: int,
               scout_epochs: int, c_sec_per_epoch: float, jobs: int) -> dict:
    epochs = {"scout": scout_epochs, "epochs_a": epochs_a, "m_b": m_b_rule(epochs_a), "c_dense": EPOCHS_C_DENSE,
              "m_c": M_C}
    rows = []
    for r in runs:
        if r.kind == "step":
            sec = 30.0
        else:
            e = epochs[r.epochs_key]
            if r.group == "C":
                sec = e * c_sec_per_epoch * (r.cost / 0.4) + overhead
            else:
                n_eval = e if r.kind == "scout" else (e // (EVAL_EVERY_A if r.group == "A" else EVAL_EVERY_B) + 1)
                per_eval = 0.2 * eval_s if r.kind == "scout" else eval_s  # 2,000 vs 10,000 images
                sec = e * sec_per_epoch * r.cost + n_eval * per_eval + overhead
        rows.append({"name": r.name, "group": r.group, "tier": r.tier, "seconds": round(sec)})
    total = sum(x["seconds"] for x in rows)
    return {"rows": rows, "lane_seconds": total, "wall_seconds_ideal": total / jobs}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("list", "run", "projection"))
    parser.add_argument("--tier", type=int, default=1, help="1: the proposed cut; 2: everything")
    parser.add_argument("--group", default="A,B,C", help="comma-separated: A,B,C (and probe, selftest)")
    parser.add_argument("--only", default="", help="comma-separated run names (overrides --group/--tier)")
    parser.add_argument("--skip", default="", help="comma-separated run names to leave out (the cut, PROTOCOL.md)")
    parser.add_argument("--cut", choices=("auto", "none"), default="auto",
                        help="auto: leave out the tier-1 runs that budget_cut() names for the chosen epochs")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--dry_run", action="store_true")
    parser.add_argument("--sec_per_epoch", type=float, default=52.0, help="projection: A/B training s per epoch")
    parser.add_argument("--eval_s", type=float, default=15.0, help="projection: one 10,000-image validation pass")
    parser.add_argument("--overhead", type=float, default=45.0, help="projection: start-up + final eval per run")
    parser.add_argument("--c_sec_per_epoch", type=float, default=20.0, help="projection: C s per epoch")
    parser.add_argument("--epochs_a", type=int, default=None)
    parser.add_argument("--scout_epochs", type=int, default=None)
    args = parser.parse_args(argv)
    everything = plan()
    if args.only:
        names = args.only.split(",")
        runs = [r for r in everything if r.name in names]
        unknown = set(names) - {r.name for r in runs}
        if unknown:
            raise SystemExit(f"unknown runs: {sorted(unknown)}")
    else:
        groups = args.group.split(",")
        runs = [r for r in everything if r.group in groups and (r.tier <= args.tier or r.group in ("probe", "selftest"))]
    skip = set(filter(None, args.skip.split(",")))
    unknown = skip - {r.name for r in everything}
    if unknown:
        raise SystemExit(f"unknown runs in --skip: {sorted(unknown)}")
    runs = [r for r in runs if r.name not in skip]
    if args.action == "list":
        choices = load_choices()
        cut = set(budget_cut(choices.get("epochs_a"))) if args.cut == "auto" and args.tier == 1 else set()
        for r in runs:
            if r.name in cut:
                print(f"{r.name:28s} cut by the budget rule for epochs_a={choices.get('epochs_a')}")
                continue
            state = "done" if is_done(r) else ("resumable" if r.kind != "step" and last_checkpoint(r) else "todo")
            missing = [k for k in r.needs if k not in choices]
            print(f"{r.name:28s} {r.group} tier{r.tier} seed {r.seed:<3d} {state:9s}"
                  f"{' waits for ' + ','.join(missing) if missing else ''}  {r.what}")
        return 0
    if args.action == "projection":
        choices = load_choices()
        epochs_a = args.epochs_a or choices.get("epochs_a") or 25
        if args.cut == "auto" and args.tier == 1:
            cut = set(budget_cut(epochs_a))
            runs = [r for r in runs if not (r.tier == 1 and r.name in cut)]
        scout = args.scout_epochs or (len(choices.get("scout_curve_train_accuracy", [])) or epochs_a + 5)
        proj = projection(runs, args.sec_per_epoch, args.overhead, args.eval_s, epochs_a, scout,
                          args.c_sec_per_epoch, args.jobs)
        for row in proj["rows"]:
            print(f"{row['name']:28s} {row['group']} tier{row['tier']} {row['seconds'] / 60:6.1f} min")
        print(f"total {proj['lane_seconds'] / 3600:.2f} h of single-thread run time = "
              f"{proj['wall_seconds_ideal'] / 3600:.2f} h wall with {args.jobs} lanes (ideal packing), "
              f"epochs_a={epochs_a}, m_b={m_b_rule(epochs_a)}, scout {scout} epochs")
        return 0
    return Runner(runs, args.jobs, args.dry_run, cut=args.cut == "auto" and args.tier == 1).go()


if __name__ == "__main__":
    sys.exit(main())
