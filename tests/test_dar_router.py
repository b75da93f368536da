"""diffkern.nn.DARRouter: the full and chunked schedules against a plain oracle written from the spec."""
import pytest
import torch

from diffkern.dar.reference import dar_route_reference
from diffkern.nn import DARRouter

B, T, d, COND = 2, 3, 8, 5


def oracle_sources(x0, outs, l, S, rule, final=False):
    """Sources of sublayer l (the final aggregate after l sublayers if `final`) by the spec's definitions."""
    if S is None:
        return [x0, *outs[:l]]
    j = (l - 1) // S if final else l // S
    summaries = [x0] + [sum(outs[k * S:(k + 1) * S]) if rule == "sum" else outs[(k + 1) * S - 1] for k in range(j)]
    return summaries + outs[j * S:l]


def make_router(L, S, query, rule, dtype=torch.float64, seed=0):
    router = DARRouter(d, L, chunk_size=S, query=query, cond_dim=COND, summary=rule).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move off the uniform initialisation so routing weights matter
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * (0.3 if p.dim() > 1 else 1.0) + (p == 1))
    return router


def router_inputs(router, g):
    """x0 [B, T, d] and cond [B, COND] in float64 requiring grad, and the list of everything differentiated."""
    x0 = torch.randn(B, T, d, generator=g, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(B, COND, generator=g, dtype=torch.float64, requires_grad=True)
    return x0, cond, [x0, cond, *router.parameters()]


def assert_same_grads(got, want, inputs, dy, rtol, atol):
    """got and want give each input the same gradient, and leave the same inputs unreached."""
    for a, b in zip(torch.autograd.grad(got, inputs, dy, allow_unused=True),
                    torch.autograd.grad(want, inputs, dy, allow_unused=True)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def oracle_q(router, p, last, cond):
    if router.query == "dynamic":
        return last @ router.query_proj[p].weight.T
    if router.query == "static":
        return router.query_weight[p]
    e = router.time_embed[p]
    return router.query_weight[p] + cond @ e.weight.T + e.bias


def run(router, x0, weights, cond, oracle=False):
    """Routes L toy sublayers out_l = tanh(h_l W_l) through the router (or the oracle); returns the final aggregate."""
    L, S, rule = router.n_sublayers, router.chunk_size, router.summary
    hist = router.begin(x0)
    outs = []
    for l in range(L + 1):
        if oracle:
            q = oracle_q(router, l, outs[-1] if outs else x0, cond)
            h = dar_route_reference(oracle_sources(x0, outs, l, S, rule, l == L), q, router.gain[l], router.eps)
        else:
            h = router.final(hist, cond) if l == L else router(hist, l, cond)
        if l == L:
            return h
        outs.append(torch.tanh(h @ weights[l]))
        hist.append(outs[-1])


@pytest.mark.parametrize("rule", ("sum", "last"))
@pytest.mark.parametrize("L,S", ((7, 3), (8, 4), (5, 1), (3, 4), (6, None), (9, 2)))
@pytest.mark.parametrize("query", ("static", "timestep", "dynamic"))
def test_router_matches_spec_schedule_forward_and_backward(query, L, S, rule):
    router = make_router(L, S, query, rule)
    g = torch.Generator().manual_seed(1)
    x0, cond, inputs = router_inputs(router, g)
    weights = torch.randn(L, d, d, generator=g, dtype=torch.float64) / d**0.5
    got = run(router, x0, weights, cond)
    want = run(router, x0, weights, cond, oracle=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    dy = torch.randn(got.shape, generator=g, dtype=torch.float64)
    assert_same_grads(got, want, inputs, dy, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("query", ("static", "timestep", "dynamic"))
def test_router_starts_uniform(query):
    """At initialisation every routing weight is 1/n: h is the mean of the sources."""
    L, S = 6, 4
    router = DARRouter(d, L, chunk_size=S, query=query, cond_dim=COND).double()
    x0 = torch.randn(B, T, d, dtype=torch.float64)
    cond = torch.randn(B, COND, dtype=torch.float64)
    hist = router.begin(x0)
    outs = []
    for l in range(L):
        h = router(hist, l, cond)
        torch.testing.assert_close(h, torch.stack(oracle_sources(x0, outs, l, S, "sum")).mean(0))
        outs.append(torch.randn(B, T, d, dtype=torch.float64))
        hist.append(outs[-1])
    torch.testing.assert_close(router.final(hist, cond), torch.stack(oracle_sources(x0, outs, L, S, "sum", True)).mean(0))


def test_chunk_of_one_is_the_full_scheme():
    L = 5
    full, s1 = make_router(L, None, "static", "sum"), make_router(L, 1, "static", "sum")
    x0 = torch.randn(B, T, d, dtype=torch.float64)
    weights = torch.randn(L, d, d, dtype=torch.float64) / d**0.5
    torch.testing.assert_close(run(full, x0, weights, None), run(s1, x0, weights, None))


def test_sources_per_op_at_sitxl_depth():
    """56 sublayers, S=4: at most 18 sources per op (14 summaries + 4 raw outputs at the final aggregate)."""
    seen = []
    router = DARRouter(4, 56, chunk_size=4)
    router._route = lambda p, hist, sources, addends, cond: seen.append(len(sources) + bool(addends)) or (hist.x0, None)
    hist = router.begin(torch.zeros(1, 1, 4))
    for l in range(56):
        router(hist, l)
        hist.append(torch.zeros(1, 1, 4))
    router.final(hist)
    assert max(seen) == 18 and seen[-1] == 18 and len(seen) == 57


@pytest.mark.parametrize("kwargs,match", (
    (dict(query="key"), "query must be one of"),
    (dict(summary="mean"), "summary must be one of"),
    (dict(chunk_size=0), "chunk_size must be"),
    (dict(query="timestep"), "needs cond_dim"),
))
def test_router_rejects_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DARRouter(8, 4, **kwargs)


def test_router_rejects_out_of_order_calls_and_bad_shapes():
    router = DARRouter(d, 4, query="timestep", cond_dim=COND)
    with pytest.raises(ValueError, match="x0 must have d=8"):
        router.begin(torch.zeros(B, T, d + 1))
    hist = router.begin(torch.zeros(B, T, d))
    with pytest.raises(ValueError, match="needs the outputs of sublayers 0..1"):
        router(hist, 2, torch.zeros(B, COND))
    with pytest.raises(ValueError, match=r"needs cond \[B, 5\]"):
        router(hist, 0)
    with pytest.raises(ValueError, match="sublayer output 0 has shape"):
        hist.append(torch.zeros(B, T + 1, d))
    with pytest.raises(ValueError, match="needs all 4 sublayer outputs"):
        router.final(hist, torch.zeros(B, COND))
    with pytest.raises(ValueError, match=r"sublayer index must be in \[0, 4\)"):
        router(hist, 4, torch.zeros(B, COND))


@pytest.mark.parametrize("S", (None, 2))
def test_bench_stack_matches_its_eager_reference(S):
    """The dar_stack benchmark's two candidates compute the same thing (forward and gradients)."""
    from diffkern.bench.dar_stack import STACK, reference_stack, routed_stack
    case = next(c for c in STACK.quick_cases if c.params["S"] == S)
    x0, q, gain, S = STACK.make_args(case, torch.float64, "cpu")
    inputs = [x.requires_grad_() for x in (x0, q, gain)]
    got, want = routed_stack(*inputs, S), reference_stack(*inputs, S)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad(got.sum(), inputs), torch.autograd.grad(want.sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
