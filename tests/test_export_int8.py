"""int8 export on real images: a tiny Mobile V-MoE trained here for a few seconds on scikit-learn's digits (real 8x8
scans shipped inside the scikit-learn wheel), quantized for ExecuTorch (PT2E + XNNPACK) and ONNX Runtime, compared
with float32 on the held-out test split: top-1, predicted class and routing decisions."""

import pytest
import torch
from conftest import tiny_config

from hf_vmoe import VMoEForImageClassification
from hf_vmoe.integrations.export import int8_expert_weights

NUM_EXPERTS = 4
SUPERCLASSES = [c % NUM_EXPERTS for c in range(10)]


@pytest.fixture(scope="module")
def digits():
    """(train_x, train_y), (test_x, test_y): the demo's stratified split of the digits, upsampled to 32 x 32."""
    pytest.importorskip("sklearn")
    from hf_vmoe.demo import load_digit_images, make_processor, stratified_split

    images, labels, _ = load_digit_images()
    pixel_values = make_processor(32)(images=images, return_tensors="pt")["pixel_values"].float().contiguous()
    train_idx, _, test_idx = stratified_split(labels, seed=0)
    labels = torch.as_tensor(labels)
    return (pixel_values[train_idx], labels[train_idx]), (pixel_values[test_idx], labels[test_idx])


@pytest.fixture(scope="module")
def trained(digits):
    """Image routing, k=1, shared router guided by super-classes (label % 4); a few seconds of training."""
    (train_x, train_y), (test_x, test_y) = digits
    torch.manual_seed(0)
    config = tiny_config(num_labels=10, num_experts=NUM_EXPERTS, superclass_ids=SUPERCLASSES)
    model = VMoEForImageClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(25):  # epochs
        for idx in torch.randperm(len(train_y), generator=generator).split(64):
            loss = model(pixel_values=train_x[idx], labels=train_y[idx]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=test_x, output_router_logits=True)
    accuracy = float((out.logits.argmax(-1) == test_y).float().mean())
    experts = out.router_logits[0].argmax(-1)
    assert accuracy > 0.75, f"the tiny model did not train (test top-1 {accuracy:.3f})"
    assert len(set(experts.tolist())) >= 3, "the router should send the test digits to several experts"
    return model, out.logits, experts


def _compare(name, logits, experts, reference_logits, reference_experts, test_y, max_drop_points=1.5):
    fp32 = float((reference_logits.argmax(-1) == test_y).float().mean())
    int8 = float((logits.argmax(-1) == test_y).float().mean())
    same_class = float((logits.argmax(-1) == reference_logits.argmax(-1)).float().mean())
    same_expert = float((experts == reference_experts).float().mean())
    print(f"{name}: top-1 fp32 {fp32:.4f} int8 {int8:.4f}; same class {same_class:.4f}; same expert {same_expert:.4f}")
    assert 100 * (fp32 - int8) <= max_drop_points, f"{name}: int8 top-1 {int8:.4f} vs float32 {fp32:.4f}"
    assert same_class >= 0.97, f"{name}: int8 predicts the float32 class for only {same_class:.3f} of the images"
    assert same_expert >= 0.97, f"{name}: int8 routes only {same_expert:.3f} of the images like float32"


def test_executorch_int8_keeps_accuracy_and_routing(trained, digits, tmp_path):
    pytest.importorskip("executorch.runtime", reason='ExecuTorch is the `executorch` extra: pip install "hf-vmoe[executorch]"')
    from hf_vmoe.integrations.export import ExecuTorchVMoE, export_executorch

    model, ref_logits, ref_experts = trained
    (train_x, _), (test_x, test_y) = digits
    fp32_path = export_executorch(model, tmp_path / "fp32.pte", with_router_logits=True)
    path = export_executorch(model, tmp_path / "int8.pte", quantize="int8", calibration=train_x[:96],
                             with_router_logits=True)
    assert path.stat().st_size < 0.6 * fp32_path.stat().st_size  # int8 weights, experts included
    runner = ExecuTorchVMoE(path)
    outs = [runner.run(x) for x in test_x.split(1)]
    logits = torch.cat([o[0] for o in outs])
    experts = torch.cat([o[1].argmax(-1) for o in outs])
    assert not torch.equal(logits, ref_logits)  # it really is a different (quantized) program
    _compare("executorch int8", logits, experts, ref_logits, ref_experts, test_y)


@pytest.mark.parametrize("quantization", ["dynamic", "static"])
def test_onnxruntime_int8_keeps_accuracy_and_routing(quantization, trained, digits, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from hf_vmoe.integrations.export import OnnxVMoE, export_onnx

    model, ref_logits, ref_experts = trained
    (train_x, _), (test_x, test_y) = digits
    fp32_path = export_onnx(model, tmp_path / "fp32.onnx", with_router_logits=True)
    path = export_onnx(model, tmp_path / "int8.onnx", quantize="int8", quantization=quantization,
                       calibration=train_x[:96], with_router_logits=True)
    assert path.stat().st_size < 0.85 * fp32_path.stat().st_size  # (tiny model: graph metadata weighs a lot)
    import onnx

    weights = onnx.load(str(path)).graph.initializer
    # the experts' (E, out, in) stacks (the exporter renames them; their per-row scales are (E, out, 1))
    stacks = [w for w in weights if len(w.dims) == 3 and w.dims[0] == NUM_EXPERTS and w.dims[2] > 1]
    assert len(stacks) == 2 * len(model.config.moe_layers)
    assert all(w.data_type == onnx.TensorProto.INT8 for w in stacks), [(w.name, w.data_type) for w in stacks]
    # onnxruntime's own weights are 7-bit: 8-bit ones saturate its int8 kernels on x86 CPUs without VNNI
    quantized = [onnx.numpy_helper.to_array(w) for w in weights
                 if w.name.endswith("_quantized") and w.data_type == onnx.TensorProto.INT8]
    assert quantized and max(int(abs(a.astype("int16")).max()) for a in quantized) <= 64
    logits, router_logits = OnnxVMoE(path).run(test_x)
    _compare(f"onnxruntime int8 ({quantization})", torch.from_numpy(logits), torch.from_numpy(router_logits).argmax(-1),
             ref_logits, ref_experts, test_y)


def test_int8_expert_weights_pass_is_weight_only_int8():
    """The fx pass swaps each gathered (E, out, in) expert stack for int8 + per-row scales and stays within half a
    quantization step of the float32 weights; the program's outputs stay close to float32."""
    torch.manual_seed(0)
    model = VMoEForImageClassification(tiny_config(num_experts_per_tok=2, shared_router=False)).eval()
    from hf_vmoe.integrations.export_utils import _ExportWrapper

    wrapper = _ExportWrapper(model, with_router_logits=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        gm = torch.export.export(wrapper, (x,)).module()
        assert int8_expert_weights(gm) == 2 * len(model.config.moe_layers)  # up and down stack per MoE block
        int8 = {k: v for k, v in gm.state_dict().items() if k.endswith("_int8")}
        assert len(int8) == 4 and all(v.dtype == torch.int8 for v in int8.values())
        assert not any(k.endswith(("experts.up_proj", "experts.down_proj")) for k in gm.state_dict())
        experts = model.vmoe.encoder.layer[-1].mlp.experts
        key = next(k for k in int8 if k.endswith(f"layer.{len(model.vmoe.encoder.layer) - 1}.mlp.experts.up_proj_int8"))
        scale = gm.state_dict()[key + "_scale"]
        dequantized = int8[key].float() * scale
        assert float((dequantized - experts.up_proj).abs().max()) <= 0.5 * float(scale.max()) + 1e-7
        expected, got = wrapper(x), gm(x)
    assert float((got - expected).abs().max()) < 0.05 * float(expected.abs().max())
