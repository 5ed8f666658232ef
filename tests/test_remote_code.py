"""A saved folder loads with trust_remote_code=True in a process where `import hf_vmoe` fails."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO_ROOT, tiny_config

from hf_vmoe import VMoEForImageClassification, VMoEForSemanticSegmentation

# Runs in the child: a meta-path finder makes `import hf_vmoe` fail (the editable install would find it otherwise),
# and src/ is taken off sys.path. Then the model is loaded from the folder's own copied code.
CHILD = textwrap.dedent(
    """
    import importlib.abc, json, os, sys

    class BlockHfVmoe(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_vmoe" or name.startswith("hf_vmoe."):
                raise ImportError(f"hf_vmoe is blocked in this process ({name})")
            return None

    sys.meta_path.insert(0, BlockHfVmoe())
    sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("/src")]
    try:
        import hf_vmoe  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("hf_vmoe is importable: the test would prove nothing")

    import torch
    from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSemanticSegmentation

    torch.set_num_threads(1)  # the same thread count as the test process, so float sums are bit-identical

    inputs, result = sys.argv[1:3]
    x = torch.load(inputs)
    out = {}
    for task, folder in zip(sys.argv[3::2], sys.argv[4::2]):
        auto = AutoModelForImageClassification if task.startswith("cls") else AutoModelForSemanticSegmentation
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        model = auto.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(x).logits
        out[task] = {"logits": logits, "module": type(model).__module__, "config": type(config).__module__}
    assert "hf_vmoe" not in sys.modules
    torch.save(out, result)
    """
)


@pytest.mark.slow
def test_trust_remote_code_without_hf_vmoe(tmp_path):
    models = {
        "cls": VMoEForImageClassification(tiny_config(num_experts_per_tok=2)).eval(),
        "seg": VMoEForSemanticSegmentation(tiny_config(routing_level="token", num_shared_experts=1)).eval(),
        "cls-expert-choice": VMoEForImageClassification(
            tiny_config(routing_level="token", router_type="expert_choice", router_group_size=17)).eval(),
        "seg-soft": VMoEForSemanticSegmentation(
            tiny_config(routing_level="token", router_type="soft", num_slots=2, num_shared_experts=1)).eval(),
    }
    args = []
    for task, model in models.items():
        folder = tmp_path / task
        model.save_pretrained(folder)
        auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
        assert "AutoConfig" in auto_map
        args += [task, str(folder)]
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH="")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "x.pt"), str(tmp_path / "out.pt"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt")
    for task, model in models.items():
        result = results[task]
        assert result["module"].startswith("transformers_modules"), result["module"]
        assert result["config"].startswith("transformers_modules"), result["config"]
        with torch.no_grad():
            assert torch.equal(result["logits"], model(x).logits)


def test_child_really_cannot_import_hf_vmoe(tmp_path):
    """The guard itself: the same blocking preamble makes `import hf_vmoe` fail even with the editable install."""
    preamble = CHILD.split("import torch")[0]
    code = preamble + "\nprint('blocked')\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(REPO_ROOT))
    assert proc.returncode == 0 and "blocked" in proc.stdout, proc.stderr
