"""VMoEBackbone feature maps and transformers' UperNet on top of it."""

import pytest
import torch
from conftest import tiny_config
from transformers import AutoBackbone, UperNetConfig, UperNetForSemanticSegmentation

from hf_vmoe import VMoEBackbone, VMoEConfig, VMoEModel


def upernet_config(**overrides):
    backbone = tiny_config(out_indices=[1, 2, 3, 4], **overrides)
    return UperNetConfig(backbone_config=backbone, num_labels=5, hidden_size=16, auxiliary_in_channels=32,
                         auxiliary_channels=16, use_auxiliary_head=True)


@pytest.mark.parametrize("routing_level", ["image", "token"])
def test_backbone_feature_maps_match_the_base_model(routing_level):
    config = tiny_config(routing_level=routing_level, out_features=["stem", "stage2", "stage4"])
    backbone = VMoEBackbone(config).eval()
    base = VMoEModel(config).eval()
    base.load_state_dict(backbone.state_dict())
    x = torch.randn(2, 3, 32, 32)
    out = backbone(x, output_hidden_states=True, output_router_logits=True)
    assert backbone.channels == [32, 32, 32]
    assert [tuple(f.shape) for f in out.feature_maps] == [(2, 32, 4, 4)] * 3
    hidden = base(x, output_hidden_states=True).hidden_states
    for feature, stage in zip(out.feature_maps, (0, 2, 4)):
        expected = backbone.layernorm(hidden[stage])[:, 1:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2)
        torch.testing.assert_close(feature, expected)
    assert len(out.hidden_states) == 5
    assert out.aux_loss is not None and out.aux_loss > 0
    assert len(out.router_logits) == (1 if routing_level == "image" else 2)
    # interpolated positions: feature maps follow the input size
    maps = backbone(torch.randn(1, 3, 48, 64), interpolate_pos_encoding=True).feature_maps
    assert maps[-1].shape == (1, 32, 6, 8)
    # without reshaping: token sequences
    config.reshape_hidden_states = False
    assert VMoEBackbone(config).eval()(x).feature_maps[0].shape == (2, 17, 32)


@pytest.mark.parametrize("routing_level", ["image", "token"])
def test_upernet_builds_runs_and_trains_on_the_backbone(routing_level):
    config = upernet_config(routing_level=routing_level, num_shared_experts=1)
    model = UperNetForSemanticSegmentation(config).train()
    assert type(model.backbone) is VMoEBackbone
    assert model.backbone.channels == [32] * 4
    x = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 5, (2, 32, 32))
    labels[:, :2] = 255
    # stock UperNet drops the backbone's routing aux loss: capture it with a forward hook and add it
    captured = {}
    model.backbone.register_forward_hook(lambda module, args, output: captured.update(aux=output.aux_loss))
    out = model(x, labels=labels)
    assert out.logits.shape == (2, 5, 32, 32)
    loss = out.loss + captured["aux"]
    loss.backward()
    routers = [m for n, m in model.backbone.named_modules() if n.endswith("router")]
    assert routers and all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in routers)
    ups = [m.experts.up_proj for m in model.backbone.modules() if hasattr(m, "experts")]
    assert all(p.grad.abs().sum() > 0 for p in ups)


def test_upernet_save_load_identical(tmp_path):
    model = UperNetForSemanticSegmentation(upernet_config()).eval()
    model.save_pretrained(tmp_path)
    loaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.config.backbone_config, VMoEConfig)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model(x).logits, loaded(x).logits)
    round_trip = UperNetConfig.from_dict(model.config.to_dict())
    assert round_trip.backbone_config.to_dict() == model.config.backbone_config.to_dict()


def test_auto_backbone_from_config():
    backbone = AutoBackbone.from_config(tiny_config(out_indices=[4]))
    assert type(backbone) is VMoEBackbone and backbone.out_features == ["stage4"]
