"""Golden training traces, one per router type: a few AdamW steps of a tiny model from a fixed seed, the loss of each
step and the logits after training, checked against `tests/golden/traces.json`. A refactoring that keeps every
behaviour keeps these numbers (to float tolerance across CPUs); a change that is meant to alter a router's function
regenerates its trace (`HF_VMOE_UPDATE_GOLDEN=1 pytest tests/test_golden.py`) and says why in the commit."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from hf_vmoe import VMoEForImageClassification, update_router_biases

GOLDEN = Path(__file__).parent / "golden" / "traces.json"
UPDATE = os.environ.get("HF_VMOE_UPDATE_GOLDEN") == "1"
ROUTERS = {
    "dense": dict(moe_layers=()),
    "image_shared_router": dict(moe_layers=(2, 3)),
    "image_superclass": dict(moe_layers=(2, 3), superclass_ids=[0, 1, 2, 3, 0], train_routing="superclass"),
    "image_per_block_k2": dict(moe_layers=(2, 3), shared_router=False, num_experts_per_tok=2),
    "image_loss_free": dict(moe_layers=(2, 3), router_bias_update_rate=0.01, router_aux_loss_coef=0.0),
    "token_k2_capacity_noise": dict(routing_level="token", num_experts_per_tok=2, capacity_factor=1.0,
                                    router_noise_std=0.5, moe_layers=(1, 3)),
    "token_shared_expert": dict(routing_level="token", num_shared_experts=1, moe_layers=(1, 3)),
    "expert_choice": dict(routing_level="token", router_type="expert_choice", capacity_factor=1.0, moe_layers=(1, 3)),
    "soft": dict(routing_level="token", router_type="soft", num_slots=2, moe_layers=(1, 3)),
}
STEPS = 4


def trace(overrides: dict) -> dict:
    torch.manual_seed(0)
    model = VMoEForImageClassification(tiny_config(**overrides)).train()
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 32, 32, generator=generator), torch.randint(0, 5, (6,), generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(STEPS):
        torch.manual_seed(100 + step)  # router noise / dropout draws
        out = model(x, labels=y)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        update_router_biases(model)
        losses.append(out.loss.item())
    model.eval()
    with torch.no_grad():
        logits = model(x[:2]).logits
    return {"losses": losses, "logits": logits.flatten().tolist()}


def golden() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}


@pytest.mark.parametrize("name", ROUTERS)
def test_training_trace_matches_golden(name):
    got = trace(ROUTERS[name])
    if UPDATE:
        data = golden()
        data[name] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        pytest.skip("golden trace written")
    expected = golden().get(name)
    assert expected is not None, f"no golden trace for {name!r}: run with HF_VMOE_UPDATE_GOLDEN=1"
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(expected["losses"]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got["logits"]), torch.tensor(expected["logits"]), rtol=1e-3, atol=1e-4)
    assert got["losses"][-1] < got["losses"][0]  # the trace is a training run: the loss falls
