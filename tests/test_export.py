"""ONNX export of image- and token-routed models, run with onnxruntime, compared with PyTorch eager."""

import pytest
import torch
from conftest import tiny_config

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from hf_vmoe import VMoEForImageClassification  # noqa: E402
from hf_vmoe.integrations.export import OnnxVMoE, export_onnx  # noqa: E402


def _spread_router(model, scale=3.0):
    """Large random router weights so images (or tokens) go to clearly different experts."""
    routers = [m for n, m in model.named_modules() if n.endswith("router") and m is not None]
    with torch.no_grad():
        for router in routers:
            router.weight.normal_(0, scale)


def _experts_of(model, pixel_values):
    with torch.no_grad():
        out = model(pixel_values=pixel_values, output_router_logits=True)
    return out.router_logits[0].argmax(-1)


@pytest.fixture(scope="module")
def image_model():
    torch.manual_seed(0)
    model = VMoEForImageClassification(tiny_config(routing_level="image", num_experts_per_tok=1)).eval()
    _spread_router(model)
    return model


@pytest.fixture(scope="module")
def images(image_model):
    torch.manual_seed(1)
    pixel_values = torch.randn(8, 3, 32, 32)
    experts = _experts_of(image_model, pixel_values)
    assert len(set(experts.tolist())) >= 3, f"images should go to different experts, got {experts.tolist()}"
    return pixel_values


def test_image_routing_dynamic_batch_matches_eager(image_model, images, tmp_path):
    path = export_onnx(image_model, tmp_path / "image.onnx", batch_size=2, with_router_logits=True)
    session = OnnxVMoE(path)
    for batch in (images, images[:1], images[3:6]):
        logits, router_logits = session.run(batch)
        with torch.no_grad():
            expected = image_model(pixel_values=batch, output_router_logits=True)
        assert logits.shape == tuple(expected.logits.shape)
        torch.testing.assert_close(torch.from_numpy(logits), expected.logits, atol=1e-4, rtol=0)
        # same routing decisions, image by image
        assert torch.equal(torch.from_numpy(router_logits).argmax(-1), expected.router_logits[0].argmax(-1))


def test_image_routing_each_image_alone_uses_its_own_expert(image_model, images, tmp_path):
    """Batch-1 export (fixed shape): every image, whichever expert it goes to, matches eager."""
    path = export_onnx(image_model, tmp_path / "b1.onnx", batch_size=1, dynamic_batch=False)
    session = OnnxVMoE(path)
    assert session.session.get_inputs()[0].shape[0] == 1
    experts = _experts_of(image_model, images)
    for i in range(images.shape[0]):
        with torch.no_grad():
            expected = image_model(pixel_values=images[i : i + 1]).logits
        torch.testing.assert_close(torch.from_numpy(session(images[i : i + 1])), expected, atol=1e-4, rtol=0)
    # the comparison covered several experts, and a wrong expert would change the logits a lot
    assert len(set(experts.tolist())) >= 3
    with torch.no_grad():
        experts_mod = image_model.vmoe.encoder.layer[-1].mlp.experts
        saved = experts_mod.down_proj.clone()
        experts_mod.down_proj.copy_(saved.roll(1, dims=0))  # swap which expert holds which weights
        swapped = image_model(pixel_values=images[:1]).logits
        experts_mod.down_proj.copy_(saved)
    assert (torch.from_numpy(session(images[:1])) - swapped).abs().max() > 1e-3


def test_image_routing_top2_exports(tmp_path):
    torch.manual_seed(0)
    model = VMoEForImageClassification(tiny_config(num_experts_per_tok=2, shared_router=False)).eval()
    _spread_router(model)
    pixel_values = torch.randn(4, 3, 32, 32)
    session = OnnxVMoE(export_onnx(model, tmp_path / "top2.onnx"))
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits
    torch.testing.assert_close(torch.from_numpy(session(pixel_values)), expected, atol=1e-4, rtol=0)


def test_token_routing_exports_with_batched_mm(tmp_path):
    torch.manual_seed(0)
    model = VMoEForImageClassification(
        tiny_config(routing_level="token", num_experts_per_tok=2, num_shared_experts=1)
    ).eval()
    _spread_router(model)
    before = model.get_experts_implementation()
    pixel_values = torch.randn(3, 3, 32, 32)
    session = OnnxVMoE(export_onnx(model, tmp_path / "token.onnx"))
    assert model.get_experts_implementation() == before  # restored after export
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits
    torch.testing.assert_close(torch.from_numpy(session(pixel_values)), expected, atol=1e-4, rtol=0)


def test_token_routing_with_eval_capacity_is_refused(tmp_path):
    model = VMoEForImageClassification(tiny_config(routing_level="token", eval_capacity_factor=1.0))
    with pytest.raises(ValueError, match="eval_capacity_factor"):
        export_onnx(model, tmp_path / "cap.onnx")
    assert not (tmp_path / "cap.onnx").exists()


def test_bad_batch_size(image_model, tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        export_onnx(image_model, tmp_path / "x.onnx", batch_size=0)


# ---------------------------------------------------------------------------------------------------------------
# Bad input and atomic writes (shared checks with export_executorch)
# ---------------------------------------------------------------------------------------------------------------


def test_image_routing_with_eval_capacity_is_refused(tmp_path):
    model = VMoEForImageClassification(tiny_config(routing_level="image", eval_capacity_factor=1.0))
    with pytest.raises(ValueError, match="eval_capacity_factor"):
        export_onnx(model, tmp_path / "cap.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "example, message",
    [
        (torch.randn(2, 32, 32, 3).permute(0, 3, 1, 2), "not contiguous"),
        (torch.randn(2, 3, 16, 16), r"shape \(2, 3, 16, 16\)"),
        (torch.randn(2, 3, 32, 32, dtype=torch.float64), "dtype"),
    ],
    ids=["non-contiguous", "wrong-size", "float64"],
)
def test_bad_example_is_refused(image_model, example, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        export_onnx(image_model, tmp_path / "bad.onnx", example=example)
    assert list(tmp_path.iterdir()) == []


def test_static_int8_needs_calibration(image_model, tmp_path):
    with pytest.raises(ValueError, match="calibration"):
        export_onnx(image_model, tmp_path / "q.onnx", quantize="int8", quantization="static")
    with pytest.raises(ValueError, match="quantization must be one of"):
        export_onnx(image_model, tmp_path / "q.onnx", quantize="int8", quantization="qat")
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_leaves_nothing(image_model, tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        export_onnx(image_model, target, atol=-1.0)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_transformers_vit_exports(tmp_path):
    """The dense reference of the benchmarks (transformers' ViT, no router) goes through the same exporter."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=64, image_size=32, patch_size=8, num_labels=5)).eval()
    x = torch.randn(3, 3, 32, 32)
    session = OnnxVMoE(export_onnx(vit, tmp_path / "vit.onnx", example=x))
    with torch.no_grad():
        expected = vit(pixel_values=x).logits
    torch.testing.assert_close(torch.from_numpy(session(x)), expected, atol=1e-4, rtol=0)
