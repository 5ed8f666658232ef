"""`pipeline(task, model=<saved folder>)` never asks "Do you wish to run the custom code? [y/N]" once hf_vmoe is
imported, whatever stdin is; without hf_vmoe, `trust_remote_code=True` still loads the folder's
own code.

The question comes from the pipeline's video-processor lookup (`AutoVideoProcessor.from_pretrained` ->
`resolve_trust_remote_code`): `input()` fails at once on a closed / null stdin (the lookup then gives up quietly)
but waits ~15 s on a terminal. Each case runs in a fresh process, so the registration under test is the one
`import hf_vmoe` does.
"""

import os
import pty
import subprocess
import sys
import textwrap

import pytest
from conftest import tiny_config
from test_remote_code import CHILD as REMOTE_CHILD

from hf_vmoe import VMoEForImageClassification, VMoEForSemanticSegmentation, VMoEImageProcessor

PROMPT = "Do you wish to run the custom code"
BLOCK_HF_VMOE = REMOTE_CHILD.split("import torch")[0]  # the meta-path guard of test_remote_code.py

CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    from PIL import Image
    from transformers import pipeline

    torch.set_num_threads(1)
    cls_dir, seg_dir, trust = sys.argv[1], sys.argv[2], sys.argv[3] == "trust"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    kwargs = {"trust_remote_code": True} if trust else {}
    calls = [
        ("image-classification", dict(model=cls_dir)),
        ("image-classification", dict(model=cls_dir, image_processor=cls_dir)),
        ("image-feature-extraction", dict(model=cls_dir)),
        ("image-segmentation", dict(model=seg_dir)),
    ]
    if trust:  # a classification folder's auto_map names no AutoModel, which image-feature-extraction loads
        calls = [c for c in calls if c[0] != "image-feature-extraction"]
    for task, call in calls:
        pipe = pipeline(task, **call, **kwargs)
        result = pipe(image)
        assert result is not None and len(result) > 0, (task, result)
        print("DONE", task, type(pipe.model).__module__, flush=True)
    """
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline_prompt")
    processor = VMoEImageProcessor(size={"height": 32, "width": 32})
    cls_dir, seg_dir = root / "cls", root / "seg"
    VMoEForImageClassification(tiny_config()).save_pretrained(cls_dir)
    VMoEForSemanticSegmentation(tiny_config(routing_level="token")).save_pretrained(seg_dir)
    for folder in (cls_dir, seg_dir):
        processor.save_pretrained(folder)
        assert "AutoImageProcessor" in (folder / "preprocessor_config.json").read_text()  # what used to trigger it
    (root / "with_pkg.py").write_text("import hf_vmoe  # noqa: F401\n" + CHILD)
    (root / "without_pkg.py").write_text(BLOCK_HF_VMOE + CHILD)
    return root


def _env(root):
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(root / "hf_home"), OMP_NUM_THREADS="1")


def _run(root, script, trust, terminal):
    args = [sys.executable, str(root / script), str(root / "cls"), str(root / "seg"), trust]
    if not terminal:
        proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=_env(root),
                              cwd=root, timeout=600)
        return proc.returncode, proc.stdout + proc.stderr
    main, secondary = pty.openpty()  # stdin is a terminal: `input()` would wait for an answer
    try:
        proc = subprocess.Popen(args, stdin=secondary, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=_env(root), cwd=root)
        os.close(secondary)
        out, _ = proc.communicate(timeout=600)
    finally:
        os.close(main)
    return proc.returncode, out


@pytest.mark.slow
@pytest.mark.parametrize("terminal", [False, True], ids=["stdin-devnull", "stdin-terminal"])
def test_no_remote_code_prompt_with_hf_vmoe_imported(folders, terminal):
    returncode, out = _run(folders, "with_pkg.py", "plain", terminal)
    assert returncode == 0, out[-3000:]
    assert PROMPT not in out, out[-3000:]
    done = [line.split() for line in out.splitlines() if line.startswith("DONE")]
    assert [d[1] for d in done] == ["image-classification"] * 2 + ["image-feature-extraction", "image-segmentation"]
    assert all(d[2] == "hf_vmoe.modeling_vmoe" for d in done)  # the installed package's classes, no remote code


@pytest.mark.slow
def test_trust_remote_code_pipeline_without_hf_vmoe(folders):
    returncode, out = _run(folders, "without_pkg.py", "trust", terminal=False)
    assert returncode == 0, out[-3000:]
    assert PROMPT not in out
    done = [line.split() for line in out.splitlines() if line.startswith("DONE")]
    assert [d[1] for d in done] == ["image-classification"] * 2 + ["image-segmentation"]
    assert all(d[2].startswith("transformers_modules") for d in done), done
