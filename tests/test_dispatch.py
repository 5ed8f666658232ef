"""Every experts dispatch path gives the same outputs and gradients as a dense reference that runs every expert on
every item and combines them with the routing weights (independent of any dispatch code):

- token routing: the `eager` loop, transformers' `grouped_mm` and `batched_mm` backends, with and without capacity;
- image routing: the grouped eager path (batch 1, one expert for the whole batch, several experts, k=2) and the
  static-shape gather path used under tracing / torch.compile / export; and image routing compiles without graph
  breaks.
"""

import pytest
import torch

from conftest import tiny_config
from hf_vmoe import VMoEForImageClassification
from hf_vmoe.modeling_vmoe import VMoEExperts, VMoESparseMoeBlock

BACKENDS = ("eager", "grouped_mm", "batched_mm")
ATOL = 2e-5


def make_experts(backend="eager", num_experts=4, **overrides):
    config = tiny_config(num_experts=num_experts, **overrides)
    config._experts_implementation = backend
    experts = VMoEExperts(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in experts.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return experts


def clone_experts(experts, backend):
    twin = make_experts(backend, num_experts=experts.num_experts)
    twin.load_state_dict(experts.state_dict())
    return twin


def reference(experts, hidden_states, top_k_index, top_k_weights):
    """Dense reference: every expert on every row, combined by a (rows, E) weight matrix. `hidden_states` is (N, H)
    with per-row routing, or (B, S, H) with per-image routing."""
    x = hidden_states if hidden_states.ndim == 3 else hidden_states[:, None]
    h = torch.einsum("bsh,eih->ebsi", x, experts.up_proj) + experts.up_proj_bias[:, None, None]
    y = torch.einsum("ebsi,ehi->ebsh", experts.act_fn(h), experts.down_proj) + experts.down_proj_bias[:, None, None]
    combine = torch.zeros(x.shape[0], experts.num_experts, dtype=x.dtype).scatter_add(1, top_k_index, top_k_weights)
    out = torch.einsum("be,ebsh->bsh", combine, y)
    return out if hidden_states.ndim == 3 else out[:, 0]


def random_routing(num_items, num_experts, top_k, seed=0, only=None):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_items, num_experts, generator=gen)
    if only is not None:  # restrict to a subset of experts (others get no item)
        mask = torch.full((num_experts,), float("-inf"))
        mask[list(only)] = 0.0
        scores = scores + mask
    weights, index = scores.softmax(-1).topk(top_k, dim=-1)
    return index, weights


def outputs_and_grads(fn, experts, hidden_states, top_k_weights):
    hidden_states = hidden_states.detach().clone().requires_grad_(True)
    top_k_weights = top_k_weights.detach().clone().requires_grad_(True)
    experts.zero_grad(set_to_none=True)
    out = fn(hidden_states, top_k_weights)
    # a non-uniform upstream gradient so a permuted or mis-scaled gradient cannot pass
    upstream = torch.linspace(-1.0, 1.0, out.numel()).view(out.shape)
    (out * upstream).sum().backward()
    grads = {name: p.grad.clone() for name, p in experts.named_parameters()}
    return out.detach(), hidden_states.grad, top_k_weights.grad, grads


def assert_same(got, want, atol=ATOL):
    out, gx, gw, gp = got
    ref_out, ref_gx, ref_gw, ref_gp = want
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=1e-5)
    torch.testing.assert_close(gx, ref_gx, atol=atol, rtol=1e-5)
    torch.testing.assert_close(gw, ref_gw, atol=atol, rtol=1e-5)
    for name in ref_gp:
        torch.testing.assert_close(gp[name], ref_gp[name], atol=atol, rtol=1e-5, msg=f"gradient of {name}")


# --------------------------------------------------------------------------------------------------------------
# Token routing
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k,only", [(1, None), (2, None), (2, (0, 3))])
def test_token_backends_match_reference(backend, top_k, only):
    experts = make_experts(backend)
    x = torch.randn(37, 32)
    index, weights = random_routing(37, 4, top_k, only=only)
    want = outputs_and_grads(lambda h, w: reference(experts, h, index, w), experts, x, weights)
    got = outputs_and_grads(lambda h, w: experts(h, index, w), experts, x, weights)
    assert_same(got, want)
    if only is not None:  # experts that got no token get an exactly zero gradient
        assert got[3]["up_proj"][1].abs().max() == 0 and got[3]["up_proj"][2].abs().max() == 0


def test_token_eager_handles_empty_input():
    experts = make_experts("eager")
    out = experts(torch.randn(0, 32), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert out.shape == (0, 32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_backends_agree_with_capacity(backend):
    """Capacity drops assignments: every backend must compute the same kept assignments as eager."""
    config = tiny_config(routing_level="token", num_experts=4, num_experts_per_tok=2, moe_layers="all",
                         eval_capacity_factor=0.5)
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    block = VMoESparseMoeBlock(config).eval()
    with torch.no_grad():
        for param in block.parameters():  # VMoEExperts allocates with torch.empty: initialise everything
            param.normal_(0, 0.3)
        block.router.weight.normal_(0, 1.0)
    x = torch.randn(3, 17, 32)
    _, routing = block.router(x)
    assert routing.keep is not None and not bool(routing.keep.all())
    want = routing.apply(block.experts, x).reshape(-1, 32)
    other = clone_experts(block.experts, backend)
    torch.testing.assert_close(routing.apply(other, x).reshape(-1, 32), want, atol=ATOL, rtol=1e-5)
    # kept assignments only: the dense reference with dropped weights zeroed
    flat = x.reshape(-1, 32)
    torch.testing.assert_close(want, reference(block.experts, flat, routing.top_k_index, routing.top_k_weights),
                               atol=ATOL, rtol=1e-5)
    dropped_rows = ~routing.keep.any(dim=1)
    assert bool(dropped_rows.any()) and want[dropped_rows].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_model_backends_same_loss_and_grads(backend):
    config = tiny_config(routing_level="token", num_experts=4, num_experts_per_tok=2, moe_layers="all")
    torch.manual_seed(0)
    model = VMoEForImageClassification(config)
    model.set_experts_implementation("eager")
    pixels = torch.randn(3, 3, 32, 32)
    labels = torch.tensor([0, 1, 4])

    def loss_and_grads(impl):
        model.set_experts_implementation(impl)
        model.zero_grad(set_to_none=True)
        out = model(pixels, labels=labels)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_logits, ref_grads = loss_and_grads("eager")
    logits, grads = loss_and_grads(backend)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=ATOL, rtol=1e-4, msg=f"gradient of {name}")


# --------------------------------------------------------------------------------------------------------------
# Image routing
# --------------------------------------------------------------------------------------------------------------

IMAGE_CASES = {
    "batch1_k1": dict(batch=1, top_k=1, only=None),
    "one_expert_for_all_k1": dict(batch=5, top_k=1, only=(2,)),
    "several_experts_k1": dict(batch=7, top_k=1, only=None),
    "several_experts_k2": dict(batch=7, top_k=2, only=None),
    "batch1_k2": dict(batch=1, top_k=2, only=None),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
@pytest.mark.parametrize("path", ["grouped", "gathered"])
def test_image_paths_match_reference(case, path):
    spec = IMAGE_CASES[case]
    experts = make_experts("eager")
    x = torch.randn(spec["batch"], 9, 32)
    index, weights = random_routing(spec["batch"], 4, spec["top_k"], seed=3, only=spec["only"])
    if spec["only"] is None and spec["batch"] > 4:
        assert len(index.unique()) > 1  # really exercises several experts
    fn = experts if path == "grouped" else experts._forward_gathered  # whole images (B, S, H), (B, k)
    want = outputs_and_grads(lambda h, w: reference(experts, h, index, w), experts, x, weights)
    got = outputs_and_grads(lambda h, w: fn(h, index, w), experts, x, weights)
    assert_same(got, want)


def test_image_grouped_and_gathered_paths_agree_exactly_enough():
    """The eager path and the tracing path used by torch.compile / export must agree tightly (k=1, B>1)."""
    experts = make_experts("eager", num_experts=6)
    x = torch.randn(11, 9, 32)
    index, weights = random_routing(11, 6, 1, seed=5)
    with torch.no_grad():
        a = experts(x, index, weights)
        b = experts._forward_gathered(x, index, weights)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_image_tracing_uses_gather_path_and_matches():
    """torch.jit.trace takes the static-shape path; the traced module gives the eager outputs for a new routing."""
    experts = make_experts("eager")
    x = torch.randn(6, 9, 32)
    index, weights = random_routing(6, 4, 1, seed=7)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = experts

        def forward(self, h, i, w):
            return self.experts(h, i, w)

    with torch.no_grad():
        traced = torch.jit.trace(Wrapper(), (x, index, weights), check_trace=False)
        index2, weights2 = random_routing(6, 4, 1, seed=8)
        torch.testing.assert_close(traced(x, index2, weights2), experts(x, index2, weights2),
                                   atol=1e-6, rtol=1e-6)


def test_image_routing_model_has_no_graph_breaks():
    torch._dynamo.reset()
    model = VMoEForImageClassification(tiny_config(num_experts=4, moe_layers="last:2")).eval()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(torch.randn(3, 3, 32, 32))
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_image_routing_compiled_matches_eager():
    """The static-shape path taken under torch.compile gives the eager model's outputs (dynamo's eager backend:
    checks the traced graph without paying for inductor)."""
    torch._dynamo.reset()
    model = VMoEForImageClassification(tiny_config(num_experts=4, moe_layers="last:2")).eval()
    x = torch.randn(5, 3, 32, 32)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [None, "eager"], ids=["default", "eager"])
def test_token_routing_default_backend_compiles_without_graph_breaks(backend):
    """The eager experts loop and the CPU default's padded path (`vmoe_cpu`) read per-expert counts on the host;
    under torch.compile both hand over to the grouped_mm path, so token routing compiles with fullgraph=True and
    gives the eager outputs."""
    torch._dynamo.reset()
    config = tiny_config(routing_level="token", num_experts=4, num_experts_per_tok=2, moe_layers="all")
    model = VMoEForImageClassification(config).eval()
    if backend is not None:
        model.set_experts_implementation(backend)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
