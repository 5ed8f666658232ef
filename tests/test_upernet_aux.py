"""UperNet on a VMoE backbone: the thin subclass keeps the MoE aux loss that stock UperNet drops."""

import torch
from conftest import tiny_config
from transformers import UperNetForSemanticSegmentation

from hf_vmoe.integrations.upernet import VMoEUperNetForSemanticSegmentation, vmoe_upernet_config


def test_upernet_keeps_aux_loss():
    backbone = tiny_config(routing_level="token", num_shared_experts=1, moe_layers="all", router_aux_loss_coef=0.5)
    config = vmoe_upernet_config(backbone, hidden_size=16, num_labels=3)
    assert config.backbone_config.out_indices == [1, 2, 3, 4]
    ours = VMoEUperNetForSemanticSegmentation(config).eval()
    stock = UperNetForSemanticSegmentation(config).eval()
    stock.load_state_dict(ours.state_dict())
    x, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    with torch.no_grad():
        a, b = ours(x, labels=labels), stock(x, labels=labels)
    torch.testing.assert_close(a.logits, b.logits)
    assert a.aux_loss is not None and a.aux_loss > 0
    torch.testing.assert_close(a.loss, b.loss + a.aux_loss)
    # the routers get a gradient through the loss
    ours.train()
    ours(x, labels=labels).loss.backward()
    router = ours.backbone.encoder.layer[0].mlp.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_router_logits_follow_the_backbone_config_unless_asked():
    backbone = tiny_config(routing_level="token", moe_layers=(1, 3), output_router_logits=True)
    model = VMoEUperNetForSemanticSegmentation(vmoe_upernet_config(backbone, hidden_size=16, num_labels=3)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert len(model(x).router_logits) == 2  # the backbone config's output_router_logits=True
        assert model(x, output_router_logits=False).router_logits is None


def test_dense_backbone_behaves_like_stock(tmp_path):
    backbone = tiny_config(moe_layers="none")
    config = vmoe_upernet_config(backbone, out_indices=[2, 4], hidden_size=16, num_labels=3, use_auxiliary_head=False)
    ours = VMoEUperNetForSemanticSegmentation(config).eval()
    x, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    with torch.no_grad():
        out = ours(x, labels=labels)
    assert out.aux_loss is None and out.logits.shape == (2, 3, 32, 32)
    ours.save_pretrained(tmp_path)
    stock = UperNetForSemanticSegmentation.from_pretrained(tmp_path).eval()  # same checkpoint layout
    with torch.no_grad():
        torch.testing.assert_close(stock(x, labels=labels).loss, out.loss)
