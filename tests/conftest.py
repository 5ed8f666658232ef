"""Shared test helpers: tiny configs that run in milliseconds, and the real-data folder (skips when absent)."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hf_vmoe  # noqa: E402,F401  (registers the Auto classes)
from hf_vmoe import VMoEConfig  # noqa: E402

# Tiny configs: one thread is faster than two (no fork/join overhead) and keeps subprocess tests from oversubscribing
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("HF_VMOE_REAL_DATA", REPO_ROOT.parent / "shared" / "data"))


def tiny_config(**overrides) -> VMoEConfig:
    """A 4-block, width-32 VMoE on 32x32 images (16 patches of 8x8), 4 experts, 5 labels."""
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_experts=4,
        num_experts_per_tok=1,
        num_labels=5,
    )
    kwargs.update(overrides)
    return VMoEConfig(**kwargs)


def load_example(name: str):
    """Import `examples/<name>.py` as a module (the example scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _router_registry():
    """Routers a test (or a documented example) registers stay in that test."""
    from hf_vmoe.configuration_vmoe import ROUTER_LEVELS
    from hf_vmoe.modeling_vmoe import ROUTER_CLASSES

    saved = dict(ROUTER_CLASSES), dict(ROUTER_LEVELS)
    yield
    for registry, before in zip((ROUTER_CLASSES, ROUTER_LEVELS), saved):
        registry.clear()
        registry.update(before)


@pytest.fixture
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real-data folder absent: {REAL_DATA} (the real images some tests train on, outside the "
                    "repository; HF_VMOE_REAL_DATA, default ../shared/data beside the checkout)")
    return REAL_DATA


def expert_mlp(experts, expert_idx: int, hidden_states: torch.Tensor) -> torch.Tensor:
    """One expert of a `VMoEExperts` as a plain MLP, the reference the experts' backends are checked against."""
    up = torch.nn.functional.linear(hidden_states, experts.up_proj[expert_idx], experts.up_proj_bias[expert_idx])
    return torch.nn.functional.linear(experts.act_fn(up), experts.down_proj[expert_idx],
                                      experts.down_proj_bias[expert_idx])
