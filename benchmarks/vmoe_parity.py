"""Parity with Google's reference V-MoE, measured: every configuration of tests/test_vmoe_parity.py, run through vmoe's
own Flax modules (../shared/ref) and through hf_vmoe after conversion: inference, training mode without noise,
batches that are not whole routing groups (mode `eval-padded`: vmoe on the batch padded with zero images as its
evaluator pads, hf_vmoe on the real images with `router_group_remainder="pad"`), and training with router noise
(mode `train-noise`: hf_vmoe's aux_loss against vmoe's own loss functions on hf_vmoe's clean and noisy logits,
since the noise samples differ; no logits compared), and the expert-choice and Soft MoE routers (vmoe's
`NoisyTopItemsPerExpertRouter` and `SoftRouter`: for expert choice the (group, expert) pairs whose picked tokens
differ, for Soft MoE the largest difference of the dispatch and combine weights).

Writes benchmarks/results/vmoe_parity.json and .md: per configuration, the max |logit difference| relative to the
logit scale, tokens whose chosen experts differ, tokens whose dropped choices differ, the reference's dropped
choices, and (training) the aux-loss difference; or the error when hf_vmoe cannot run the configuration.

    python benchmarks/vmoe_parity.py   # needs `pip install -e ".[parity]"` and ../shared/ref
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import test_vmoe_parity as parity  # noqa: E402
import vmoe_reference as ref  # noqa: E402


def measure(case, tmp: str, train: bool) -> dict:
    row = {"case": case.name, "mode": "train" if train else "eval", "needs": list(case.needs)}
    try:
        config, params, x = parity._reference(case)
        theirs = ref.run(config, params, x, train=train, overrides=None if train else parity._eval_overrides(case))
        model, out, routing = parity._ours(parity._converted(case, tmp), x, train)
    except Exception as err:  # noqa: BLE001 - recorded, not raised: the table shows what cannot run yet
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return row
    logits = out.logits.detach().numpy()
    row["max_rel_logit_diff"] = float(np.abs(logits - theirs.logits).max() / np.abs(theirs.logits).max())
    experts_differ = dropped_differ = dropped = choices = 0
    for name in theirs.experts:
        plan = routing.get(int(name.rpartition("_")[2]))
        if plan is None:
            row["error"] = f"no routing plan recorded for {name}"
            return row
        experts_differ += int((plan.top_k_index.numpy() != theirs.experts[name]).any(axis=1).sum())
        kept = np.ones_like(theirs.kept[name]) if plan.keep is None else plan.keep.numpy()
        dropped_differ += int((kept != theirs.kept[name]).any(axis=1).sum())
        dropped += int((~theirs.kept[name]).sum())
        choices += int(theirs.kept[name].size)
    row.update(tokens=int(theirs.experts[name].shape[0]), experts_differ=experts_differ,
               dropped_differ=dropped_differ, reference_dropped=dropped, choices=choices)
    if train:
        row["aux_loss"] = float(out.aux_loss)
        row["vmoe_auxiliary_loss"] = float(theirs.auxiliary_loss.mean())
    return row


def measure_padded(case, images: int, tmp: str) -> dict:
    row = {"case": f"{case.name} ({images} of {parity.BATCH} images)", "mode": "eval-padded",
           "needs": list(case.needs)}
    try:
        row.update(parity.compare_padded(case, images, tmp))
    except Exception as err:  # noqa: BLE001
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return row


def measure_noisy(case, tmp: str) -> dict:
    row = {"case": case.name, "mode": "train-noise", "needs": list(case.needs)}
    try:
        row["aux_loss"], row["vmoe_auxiliary_loss"] = parity.noisy_aux_loss(case, tmp)
    except Exception as err:  # noqa: BLE001
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return row


def measure_router(case, tmp: str, train: bool) -> dict:
    row = {"case": case.name, "mode": "train" if train else "eval", "needs": list(case.needs)}
    try:
        row.update(parity.compare_router(case, tmp, train=train))
    except Exception as err:  # noqa: BLE001
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return row


def main() -> int:
    reason = ref.skip_reason()
    if reason:
        print(f"cannot run: {reason}")
        return 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in parity.CASES:
            rows.append(measure(case, tmp, train=False))
        for case in parity.TRAIN_CASES:
            rows.append(measure(case, tmp, train=True))
        for case, images in parity.PADDED_CASES:
            rows.append(measure_padded(case, images, tmp))
        for case in parity.NOISY_CASES:
            rows.append(measure_noisy(case, tmp))
        for case in parity.ROUTER_CASES:
            rows.append(measure_router(case, tmp, train=False))
        for case in parity.ROUTER_CASES:
            rows.append(measure_router(case, tmp, train=True))
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    payload = {"date": dt.date.today().isoformat(), "tolerance": parity.RTOL,
               "batch": parity.BATCH, "image_size": parity.IMAGE, "rows": rows}
    (results / "vmoe_parity.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["| case | mode | max rel. logit diff | token-blocks whose experts / drops differ | vmoe dropped choices | "
             "aux_loss (hf / vmoe) | needs |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            cells = [r["case"], r["mode"], "—", r["error"], "—", "—"]
        elif "picks" in r:  # expert choice and Soft MoE
            routing = (f"{r['picks_differ']} of {r['picks']} (group, expert) picks" if r["picks"]
                       else f"dispatch / combine weights within {r['max_weight_diff']:.1e}")
            aux = f"{r['aux_loss']:.6f} / {r['vmoe_auxiliary_loss']:.6f}" if r["mode"] == "train" else "—"
            cells = [r["case"], r["mode"], f"{r['max_rel_logit_diff']:.1e}", routing, "—", aux]
        elif r["mode"] == "train-noise":
            cells = [r["case"], r["mode"], "—", "— (noise samples differ)", "—",
                     f"{r['aux_loss']:.6f} / {r['vmoe_auxiliary_loss']:.6f} (vmoe's formulas)"]
        else:
            aux = f"{r['aux_loss']:.6f} / {r['vmoe_auxiliary_loss']:.6f}" if r["mode"] == "train" else "—"
            cells = [r["case"], r["mode"], f"{r['max_rel_logit_diff']:.1e}",
                     f"{r['experts_differ']} / {r['dropped_differ']}", f"{r['reference_dropped']} of {r['choices']}", aux]
        lines.append("| " + " | ".join(cells + [", ".join(r["needs"]) or "—"]) + " |")
    (results / "vmoe_parity.md").write_text(f"Measured {payload['date']} (tests/test_vmoe_parity.py cases).\n\n"
                                           + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
