"""`hf-vmoe export MODEL_DIR --format onnx|executorch [--int8] -o PATH` on a saved tiny VMoE folder."""

import numpy as np
import pytest
import torch
from conftest import tiny_config

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from hf_vmoe import VMoEForImageClassification, VMoEImageProcessor  # noqa: E402
from hf_vmoe.cli import main  # noqa: E402
from hf_vmoe.integrations.export import OnnxVMoE  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = VMoEForImageClassification(tiny_config()).eval()
    model.save_pretrained(folder)
    VMoEImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(6):
        (folder / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"c{i % 2}" / f"{i}.png")
    return folder


def test_onnx_fp32_and_int8(model_dir, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(model_dir), "--format", "onnx", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    model = VMoEForImageClassification.from_pretrained(model_dir).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    torch.testing.assert_close(torch.from_numpy(OnnxVMoE(out)(x)), expected, atol=1e-4, rtol=0)
    q = tmp_path / "q.onnx"
    assert main(["export", str(model_dir), "--format", "onnx", "--int8", "-o", str(q)]) == 0
    assert q.is_file()


def test_executorch_int8_needs_calibration_images(model_dir, image_dir, tmp_path, capsys):
    pytest.importorskip("executorch.runtime", reason='the `executorch` extra: pip install "hf-vmoe[executorch]"')
    out = tmp_path / "q.pte"
    assert main(["export", str(model_dir), "--format", "executorch", "--int8", "-o", str(out)]) == 2
    assert "--calibration-dir" in capsys.readouterr().err
    assert not out.exists()
    assert main(["export", str(model_dir), "--format", "executorch", "--int8", "--calibration-dir", str(image_dir),
                 "-o", str(out)]) == 0
    assert out.is_file()
