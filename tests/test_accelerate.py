"""`accelerate launch` with 2 CPU processes (torchrun + gloo): Trainer and a plain Accelerate loop, both routing
levels, with the last rank's routers forced so that some experts get no input there. DDP runs with
find_unused_parameters=False; the parameters must be identical on both ranks afterwards."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "accelerate"
CONFIG = EXAMPLES / "cpu_multi_process.yaml"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                       reason="accelerate CLI not installed"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: str, report_dir: Path, *args: str) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate if accelerate.exists() else "accelerate"), "launch", "--config_file", str(CONFIG),
           "--num_processes", "2", "--main_process_port", str(_free_port()), str(EXAMPLES / script),
           "--tiny", "--report-dir", str(report_dir), *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert "unused parameters" not in result.stderr.lower()
    return result


def _reports(report_dir: Path):
    reports = [json.loads((report_dir / f"report_rank{r}.json").read_text()) for r in (0, 1)]
    params = [load_file(str(report_dir / f"params_rank{r}.safetensors")) for r in (0, 1)]
    return reports, params


def _initial_params(routing):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import argparse

        from common import add_model_args, build_model

        parser = argparse.ArgumentParser()
        add_model_args(parser)
        return build_model(parser.parse_args(["--tiny", "--routing", routing])).state_dict()
    finally:
        sys.path.remove(str(EXAMPLES))


def _check(reports, params, routing):
    assert [r["world_size"] for r in reports] == [2, 2]
    assert all(r["wrapped"] == "DistributedDataParallel" for r in reports)
    assert all(r["find_unused_parameters"] is False for r in reports)
    # some expert got input on rank 0 and none on rank 1, in every router call
    counts0, counts1 = torch.tensor(reports[0]["expert_counts"]), torch.tensor(reports[1]["expert_counts"])
    assert counts1.shape == counts0.shape and counts0.shape[1] == 4
    idle_on_1 = (counts1 == 0) & (counts0 > 0)
    assert idle_on_1.any(dim=1).all(), f"rank 0 {counts0.tolist()} rank 1 {counts1.tolist()}"
    # identical parameters on both ranks, and training changed them (experts and routers included)
    assert params[0].keys() == params[1].keys()
    for name in params[0]:
        assert torch.equal(params[0][name], params[1][name]), f"{name} differs between ranks"
    initial = _initial_params(routing)
    changed = [n for n in params[0] if not torch.equal(params[0][n], initial[n])]
    assert any("experts.up_proj" in n for n in changed) and any("router.weight" in n for n in changed), changed


@pytest.mark.parametrize("routing", ["image", "token"])
def test_trainer_ddp_two_cpu_processes(routing, tmp_path):
    _launch("train_trainer.py", tmp_path, "--routing", routing, "--max-steps", "3", "--force-idle-experts",
            "--output-dir", str(tmp_path / "out"))
    reports, params = _reports(tmp_path)
    _check(reports, params, routing)
    # the Trainer logs the loss averaged over processes: both ranks log the same numbers
    assert reports[0]["trainer_logged_losses"] == reports[1]["trainer_logged_losses"]
    assert len(reports[0]["trainer_logged_losses"]) == 3


@pytest.mark.parametrize("routing", ["image", "token"])
def test_accelerate_loop_two_cpu_processes(routing, tmp_path):
    _launch("train_loop.py", tmp_path, "--routing", routing, "--steps", "3", "--force-idle-experts",
            "--measure-reduction")
    reports, params = _reports(tmp_path)
    _check(reports, params, routing)
    # expert counts summed over ranks by accelerator.reduce == the sum of the local counts
    local_sum = torch.tensor(reports[0]["expert_counts"]) + torch.tensor(reports[1]["expert_counts"])
    assert torch.equal(torch.tensor(reports[0]["global_expert_counts"]), local_sum)
    # aux-loss reduction: each rank back-propagates its local (task + aux) loss and DDP averages the gradients,
    # so the router gradient is that of the mean of the local losses, not that of the loss on the global batch
    red = reports[0]["reduction"]
    assert red["local_aux_losses_all_ranks"][0] == pytest.approx(reports[0]["reduction"]["this_rank_aux"])
    assert red["local_aux_losses_all_ranks"][1] == pytest.approx(reports[1]["reduction"]["this_rank_aux"])
    assert red["max_abs_ddp_grad_minus_mean_of_local_grad"] <= 1e-7 + 1e-5 * red["router_grad_norm"]
    assert red["max_abs_ddp_grad_minus_global_batch_grad"] > 10 * red["max_abs_ddp_grad_minus_mean_of_local_grad"]
    assert red["mean_of_local_aux"] != pytest.approx(red["global_batch_aux"], rel=1e-6)


@pytest.mark.parametrize("routing", ["image", "token"])
def test_fsdp2_on_cpu_with_vmoe_layer_wrap_units(routing, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(EXAMPLES / "fsdp2_cpu.py"), "--routing", routing, "--report-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-6000:]
    reports = [json.loads((tmp_path / f"fsdp_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["param_type"] == "DTensor" and r["identical_full_params"] for r in reports)
    assert all(r["local_shard_numel"] < r["full_numel"] for r in reports)  # really sharded
    counts1 = torch.tensor(reports[1]["expert_counts"])
    assert (counts1 == 0).any(dim=1).all()  # some experts idle on the zero-input rank
