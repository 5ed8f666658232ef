"""Round 3, A3 on a GPU: the paper's ViT-Tiny size (`vit-12x192` vs `mobile-vmoe-12x192`), as one short run.

Round 2's GPU script (`../round2/gpu_train.py`: 64 px, patch 4, E=10, k=1, MoE in the last 2 of 12 blocks, one
shared image router, batch 128, bfloat16 autocast, the data decoded once into GPU memory, a plain training loop)
with round 3's data and arms:

- data: a pack of round 3's split (`$EVD3/tin200`, prepare_data.py), the first 100 training, 25 held-out and 25
  validation images of each class (30,000 images, about 46 MiB: the run tool carries at most 64 MiB, so the full
  110,000 do not travel). The dense arm's held-out soft confusion gives each seed's super-classes, as on the CPU.
- arms, on every seed: `dense`; `conf` (Mobile V-MoE, super-class router); `lfb` (Mobile V-MoE, learned router with
  loss-free balancing at rate 1e-3 and no balancing loss), as A3's three arms.

    here:    python benchmarks/evidence/round3/gpu_train.py pack        # -> runs/gpu_data/tin200-r3.npz
    device:  python benchmarks/evidence/round3/gpu_train.py run --out $OUT/gpu_a3   (carry runs/gpu_data)
    smoke:   python benchmarks/evidence/round3/gpu_train.py run --smoke --out /tmp/gpu_smoke   # CPU, seconds

A GPU result is a scouting figure beside the CPU record (fewer images per class, bfloat16, batch 128): it says
whether the ViT-Tiny size changes the picture, not what A3 measured.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
PACK = ROOT / "runs" / "gpu_data" / "tin200-r3.npz"
PER_CLASS = {"train": 100, "heldout": 25, "validation": 25}
MOE_ARMS = "conf,lfb"


def _round2():
    spec = importlib.util.spec_from_file_location("gpu_train_round2", HERE.parent / "round2" / "gpu_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    r2 = _round2()
    if argv[:1] == ["pack"]:
        evd3 = Path(os.environ.get("EVD3", "/work/evd3"))
        if "--evd3" in argv:
            evd3 = Path(argv[argv.index("--evd3") + 1])
        r2.pack(evd3, PACK, PER_CLASS)
        return 0
    if argv[:1] == ["run"]:  # round 2's runner with this pack and these arms (later flags win)
        argv = ["run", "--data", str(PACK), "--moe-arms", MOE_ARMS, *argv[1:]]
    return r2.main(argv)


if __name__ == "__main__":
    sys.exit(main())
