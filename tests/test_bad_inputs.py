"""Every bad input and the error it raises. The table below is the documentation (see the README (Core model)).

Decisions:
- float64 / float16 / bfloat16 pixel values are cast to the model's dtype (as transformers' ViT does).
- integer pixel values (e.g. raw uint8 images) raise: the model expects normalised floats from the image processor.
- NaN or inf in pixel values raise (outside torch.compile / tracing / export, where the check is skipped): a NaN
  image would be routed to an arbitrary expert and every output would silently be NaN.
- classification labels must be in [0, num_labels) or -100 (ignored, as in transformers); small integer dtypes
  (uint8, int16) are accepted and cast to long.
- segmentation labels must be integers in [0, num_labels) or 255 (ignored).
"""

import pytest
import torch
from conftest import tiny_config

from hf_vmoe import VMoEBackbone, VMoEForImageClassification, VMoEForSemanticSegmentation, VMoEModel


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    config = tiny_config(routing_level="token")
    return {
        "cls": VMoEForImageClassification(config).eval(),
        "seg": VMoEForSemanticSegmentation(config).eval(),
        "base": VMoEModel(tiny_config()).eval(),
        "backbone": VMoEBackbone(tiny_config()).eval(),
    }


def good(batch=2, size=32):
    return torch.randn(batch, 3, size, size)


def nan_pixels():
    x = good()
    x[1, 0, 3, 3] = float("nan")
    x[0, 2, 0, 0] = float("inf")
    return x


# (case id, model key, call kwargs, expected message fragment)
BAD_PIXELS = [
    ("missing", dict(pixel_values=None), "pixel_values is required"),
    ("not-a-tensor", dict(pixel_values=[[1.0]]), "pixel_values must be a torch.Tensor, got list"),
    ("3d", dict(pixel_values=torch.randn(3, 32, 32)),
     "pixel_values must be 4D (batch, 3, height, width), got shape (3, 32, 32)"),
    ("5d", dict(pixel_values=torch.randn(1, 2, 3, 32, 32)), "must be 4D (batch, 3, height, width), got shape (1, 2, 3, 32, 32)"),
    ("channels-last", dict(pixel_values=torch.randn(2, 32, 32, 3)),
     "pixel_values has 32 channels but the model expects 3: expected shape (batch, 3, height, width), got (2, 32, 32, 3)"),
    ("grayscale", dict(pixel_values=torch.randn(2, 1, 32, 32)), "pixel_values has 1 channels but the model expects 3"),
    ("empty-batch", dict(pixel_values=torch.randn(0, 3, 32, 32)), "pixel_values is an empty batch: shape (0, 3, 32, 32)"),
    ("uint8", dict(pixel_values=torch.zeros(2, 3, 32, 32, dtype=torch.uint8)),
     "pixel_values must be a floating-point tensor (normalised pixels), got dtype torch.uint8"),
    ("int64", dict(pixel_values=torch.zeros(2, 3, 32, 32, dtype=torch.long)), "got dtype torch.int64"),
    ("nan-inf", dict(pixel_values=nan_pixels()), "pixel_values contains 2 NaN or infinite values (of 6144)"),
    ("wrong-size", dict(pixel_values=good(size=48)),
     "Input image size (48x48) doesn't match the model (32x32); pass interpolate_pos_encoding=True"),
    ("not-divisible", dict(pixel_values=torch.randn(2, 3, 36, 40), interpolate_pos_encoding=True),
     "Input image size (36x40) must be divisible by the patch size 8x8"),
]


@pytest.mark.parametrize("model_key", ["cls", "seg", "base", "backbone"])
@pytest.mark.parametrize("kwargs, message", [c[1:] for c in BAD_PIXELS], ids=[c[0] for c in BAD_PIXELS])
def test_bad_pixel_values(models, model_key, kwargs, message):
    with pytest.raises(ValueError) as err:
        models[model_key](**kwargs)
    assert message in str(err.value)


BAD_LABELS = [
    ("cls-too-big", "cls", torch.tensor([0, 5]), "labels must be in [0, num_labels=5) (or -100 to ignore), got 5"),
    ("cls-negative", "cls", torch.tensor([-1, 0]), "got -1"),
    ("cls-batch", "cls", torch.tensor([0, 1, 2]), "labels have shape (3,) but pixel_values has batch size 2"),
    ("seg-out-of-range", "seg", torch.full((2, 32, 32), 7),
     "segmentation labels must be in [0, num_labels=5) or 255 (ignore), got 7"),
    ("seg-negative", "seg", torch.full((2, 32, 32), -1), "got -1"),
    ("seg-float", "seg", torch.zeros(2, 32, 32), "segmentation labels must be integers, got dtype torch.float32"),
    ("seg-2d", "seg", torch.zeros(32, 32, dtype=torch.long),
     "segmentation labels must be (batch, height, width), got shape (32, 32)"),
    ("seg-batch", "seg", torch.zeros(3, 32, 32, dtype=torch.long),
     "segmentation labels have batch size 3 but pixel_values has 2"),
]


@pytest.mark.parametrize("model_key, labels, message", [c[1:] for c in BAD_LABELS], ids=[c[0] for c in BAD_LABELS])
def test_bad_labels(models, model_key, labels, message):
    with pytest.raises(ValueError) as err:
        models[model_key](good(), labels=labels)
    assert message in str(err.value)


def test_float_pixel_dtypes_are_cast_like_vit(models):
    x = good()
    for key in ("cls", "seg"):
        ref = models[key](x).logits
        for dtype in (torch.float64, torch.float16, torch.bfloat16):
            out = models[key](x.to(dtype)).logits
            assert out.dtype == torch.float32
            tol = 1e-5 if dtype == torch.float64 else 0.1
            torch.testing.assert_close(out, models[key](x.to(dtype).float()).logits, rtol=tol, atol=tol)
        torch.testing.assert_close(models[key](x.double()).logits, ref)


def test_accepted_label_conventions(models):
    x = good()
    # -100 is ignored in classification, as in transformers' cross-entropy
    out = models["cls"](x, labels=torch.tensor([-100, 2]))
    only = models["cls"](x[1:], labels=torch.tensor([2]))
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss - out.aux_loss, only.loss - only.aux_loss, rtol=1e-5, atol=1e-6)
    # small integer label dtypes are cast
    torch.testing.assert_close(models["cls"](x, labels=torch.tensor([1, 2], dtype=torch.uint8)).loss,
                               models["cls"](x, labels=torch.tensor([1, 2])).loss)
    # 255 is ignored in segmentation; uint8 masks work
    labels = torch.randint(0, 5, (2, 32, 32))
    labels[:, :8] = 255
    a = models["seg"](x, labels=labels).loss
    b = models["seg"](x, labels=labels.to(torch.uint8)).loss
    assert torch.isfinite(a) and torch.equal(a, b)
    # an all-ignored mask gives a NaN task loss in torch's cross-entropy (0/0), as in transformers' heads
    assert torch.isnan(models["seg"](x, labels=torch.full((2, 32, 32), 255)).loss)


def test_nan_check_is_skipped_under_compilation(models, monkeypatch):
    """The NaN check is data-dependent (a graph break / export failure), so it is skipped while compiling,
    tracing or exporting; the NaN then propagates to the outputs."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    out = models["cls"](nan_pixels()).logits
    assert torch.isnan(out).any()
