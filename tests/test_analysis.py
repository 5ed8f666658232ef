"""Routing analysis: a model whose routers really route by class scores 1 with a diagonal heatmap; a router
independent of the class scores ~0."""

import json

import matplotlib.image
import numpy as np
import pytest
import torch

from conftest import load_example, tiny_config
from hf_vmoe import VMoEConfig, VMoEForImageClassification, VMoEForSemanticSegmentation
from hf_vmoe.recipes.analysis import collect_routing, heatmap_order, plot_heatmap, routing_metrics

C = 4  # classes == experts


def _colours():
    return torch.tensor([[1.5, -1.0, 0.2], [-1.2, 1.4, -0.5], [0.3, 0.4, 1.8], [-1.5, -1.3, -0.9]])


def _uniform_images(noise=0.0, n_per_class=1, size=32):
    gen = torch.Generator().manual_seed(5)
    colours = _colours()
    images = colours.repeat_interleave(n_per_class, 0)[:, :, None, None].expand(-1, 3, size, size).clone()
    images += noise * torch.randn(images.shape, generator=gen)
    labels = torch.arange(C).repeat_interleave(n_per_class)
    return images, labels


def _force_router(model, router, capture_module, select, scale=40.0):
    """Set `router.weight` so that the router's input for class c's prototype image gives logits scale * e_c."""
    inputs = {}
    handle = capture_module.register_forward_pre_hook(lambda m, args: inputs.__setitem__("x", args[0].detach()))
    images, _ = _uniform_images()
    with torch.no_grad():
        model(images)
    handle.remove()
    prototypes = select(inputs["x"]).double()  # (C, H)
    weight = scale * torch.linalg.pinv(prototypes.t())  # (C, H): weight @ prototypes.T = scale * I
    with torch.no_grad():
        router.weight.copy_(weight.float())
        logits = prototypes.float() @ router.weight.t()
    assert torch.equal(logits.argmax(-1), torch.arange(C))


def _diagonal_checks(stats, layer, tmp_path):
    metrics = stats.layer_metrics(layer)
    assert metrics["specialization"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["nmi"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["class_purity"] == pytest.approx(1.0)
    assert metrics["conditional_entropy"] == pytest.approx(0.0, abs=1e-9)
    plotted = plot_heatmap(stats.counts[layer], tmp_path / "h.png")
    np.testing.assert_allclose(plotted["matrix"], np.eye(C))
    png = matplotlib.image.imread(tmp_path / "h.png")
    assert png.ndim == 3 and png.shape[0] > 100


def test_image_router_forced_by_class(tmp_path):
    config = tiny_config(routing_level="image", num_labels=C, num_experts=C, moe_layers=(2, 3), router_input="mean")
    model = VMoEForImageClassification(config).eval()
    encoder = model.vmoe.encoder
    _force_router(model, encoder.router, encoder.router, lambda x: x[:, 1:].mean(dim=1))  # mean patch token
    images, labels = _uniform_images(noise=0.05, n_per_class=6)
    perm = torch.randperm(len(labels))
    batches = [{"pixel_values": images[perm[i : i + 5]], "labels": labels[perm[i : i + 5]]} for i in range(0, 24, 5)]
    stats = collect_routing(model, batches)
    assert stats.layers == [2, 3] and stats.unit == "image" and stats.shared_router
    # the router's choices are a permutation of the classes (here the identity by construction)
    np.testing.assert_allclose(stats.counts[2], 6 * np.eye(C))
    _diagonal_checks(stats, 2, tmp_path)
    report = stats.report(tmp_path / "report")
    assert (tmp_path / "report" / "heatmap_layer2.png").exists()
    assert (tmp_path / "report" / "heatmap_layer3.png").exists()
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["recommendation"]["specialized_layers"] == [2, 3]
    assert saved["layers"]["2"]["specialization"] == pytest.approx(1.0)
    assert report["heatmaps"]["2"]["class_order"] == [0, 1, 2, 3]
    recommended = VMoEConfig.from_pretrained(tmp_path / "report" / "recommended_config")
    assert recommended.moe_layers == (2, 3) and recommended.routing_level == "image"


def test_token_router_forced_by_pixel_label(tmp_path):
    """Token routing in a segmentation model: with attention and position embeddings switched off each token depends
    only on its patch, so a router built from per-class patch prototypes routes every patch by its pixel class."""
    config = tiny_config(routing_level="token", num_labels=C, num_experts=C, moe_layers=(0, 2),
                         num_shared_experts=1)
    model = VMoEForSemanticSegmentation(config).eval()
    with torch.no_grad():
        model.vmoe.embeddings.position_embeddings.zero_()
        for layer in model.vmoe.encoder.layer:
            layer.attention.o_proj.weight.zero_()
            layer.attention.o_proj.bias.zero_()
    for idx in (0, 2):  # in order: layer 2's inputs depend on layer 0's routing
        router = model.vmoe.encoder.layer[idx].mlp.router
        _force_router(model, router, router, lambda x: x[:, 1])
    # mosaics: each 8x8 patch one class colour; pixel labels follow, some pixels ignored (255)
    gen = torch.Generator().manual_seed(0)
    colours = _colours()
    batches = []
    for _ in range(3):
        patch_classes = torch.randint(0, C, (4, 4, 4), generator=gen)  # (B, gh, gw)
        labels = patch_classes.repeat_interleave(8, 1).repeat_interleave(8, 2)  # (B, 32, 32)
        pixels = colours[labels].permute(0, 3, 1, 2).contiguous()
        labels = labels.clone()
        labels[:, ::8, ::8] = 255  # a minority of ignored pixels does not change the majority
        batches.append({"pixel_values": pixels, "labels": labels})
    for mode in ("majority", "nearest"):
        stats = collect_routing(model, batches, patch_label=mode)
        assert stats.unit == "token" and not stats.shared_router
        assert stats.counts[0].sum() == 3 * 4 * 16  # patch tokens only
        np.testing.assert_allclose(np.diag(np.diag(stats.counts[0])), stats.counts[0])
        _diagonal_checks(stats, 0, tmp_path)
        _diagonal_checks(stats, 2, tmp_path)
    # labels at another resolution are resized (nearest) to the pixel grid
    small = [{"pixel_values": b["pixel_values"], "labels": b["labels"][:, ::2, ::2]} for b in batches]
    assert collect_routing(model, small).layer_metrics(0)["specialization"] > 0.9


def test_router_independent_of_class_scores_near_zero(tmp_path):
    config = tiny_config(routing_level="token", num_labels=C, num_experts=C, moe_layers=(1, 3),
                         num_experts_per_tok=2)
    model = VMoEForImageClassification(config)
    with torch.no_grad():  # a router with clear preferences, but not driven by the (random) labels
        for idx in (1, 3):
            model.vmoe.encoder.layer[idx].mlp.router.weight.normal_(0, 1.0)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, C, (16,), generator=gen))
               for _ in range(4)]
    stats = collect_routing(model, batches)
    for layer in (1, 3):
        metrics = stats.layer_metrics(layer)
        assert metrics["num_items"] == pytest.approx(64 * 16)  # k=2 assignments count 1/2 each
        assert metrics["specialization"] < 0.05
        assert metrics["nmi"] < 0.05
        assert metrics["load_entropy"] > 0.5
        assert 0 <= metrics["router_entropy"] <= 1
    rec = stats.recommend()
    assert rec["specialized_layers"] == [] and rec["dense_candidates"] == [1, 3]
    stats.report(tmp_path)
    assert VMoEConfig.from_pretrained(tmp_path / "recommended_config").moe_layers == ()


def test_metrics_and_order_units():
    perm = np.eye(3)[[2, 0, 1]] * 10  # class 0 -> expert 2, class 1 -> expert 0, class 2 -> expert 1
    assert routing_metrics(perm)["specialization"] == pytest.approx(1.0)
    assert heatmap_order(perm).tolist() == [1, 2, 0]
    independent = np.outer([1, 2, 3], [4, 1, 1])
    m = routing_metrics(independent)
    assert m["specialization"] == pytest.approx(0.0, abs=1e-12) and m["nmi"] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(m["expert_load"], [4 / 6, 1 / 6, 1 / 6])
    # more classes than experts, class decides expert: specialisation 1, NMI below 1
    many = np.array([[5, 0], [5, 0], [0, 5], [0, 5]])
    assert routing_metrics(many)["specialization"] == pytest.approx(1.0)
    assert routing_metrics(many)["nmi"] < 1.0
    assert heatmap_order(np.array([[0, 0], [1, 3]])).tolist() == [1]  # unseen classes are left out
    with pytest.raises(ValueError, match="all zero"):
        routing_metrics(np.zeros((2, 2)))


def test_errors():
    dense = VMoEForImageClassification(tiny_config(moe_layers="none"))
    with pytest.raises(ValueError, match="no MoE layers"):
        collect_routing(dense, [])
    model = VMoEForImageClassification(tiny_config(routing_level="token"))
    with pytest.raises(ValueError, match="patch_label"):
        collect_routing(model, [], patch_label="mode")


def test_analyze_routing_example(tmp_path):
    from PIL import Image

    from test_segmentation_example import make_ade_folder

    script = load_example("analyze_routing")
    # classification on an imagefolder
    model = VMoEForImageClassification(tiny_config(routing_level="image", num_labels=2, num_experts=2,
                                                   id2label={0: "cat", 1: "dog"}))
    model.save_pretrained(tmp_path / "cls")
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(tmp_path / "images" / name / f"{i}.jpg")
    report = script.main([str(tmp_path / "cls"), "--data_dir", str(tmp_path / "images"), "--output_dir",
                          str(tmp_path / "r1"), "--batch_size", "4"])
    assert report["unit"] == "image" and report["class_names"] == ["cat", "dog"]
    assert sum(map(sum, report["counts"]["2"])) == 6
    assert (tmp_path / "r1" / "heatmap_layer3.png").exists()
    # segmentation on an ADE20K-layout folder
    seg = VMoEForSemanticSegmentation(tiny_config(routing_level="token", num_labels=150, num_shared_experts=1))
    seg.save_pretrained(tmp_path / "seg")
    data = make_ade_folder(tmp_path, n_train=1, n_val=3)
    report = script.main([str(tmp_path / "seg"), "--data_dir", str(data), "--reduce_labels", "--output_dir",
                          str(tmp_path / "r2")])
    assert report["unit"] == "token" and report["layers"]["3"]["num_classes_seen"] >= 2
    assert json.loads((tmp_path / "r2" / "report.json").read_text())["recommendation"]["threshold"] == 0.2


def test_analyze_routing_normalises_like_the_checkpoint_processor(tmp_path):
    from hf_vmoe import VMoEImageProcessor
    from hf_vmoe.integrations.data import IMAGENET_MEAN, IMAGENET_STD

    script = load_example("analyze_routing")
    assert script.normalisation(tmp_path) == (IMAGENET_MEAN, IMAGENET_STD)  # no processor saved: ImageNet
    VMoEImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]).save_pretrained(tmp_path)
    assert script.normalisation(tmp_path) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
