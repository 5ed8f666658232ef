"""Auxiliary-loss-free load balancing (`router_bias_update_rate`): a selection-only bias per expert, moved after each
optimizer step towards balance by `update_router_biases` (`RouterBiasUpdateCallback` in the Trainer)."""

import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_config
from transformers import Trainer, TrainingArguments

from hf_vmoe import VMoEForImageClassification, update_router_biases
from hf_vmoe.integrations.callbacks import RouterBiasUpdateCallback
from hf_vmoe.modeling_vmoe import VMoETopKRouter

LEVELS = {"image": dict(routing_level="image"), "token": dict(routing_level="token")}
RATE = 0.01
STEPS = 100  # the forced collapse below is balanced (max / mean load < 1.5) within this many updates


def routers(model):
    return [m for m in model.modules() if isinstance(m, VMoETopKRouter)]


def load_ratio(expert_counts: torch.Tensor) -> float:
    """The worst router call's busiest expert, in multiples of a balanced share."""
    counts = expert_counts.float()
    return (counts.max(dim=-1).values / counts.mean(dim=-1)).max().item()


def collapsed_model(level: str, rate: float = RATE) -> VMoEForImageClassification:
    """A model whose routers send (nearly) every input to expert 0: every token carries a common component `u`
    (the patch embedding's bias) and router row 0 reads it (+3 on the logit); the other rows read the inputs'
    differences (std 0.3), so inputs differ in their second choices, as a trained router's do."""
    torch.manual_seed(0)
    model = VMoEForImageClassification(tiny_config(**LEVELS[level], router_bias_update_rate=rate, moe_layers=(2, 3)))
    u = torch.randn(model.config.hidden_size)
    u = 3 * u / u.norm()
    with torch.no_grad():
        model.vmoe.embeddings.patch_embeddings.projection.weight.normal_(0, 0.2)
        model.vmoe.embeddings.patch_embeddings.projection.bias.copy_(u)
        for router in routers(model):
            router.weight.normal_(0, 0.3)
            router.weight[0] += 3 * u / u.norm() ** 2
    return model.train()


def batch(n=32):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 5, (n,), generator=generator)


@pytest.mark.parametrize("level", LEVELS)
def test_forced_collapse_is_rebalanced(level):
    model, (x, y) = collapsed_model(level), batch()
    with torch.no_grad():
        start = model(x, labels=y).expert_counts
        assert load_ratio(start) > 2.0, start  # collapsed: expert 0 over twice a balanced share (HEALTH_THRESHOLDS)
        for _ in range(STEPS):
            counts = model(x, labels=y).expert_counts
            assert update_router_biases(model)
        assert load_ratio(counts) < 1.5, counts
        # without the updates the same model stays collapsed
        control = collapsed_model(level)
        assert torch.equal(control(x, labels=y).expert_counts, start)


def test_bias_selects_but_does_not_weight():
    model, (x, y) = collapsed_model("token"), batch(4)
    router = routers(model)[0]
    router.e_score_correction_bias.copy_(torch.tensor([-1.0, 0.5, 0.0, 0.2]))
    plans = []
    router.register_forward_hook(lambda module, args, out: plans.append(out))
    model(x, labels=y)
    logits, plan = plans[0]
    probs = logits.softmax(dim=-1)
    index = (probs + router.e_score_correction_bias).argmax(dim=-1, keepdim=True)
    assert torch.equal(plan.top_k_index, index)
    assert not torch.equal(index, probs.argmax(dim=-1, keepdim=True))  # the bias changed some choices
    torch.testing.assert_close(plan.top_k_weights, probs.gather(1, index), rtol=0, atol=0)


def test_loads_add_up_over_micro_batches_and_only_in_training():
    model, (x, y) = collapsed_model("image"), batch(8)
    router = routers(model)[0]
    first = model(x[:4], labels=y[:4]).expert_counts[0]
    second = model(x[4:], labels=y[4:]).expert_counts[0]
    assert torch.equal(router.load, (first + second).float())  # two micro-batches, one update
    before = router.e_score_correction_bias.clone()
    update_router_biases(model)
    assert router.load is None
    assert torch.equal(router.e_score_correction_bias - before, RATE * torch.sign((first + second).float().mean()
                                                                                  - (first + second).float()))
    model.eval()
    with torch.no_grad():
        model(x, labels=y)
    assert router.load is None  # eval forwards record nothing
    moved = router.e_score_correction_bias.clone()
    assert not update_router_biases(model)
    assert torch.equal(router.e_score_correction_bias, moved)


def test_activation_checkpointing_recompute_is_not_counted():
    model, (x, y) = collapsed_model("token"), batch(4)
    model.activation_checkpointing_enable()
    out = model(x, labels=y)
    out.loss.backward()  # re-runs each block's forward
    for router, counts in zip(routers(model), out.expert_counts):
        assert torch.equal(router.load, counts.float())


def test_bias_round_trips_and_routes_one_image_like_a_batch(tmp_path):
    model, (x, _) = collapsed_model("image"), batch(6)
    routers(model)[0].e_score_correction_bias.copy_(torch.tensor([-0.5, 0.3, 0.1, 0.2]))
    model.save_pretrained(tmp_path)
    loaded = VMoEForImageClassification.from_pretrained(tmp_path).eval()
    assert torch.equal(routers(loaded)[0].e_score_correction_bias, routers(model)[0].e_score_correction_bias)
    model.eval()
    with torch.no_grad():
        batched = loaded(x, output_router_logits=True)
        torch.testing.assert_close(batched.logits, model(x).logits, rtol=0, atol=0)
        for i in range(len(x)):  # batch 1 takes the host-side plan, which must apply the bias too
            one = loaded(x[i:i + 1])
            torch.testing.assert_close(one.logits, batched.logits[i:i + 1], rtol=1e-5, atol=1e-6)


def test_off_by_default_adds_no_state():
    model = VMoEForImageClassification(tiny_config())
    assert not any("e_score_correction_bias" in k for k in model.state_dict())
    assert not update_router_biases(model)


@pytest.mark.parametrize("bad", [dict(router_bias_update_rate=-0.1),
                                 dict(router_bias_update_rate=0.1, routing_level="token", router_type="soft")])
def test_bad_rate_is_refused(bad):
    with pytest.raises(ValueError, match="router_bias_update_rate"):
        tiny_config(**bad)


class _Images(torch.utils.data.Dataset):
    def __init__(self, n=32):
        self.x, self.y = batch(n)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def test_trainer_callback_moves_the_bias_once_per_optimizer_step(tmp_path):
    model = collapsed_model("image")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_steps=6, learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=100, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Images())
    trainer.add_callback(RouterBiasUpdateCallback())
    trainer.train()
    bias = routers(model)[0].e_score_correction_bias
    steps = bias / RATE  # each update moves each expert by -1, 0 or +1 rate
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
    assert 0 < steps.abs().max() <= 6
    assert bias[0] < 0  # the busy expert was pushed down


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, port, queue):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = VMoEForImageClassification(tiny_config(router_bias_update_rate=RATE))
        router = routers(model)[0]
        # rank 0 saw expert 0 busy, rank 1 expert 3: only the sum over processes is balanced except for expert 1/2
        router.record_load(torch.tensor([6.0, 0.0, 0.0, 2.0]) if rank == 0 else torch.tensor([2.0, 0.0, 0.0, 6.0]))
        update_router_biases(model)
        queue.put((rank, router.e_score_correction_bias.tolist()))
    finally:
        torch.distributed.destroy_process_group()


def test_loads_are_summed_over_processes():
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results[0] == results[1]  # every rank holds the same bias
    # summed loads [8, 0, 0, 8], mean 4: experts 0 and 3 down, 1 and 2 up
    assert results[0] == pytest.approx([-RATE, RATE, RATE, -RATE])


def test_balancing_can_be_switched_on_for_a_model_saved_without_it(tmp_path, caplog):
    plain = VMoEForImageClassification(tiny_config())
    plain.save_pretrained(tmp_path / "plain")
    model = VMoEForImageClassification.from_pretrained(tmp_path / "plain", router_bias_update_rate=RATE)
    assert torch.equal(routers(model)[0].e_score_correction_bias, torch.zeros(4))  # starts unbiased
    balanced = collapsed_model("image")
    routers(balanced)[0].e_score_correction_bias.fill_(0.5)
    balanced.save_pretrained(tmp_path / "balanced")
    with caplog.at_level("WARNING"):
        VMoEForImageClassification.from_pretrained(tmp_path / "balanced", router_bias_update_rate=0.0)
    assert "selection biases are dropped" in caplog.text


def test_bias_stays_float32_when_the_model_is_cast():
    model = collapsed_model("image").to(torch.bfloat16)
    bias = routers(model)[0].e_score_correction_bias
    assert bias.dtype == torch.float32
    bias.fill_(0.5)
    routers(model)[0].record_load(torch.tensor([4.0, 0.0, 0.0, 0.0]))
    update_router_biases(model)
    assert bias[1].item() == pytest.approx(0.5 + RATE)  # bfloat16 would have rounded the step away


def test_one_image_on_the_host_picks_what_torch_picks_near_ties():
    """Batch-1 CPU inference plans on the host (no grad); with grad on, the same forward selects with torch. With a
    bias that makes an image's best two scores (nearly) tie, both must choose the same expert."""
    model = collapsed_model("image").eval()
    router = routers(model)[0]
    seen = []
    router.register_forward_hook(lambda module, args, out: seen.append(out[1].top_k_index.item()))
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        x = torch.randn(1, 3, 32, 32, generator=generator)
        router.e_score_correction_bias.zero_()
        with torch.no_grad():
            probs = model.vmoe(x, output_router_logits=True).router_logits[0].softmax(-1)[0]
        first, second = probs.topk(2).indices.tolist()
        router.e_score_correction_bias[second] = (probs[first] - probs[second]).item()
        seen.clear()
        with torch.no_grad():
            model(x)  # the host-side plan
        with torch.enable_grad():
            model(x)  # torch.topk of the same float32 scores
        assert seen[0] == seen[1]


def test_superclass_forcing_and_balancing_are_refused_together():
    with pytest.raises(ValueError, match="drift without balancing"):
        tiny_config(router_bias_update_rate=RATE, superclass_ids=[0, 1, 2, 3, 0], train_routing="superclass")


def test_a_registered_top_k_router_can_balance_and_another_router_is_refused():
    from hf_vmoe.configuration_vmoe import ROUTER_LEVELS
    from hf_vmoe.modeling_vmoe import ROUTER_CLASSES, VMoERouter, register_router

    class MyTopK(VMoETopKRouter):
        pass

    class NotTopK(VMoERouter):
        pass

    try:
        register_router("my_top_k", MyTopK, routing_levels=("image", "token"))
        register_router("not_top_k", NotTopK)
        model = VMoEForImageClassification(tiny_config(router_type="my_top_k", router_bias_update_rate=RATE))
        assert routers(model)[0].e_score_correction_bias is not None
        config = tiny_config(router_type="not_top_k", routing_level="token", router_bias_update_rate=RATE)
        with pytest.raises(ValueError, match="not_top_k.*NotTopK.*set it to 0"):
            VMoEForImageClassification(config)
    finally:
        for name in ("my_top_k", "not_top_k"):
            ROUTER_CLASSES.pop(name, None)
            ROUTER_LEVELS.pop(name, None)
