#!/usr/bin/env python
"""Round-3 evidence runner: A3 / B3 on the full Tiny-ImageNet-200, the C re-run and the drift re-runs, on round 2's
runner (two lanes, one torch thread each, resumable, one log record per attempt); PROTOCOL.md says why.

    python benchmarks/evidence/round3/run_round3.py list  [--tier 2] [--group A3,B3,C]
    python benchmarks/evidence/round3/run_round3.py run   [--tier 1] [--group ...] [--only NAME,...] [--jobs 2]
    python benchmarks/evidence/round3/run_round3.py --isa default --root /work/evd3-drift run --only C-dense-s42,...

What it adds to round 2's runner (`../round2/run_round2.py`, imported and pointed at this round's root):
* the kernels' instruction set is pinned for every run (`--isa`, default avx2: ATEN_CPU_CAPABILITY, oneDNN's
  ONEDNN_MAX_CPU_ISA and MKL's conditional numerical reproducibility MKL_CBWR), and each log record holds the CPU
  model, `torch.backends.cpu.get_cpu_capability()` as the run saw it, the torch / transformers versions and the
  commit. A drift re-run is the same run name under another `--root` with another `--isa` (or on another machine);
* the plan: A3 / B3 on `$EVD3/tin200` (prepare_data.py), round 2's C runs (seed 42 is this round's C re-run).

Paths: --root (default $EVD3 or /work/evd3: not /tmp, which a new machine loses), $HF_VMOE_REAL_DATA,
$HF_VMOE_SCRIPTS_ROOT (the checkout whose examples/ run: a worktree of a committed revision).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "round2"))
import run_round2 as r2  # noqa: E402  (the runner; `configure` points it at this round)

# the kernels' instruction set of every run: avx2 is the widest set every x86 machine we are given has, so runs on
# an AVX-512 machine compute with the same kernels as on an AVX2-only one; "default" (no vector ISA) is the drift
# re-runs' other instruction set
ISA = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"},
}

SEEDS = (42, 43, 44)
TRAIN_IMAGES, BATCH = 90_000, 64
STEPS_PER_EPOCH = math.ceil(TRAIN_IMAGES / BATCH)  # 1,407
# the pre-registered numbers (PROTOCOL.md): epochs of A3 from the timing probe, B3 = half of them
EPOCHS_A3 = 15
EPOCHS_B3 = math.ceil(EPOCHS_A3 / 2)
LR_A, LR_CONT = r2.LR_A, r2.LR_CONT
LFB_RATE = 1e-3  # loss-free balancing: bias update per optimizer step (router_bias_update_rate)
C_RERUN = ("C-dense-s42", "C-dense-cont-s42", "C-token-init-s42", "C-token-s42")

round2_plan = r2.plan  # builds its paths from the runner's root when called


def cls_args(seed: int, lr: float, epochs: int) -> list:
    """Every A3 / B3 run: round 2's settings (batch 64, AdamW, wd 0.05, cosine, 5% warm-up, one thread), evaluated on
    the 10,000 validation images after every epoch, so the dense curve shows whether the epochs were enough."""
    args = r2.cls_common(seed, lr, None)
    return ["--num_train_epochs", str(epochs), *args]


def plan() -> list:
    runs = [r for r in round2_plan() if r.group == "C"]
    for r in runs:  # seed 42 of C is this round's re-run (tier 1); 43 / 44 stay tier 2
        r.tier = 1 if r.name in C_RERUN else 2
    tin, Run, runs_dir = r2.TIN, r2.Run, r2.RUNS
    mobile = ["--preset", "mobile-vmoe-3x64", *r2.SIZE]
    probe = ["--train_dir", str(tin / "train"), "--validation_dir", str(tin / "validation"),
             *cls_args(0, LR_A, 1)[2:]]
    runs.append(Run("probe3-dense", "probe", 0, 0, [r2.CLS, "--preset", "vit-3x64", *r2.SIZE, "--max_steps", "400",
                                                   *probe], what="timing: dense 400 steps + one validation"))
    runs.append(Run("probe3-moe", "probe", 0, 0, [r2.CLS, *mobile, "--max_steps", "400", *probe],
                    what="timing: Mobile V-MoE 400 steps + one validation"))
    for s in SEEDS:
        dense, sc = runs_dir / f"A3-dense-s{s}", runs_dir / f"A3-sc-s{s}" / "superclasses.json"
        common = cls_args(s, LR_A, EPOCHS_A3)
        runs.append(Run(f"A3-dense-s{s}", "A3", 1, s, [r2.CLS, "--preset", "vit-3x64", *r2.SIZE, *common],
                        what="dense ViT 3x64"))
        runs.append(Run(f"A3-sc-s{s}", "A3", 1, s,
                        ["-m", "hf_vmoe.cli", "superclasses", "from-model", "--model", str(dense), "--validation-dir",
                         str(tin / "heldout"), "--num-experts", "10", "--soft", "--seed", "0", "--output", str(sc)],
                        kind="step", deps=(f"A3-dense-s{s}",), output=str(sc),
                        what="10 balanced super-classes from the dense model's soft confusion on the held-out 10,000"))
        runs.append(Run(f"A3-moe-conf-s{s}", "A3", 1, s,
                        [r2.CLS, *mobile, "--superclasses_file", str(sc), "--train_routing", "router", *common],
                        deps=(f"A3-sc-s{s}",), what="Mobile V-MoE, super-class router"))
        runs.append(Run(f"A3-moe-lfb-s{s}", "A3", 1, s,
                        [r2.CLS, *mobile, "--config_overrides",
                         f"router_bias_update_rate={LFB_RATE},router_aux_loss_coef=0.0", *common],
                        what="Mobile V-MoE, learned router with loss-free balancing (no balancing loss)"))
    for s in SEEDS:
        dense, sc = str(runs_dir / f"A3-dense-s{s}"), str(runs_dir / f"A3-sc-s{s}" / "superclasses.json")
        common = cls_args(s, LR_CONT, EPOCHS_B3)
        init = runs_dir / f"B3-token-shared-init-s{s}"
        runs += [
            Run(f"B3-dense-s{s}", "B3", 2, s, [r2.CLS, "--model_name_or_path", dense, *common],
                deps=(f"A3-dense-s{s}",), what="dense continuation"),
            Run(f"B3-moe-conf-s{s}", "B3", 2, s,
                [r2.CLS, *mobile, "--init_from_dense", dense, "--superclasses_file", sc, "--train_routing", "router",
                 *common], deps=(f"A3-sc-s{s}",), what="Mobile V-MoE upcycled, super-class router"),
            Run(f"B3-moe-conf-drop-s{s}", "B3", 2, s,
                [r2.CLS, *mobile, "--init_from_dense", dense, "--drop_upcycling_ratio", "0.5", "--superclasses_file",
                 sc, "--train_routing", "router", *common], deps=(f"A3-sc-s{s}",),
                what="Mobile V-MoE drop-upcycled (half of each expert's units re-initialised), super-class router"),
            Run(f"B3-token-shared-init-s{s}", "B3", 2, s,
                [str(HERE.parent / "round2" / "upcycle_vmoe.py"), "--dense", dense, "--output", str(init), "--mode",
                 "split_shared", "--config_overrides", r2.TOKEN_MOE, "--seed", str(s)],
                kind="step", deps=(f"A3-dense-s{s}",), output=str(init / "model.safetensors"),
                what="upcycle: token MoE E=4 half-width + half-width shared expert"),
            Run(f"B3-token-shared-s{s}", "B3", 2, s, [r2.CLS, "--model_name_or_path", str(init), *common],
                deps=(f"B3-token-shared-init-s{s}",), what="token MoE + shared expert (ViMoE), upcycled"),
        ]
    return runs


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    root = Path(os.environ.get("EVD3", "/work/evd3"))
    isa = "avx2"
    while argv and argv[0] in ("--root", "--isa"):
        if len(argv) < 2:
            raise SystemExit(f"{argv[0]} needs a value")
        flag, value = argv[0], argv[1]
        argv = argv[2:]
        if flag == "--root":
            root = Path(value)
        elif value not in ISA:
            raise SystemExit(f"--isa must be one of {sorted(ISA)}, got {value!r}")
        else:
            isa = value
    if not any(a.split("=")[0] in ("--group", "--only") for a in argv):
        argv += ["--group", "A3,B3,C"]
    r2.configure(root, plan, ISA[isa])
    return r2.main(argv)


if __name__ == "__main__":
    sys.exit(main())
