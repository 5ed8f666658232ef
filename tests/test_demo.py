"""`hf-vmoe demo --quick`: the whole recipe on scikit-learn's bundled digits, a few steps per stage."""

import json

import pytest

pytest.importorskip("sklearn", reason="the demo's data ships with scikit-learn")

from hf_vmoe.cli import main as cli_main  # noqa: E402
from hf_vmoe.demo import stratified_split  # noqa: E402


def test_demo_quick_writes_models_table_heatmap(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--quick", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "top-1 acc" in printed and "router super-class acc" in printed and "Mobile V-MoE E=5 k=1" in printed
    for name in ("results.json", "results.md", "routing_heatmap.png", "superclasses.json", "example_digit.png",
                 "mobile-vmoe/config.json", "mobile-vmoe/model.safetensors", "mobile-vmoe/preprocessor_config.json",
                 "dense/model.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "routing_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    dense, moe = results["dense"], results["mobile_vmoe"]
    # equal active FLOPs but for the router (its linear layer and the mean of the 17 tokens, a matmul); the analytic
    # count equals torch's FlopCounterMode
    assert moe["flops"] - dense["flops"] == 2 * 64 * 5 + 2 * 17 * 64
    assert dense["flops"] == dense["flops_counted"] and moe["flops"] == moe["flops_counted"]
    assert moe["params"] > moe["params_active"]
    assert abs(sum(moe["expert_load"]) - 1) < 1e-6 and 0 <= moe["router_superclass_accuracy"] <= 1
    assert results["reloaded_same_logits"] is True
    assert results["pipeline"]["prediction"][0]["label"] in [str(d) for d in range(10)]
    assert sorted(len(g) for g in results["superclasses"]["groups"]) == [2, 2, 2, 2, 2]
    table = (out / "results.md").read_text()
    assert f"{dense['accuracy']:.2%}" in table and f"{moe['accuracy']:.2%}" in table  # printed = measured


def test_stratified_split_is_disjoint_and_stratified():
    import numpy as np

    labels = np.repeat(np.arange(10), 20)
    train, val, test = stratified_split(labels, seed=0)
    assert len(set(train) | set(val) | set(test)) == 200 and len(train) == 120 and len(val) == len(test) == 40
    assert (np.bincount(labels[test]) == 4).all()
