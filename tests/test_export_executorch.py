"""ExecuTorch export (torch.export -> XNNPACK -> .pte) of image-routed models, run in ExecuTorch's Python runtime and
compared with PyTorch eager image by image; bad input is refused before anything is written."""

import pytest
import torch
from conftest import tiny_config

pytest.importorskip(
    "executorch.runtime",
    reason='ExecuTorch is the `executorch` extra (pip install "hf-vmoe[executorch]", executorch 1.4.x for torch 2.13)',
)

from hf_vmoe import VMoEForImageClassification  # noqa: E402
from hf_vmoe.integrations.export import ExecuTorchVMoE, export_executorch  # noqa: E402

ATOL = 1e-4


def _spread_router(model, scale=3.0):
    """Large random router weights so the test images go to clearly different experts."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(0, scale)


def _model(**overrides):
    torch.manual_seed(0)
    model = VMoEForImageClassification(tiny_config(**overrides)).eval()
    _spread_router(model)
    return model


@pytest.fixture(scope="module")
def images():
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _assert_matches_eager_per_image(model, path, images, with_router_logits):
    runner = ExecuTorchVMoE(path)
    assert runner.input_shape == (1, 3, 32, 32)
    experts = set()
    for i in range(images.shape[0]):
        x = images[i : i + 1]
        with torch.no_grad():
            expected = model(pixel_values=x, output_router_logits=model.config.is_moe)
        got = runner.run(x)
        assert len(got) == (2 if with_router_logits else 1)
        assert got[0].shape == expected.logits.shape
        diff = float((got[0] - expected.logits).abs().max())
        assert diff <= ATOL, f"image {i}: ExecuTorch logits differ from eager by {diff:.3g}"
        if with_router_logits:
            assert torch.equal(got[1].argmax(-1), expected.router_logits[0].argmax(-1))
            experts.update(expected.router_logits[0].topk(model.config.num_experts_per_tok, -1).indices.flatten().tolist())
    return experts


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(num_experts_per_tok=1), id="image-k1"),
        pytest.param(dict(num_experts_per_tok=2, shared_router=False), id="image-k2-per-block-routers"),
        pytest.param(dict(num_experts_per_tok=1, num_shared_experts=1), id="image-k1-shared-expert"),
    ],
)
def test_image_routing_matches_eager(overrides, images, tmp_path):
    model = _model(**overrides)
    path = export_executorch(model, tmp_path / "vmoe.pte", with_router_logits=True)
    assert path.is_file() and path.stat().st_size > 0
    experts = _assert_matches_eager_per_image(model, path, images, with_router_logits=True)
    # the comparison covered several experts (a program that ignored the routing would fail on some)
    assert len(experts) >= 3, f"test images used experts {sorted(experts)} only"
    assert model.training is False


def test_dense_twin_matches_eager(images, tmp_path):
    model = _model(moe_layers="none")
    path = export_executorch(model, tmp_path / "dense.pte")
    _assert_matches_eager_per_image(model, path, images, with_router_logits=False)


def test_wrong_expert_weights_would_be_caught(images, tmp_path):
    """The parity above is sensitive to which expert runs: permuting the experts changes the logits a lot."""
    model = _model(num_experts_per_tok=1)
    runner = ExecuTorchVMoE(export_executorch(model, tmp_path / "vmoe.pte"))
    experts = model.vmoe.encoder.layer[-1].mlp.experts
    with torch.no_grad():
        saved = experts.down_proj.clone()
        experts.down_proj.copy_(saved.roll(1, dims=0))
        swapped = model(pixel_values=images[:1]).logits
        experts.down_proj.copy_(saved)
    assert float((runner(images[:1]) - swapped).abs().max()) > 1e-3


def test_example_sets_the_program_batch(images, tmp_path):
    model = _model(num_experts_per_tok=1)
    path = export_executorch(model, tmp_path / "b4.pte", example=images[:4].contiguous())
    runner = ExecuTorchVMoE(path)
    assert runner.input_shape == (4, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=images[4:8]).logits
    assert float((runner(images[4:8].numpy()) - expected).abs().max()) <= ATOL  # numpy input too
    with pytest.raises(ValueError, match=r"exported for \(4, 3, 32, 32\)"):
        runner(images[:1])


def test_model_mode_restored(tmp_path):
    model = _model(moe_layers="none").train()
    export_executorch(model, tmp_path / "m.pte")
    assert model.training


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear ValueError, and no file (not even a temporary one) left behind
# ---------------------------------------------------------------------------------------------------------------


def _assert_nothing_written(folder):
    assert list(folder.iterdir()) == [], f"left behind: {[p.name for p in folder.iterdir()]}"


def test_token_routing_is_refused_with_the_reason(tmp_path):
    model = VMoEForImageClassification(tiny_config(routing_level="token", num_experts_per_tok=2))
    with pytest.raises(ValueError, match="token routing.*per-token copies of the expert weights"):
        export_executorch(model, tmp_path / "token.pte")
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize("routing_level", ["image", "token"])
def test_eval_capacity_is_refused(routing_level, tmp_path):
    model = VMoEForImageClassification(tiny_config(routing_level=routing_level, eval_capacity_factor=1.0))
    with pytest.raises(ValueError, match="eval_capacity_factor"):
        export_executorch(model, tmp_path / "cap.pte")
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    "example, message",
    [
        (torch.randn(1, 32, 32, 3).permute(0, 3, 1, 2), "not contiguous"),
        (torch.randn(1, 3, 16, 16), r"shape \(1, 3, 16, 16\).*expects \(batch, 3, 32, 32\)"),
        (torch.randn(3, 32, 32), r"shape \(3, 32, 32\)"),
        (torch.randn(1, 1, 32, 32), r"expects \(batch, 3, 32, 32\)"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.int64), "floating point"),
        (torch.randn(1, 3, 32, 32, dtype=torch.float64), "dtype torch.float64"),
        (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
        ([[0.0]], "must be a torch.Tensor"),
    ],
    ids=["non-contiguous", "wrong-size", "3d", "wrong-channels", "integer", "float64", "nan", "list"],
)
def test_bad_example_is_refused(example, message, tmp_path):
    model = _model(num_experts_per_tok=1)
    with pytest.raises(ValueError, match=message) as info:
        export_executorch(model, tmp_path / "bad.pte", example=example)
    assert "example" in str(info.value)
    _assert_nothing_written(tmp_path)


def test_bad_options_are_refused(tmp_path):
    model = _model(num_experts_per_tok=1)
    with pytest.raises(ValueError, match="quantize must be one of"):
        export_executorch(model, tmp_path / "q.pte", quantize="int4")
    with pytest.raises(ValueError, match="calibration"):
        export_executorch(model, tmp_path / "q.pte", quantize="int8")  # int8 without real calibration images
    with pytest.raises(ValueError, match="calibration batch 0 has shape"):
        export_executorch(model, tmp_path / "q.pte", quantize="int8", calibration=torch.randn(4, 3, 16, 16))
    with pytest.raises(ValueError, match="needs an MoE model"):
        export_executorch(_model(moe_layers="none"), tmp_path / "d.pte", with_router_logits=True)
    _assert_nothing_written(tmp_path)


def test_failed_verification_leaves_the_old_file_untouched(tmp_path):
    """A failure after the program is built (here: a verification that cannot pass) leaves no partial file and
    does not touch an existing file at the destination."""
    model = _model(num_experts_per_tok=1)
    target = tmp_path / "model.pte"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        export_executorch(model, target, atol=-1.0)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pte"]
