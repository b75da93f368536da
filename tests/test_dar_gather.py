"""DAR chunked residual gathering (diffkern.dar.dar_gather): every backend against the float64 reference."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

from diffkern.dar import dar_gather, reference
from diffkern.dar.reference import dar_gather_reference
from diffkern.testing.backends import backends_under_test, device_for, forced, supports
from diffkern.testing.numerics import assert_close_to_oracle, oracle_with_spread

from test_dar_route import Q_VARIANTS, fan_in, make_inputs, on_cpu, randn_like, route_bwd_oracle, strided_views

BACKENDS = backends_under_test("dar_gather_fwd")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# (B, T, d, n sources, k addends): one element, odd sizes past a token tile, d past a power of two,
# a chunk of 4 beside many summaries, no addends (the final aggregator), one addend.
SHAPES = ((1, 1, 1, 1, 2), (2, 5, 40, 2, 3), (1, 17, 130, 3, 4), (2, 3, 16, 14, 4), (2, 3, 37, 3, 0), (1, 2, 9, 1, 1))


def gather_inputs(B, T, d, n, k, dtype, variant, param_dtype=None, device="cpu"):
    """n sources and k addends with uneven scales, q and gain: leaf tensors."""
    sources, q, gain = make_inputs(B, T, d, n + k, dtype, variant, param_dtype, device=device)
    return sources[:n], sources[n:], q, gain


def gather_oracle(sources, addends, q, gain):
    """([h, c], spreads): the float64 reference and its error-model spreads (diffkern.testing.numerics)."""
    return oracle_with_spread(dar_gather_reference, [sources, addends, q, gain], fan_in([*sources, *addends]),
                              sources[0].dtype)


def params(dtypes=DTYPES):
    return [(b, dt) for b in BACKENDS for dt in dtypes if supports(b, dt)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", Q_VARIANTS)
@pytest.mark.parametrize("backend,dtype", params())
def test_forward_matches_float64_reference(backend, dtype, variant, shape):
    sources, addends, q, gain = gather_inputs(*shape, dtype, variant, device=device_for(backend))
    with forced(backend), torch.no_grad():
        h, c = dar_gather(sources, addends, q, gain)
    (h64, c64), spreads = gather_oracle(sources, addends, q, gain)
    h_low, c_low = dar_gather_reference(on_cpu(sources), on_cpu(addends), *on_cpu([q, gain]))
    assert h.dtype == dtype
    assert_close_to_oracle(h, h64, h_low, "h", spreads[0])
    if addends:
        assert c.dtype == dtype
        assert_close_to_oracle(c, c64, c_low, "c", spreads[1])
    else:
        assert c is None


@pytest.mark.parametrize("backend,dtype", params(dtypes=(torch.bfloat16, torch.float16)))
def test_summary_is_routed_as_stored(backend, dtype):
    """h equals routing over [*sources, c] with the returned (rounded) c, by the same backend: later ops and
    the backward read that same c."""
    sources, addends, q, gain = gather_inputs(2, 5, 40, 2, 3, dtype, "timestep", device=device_for(backend))
    with forced(backend), torch.no_grad():
        h, c = dar_gather(sources, addends, q, gain)
        h_routed, _ = dar_gather([*sources, c], [], q, gain)
    assert torch.equal(h, h_routed)


def check_backward_op(backend, sources, addends, q, gain, with_dlast, eps=1e-6):
    """dar_gather_bwd, given the forward's own h, lse and c, against the spec's formulas in float64."""
    sources, addends, q, gain = [x.detach() for x in sources], [x.detach() for x in addends], q.detach(), gain.detach()
    with forced(backend):
        h, lse, c = torch.ops.diffkern.dar_gather_fwd(sources, addends, q, gain, eps)
        routed = [*sources, c] if addends else sources
        dh = randn_like(h)
        dlast = randn_like(h, seed=2) if with_dlast else None
        grads = torch.ops.diffkern.dar_gather_bwd(dh, routed, q, gain, h, lse, dlast, eps)
    args = (dh, routed, q, gain, h, lse)
    extra = [] if dlast is None else [dlast]
    oracle, spreads = route_bwd_oracle(args, eps, extra)
    fp32 = reference.route_bwd(*on_cpu(args, torch.float32), eps, *on_cpu(extra, torch.float32))
    names = [f"dsources[{i}]" for i in range(len(routed))] + ["dq", "dgain"]
    for name, x, grad, ref, plain, spread in zip(names, [*routed, q, gain], [*grads[0], *grads[1:]], oracle,
                                                 [*fp32[0], *fp32[1:]], spreads):
        assert grad.dtype == x.dtype and grad.shape == x.shape, name
        assert_close_to_oracle(grad, ref, plain, name, spread)


@pytest.mark.parametrize("with_dlast", (False, True))
@pytest.mark.parametrize("shape", SHAPES[1:4], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", Q_VARIANTS)
@pytest.mark.parametrize("backend,dtype", params())
def test_backward_matches_float64_formulas(backend, dtype, variant, shape, with_dlast):
    check_backward_op(backend, *gather_inputs(*shape, dtype, variant, device=device_for(backend)), with_dlast)


@pytest.mark.parametrize("variant", Q_VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_with_float32_params(backend, variant):
    """bf16 stream with float32 q and gain (the autocast case)."""
    inputs = gather_inputs(2, 5, 40, 2, 3, torch.bfloat16, variant, param_dtype=torch.float32,
                           device=device_for(backend))
    check_backward_op(backend, *inputs, with_dlast=True)


def test_backward_formulas_with_dlast_match_autograd():
    """reference.route_bwd with dlast equals autograd through the plain definition when c has its own loss."""
    sources, addends, q, gain = gather_inputs(2, 3, 7, 2, 3, torch.float64, "dynamic")
    h, c = dar_gather_reference(sources, addends, q, gain)
    dh, dc = randn_like(h), randn_like(h, seed=2)
    auto = torch.autograd.grad((h * dh).sum() + (c * dc).sum(), [*sources, *addends, q, gain])
    _, lse, _ = reference.gather_fwd(sources, addends, q, gain, 1e-6)
    dsrc, dq, dgain = reference.route_bwd(dh, [*sources, c.detach()], q, gain, h.detach(), lse, 1e-6, dc)
    for grad, ref in zip([*dsrc[:-1], *[dsrc[-1]] * len(addends), dq, dgain], auto):
        torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", (0, 1, 3))
@pytest.mark.parametrize("variant", Q_VARIANTS)
@pytest.mark.parametrize("backend,dtype", params(dtypes=(torch.float32, torch.float64)))
def test_autograd_matches_float64_autograd(backend, dtype, variant, k):
    """End to end through dar_gather's registered autograd, with losses on both h and the summary c."""
    sources, addends, q, gain = gather_inputs(2, 5, 40, 2, k, dtype, variant, device=device_for(backend))
    inputs = [*sources, *addends, q, gain]

    def loss(h, c):
        out = (h * randn_like(h)).sum()
        return out if c is None else out + (c * randn_like(c, seed=2)).sum()
    with forced(backend):
        got = torch.autograd.grad(loss(*dar_gather(sources, addends, q, gain)), inputs)

    def grads(*x):
        return torch.autograd.grad(loss(*dar_gather_reference(x[:2], x[2:2 + k], *x[-2:])), x)
    oracle, spreads = oracle_with_spread(grads, inputs, fan_in(inputs[:-2]), dtype)
    low = grads(*[x.requires_grad_() for x in on_cpu(inputs)])
    for grad, ref, lo, spread in zip(got, oracle, low, spreads):
        assert_close_to_oracle(grad, ref, lo, "grad", spread)


@pytest.mark.parametrize("backend", ("cpu", "reference"))
def test_gradcheck_float64(backend):
    sources, addends, q, gain = gather_inputs(2, 3, 7, 2, 3, torch.float64, "timestep")
    n, k = len(sources), len(addends)

    def fn(*x):
        h, c = dar_gather(x[:n], x[n:n + k], x[-2], x[-1])
        return h, c
    with forced(backend):
        assert torch.autograd.gradcheck(fn, (*sources, *addends, q, gain), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_addends_are_read_in_place(backend):
    """Addends and sources with their own batch/token strides give the contiguous result."""
    B, T, d = 2, 5, 24
    g = torch.Generator().manual_seed(3)
    dev = device_for(backend)
    sources, addends = strided_views(2, B, T, d, g, dev), strided_views(3, B, T, d, g, dev)
    q, gain = torch.randn(B, d, generator=g).to(dev), torch.randn(d, generator=g).to(dev)
    with forced(backend), torch.no_grad():
        h, c = dar_gather(sources, addends, q, gain)
    dense = [on_cpu([x.contiguous() for x in xs]) for xs in (sources, addends)]
    (h64, c64), spreads = gather_oracle(*dense, q, gain)
    h32, c32 = dar_gather_reference(*dense, *on_cpu([q, gain]))
    assert_close_to_oracle(h, h64, h32, "h", spreads[0])
    assert_close_to_oracle(c, c64, c32, "c", spreads[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts interpreted launches on CPU tensors")
def test_triton_traffic_reads_each_input_once_and_writes_the_summary_once():
    """Forward: n sources + k addends read once, h and c written once (plus lse, per-program q/gain and
    pointer tables). Backward: dlast costs exactly one more stream read and nothing else."""
    from diffkern.testing.triton_monitor import TritonMonitor
    B, T, d, n, k = 2, 5, 40, 3, 4
    sources, addends, q, gain = gather_inputs(B, T, d, n, k, torch.float32, "static")
    sources, addends, q, gain = [x.detach() for x in sources], [x.detach() for x in addends], q.detach(), gain.detach()
    stream = B * T * d * 4
    with forced("triton"), TritonMonitor() as fwd:
        h, lse, c = torch.ops.diffkern.dar_gather_fwd(sources, addends, q, gain, 1e-6)
    programs = fwd.launches[0].programs
    assert fwd.bytes_stored == 2 * stream + B * T * 4
    assert fwd.bytes_loaded == (n + k) * stream + programs * (2 * d * 4 + 3 * (n + k) * 8)
    bwd = {}
    for with_dlast in (False, True):
        with forced("triton"), TritonMonitor() as bwd[with_dlast]:
            torch.ops.diffkern.dar_gather_bwd(randn_like(h), [*sources, c], q, gain, h, lse,
                                              randn_like(h) if with_dlast else None, 1e-6)
    assert bwd[True].bytes_loaded - bwd[False].bytes_loaded == stream
    assert bwd[True].bytes_stored == bwd[False].bytes_stored


def test_an_unrecorded_forward_gives_the_recorded_bits_and_still_refuses_a_tangent():
    """With nothing for autograd to record (no_grad, or no input requiring grad) the forward op runs below autograd
    directly (csrc/diffkern/autograd_dar.cpp, for the per-op cost of a small routing op): the same bits as the
    recorded call, and no graph. A forward-mode tangent still raises, as the recorded path does, instead of being
    dropped: the direct call is taken only without one."""
    sources, addends, q, gain = gather_inputs(2, 5, 40, 3, 2, torch.float32, "static")
    with forced("cpu"):
        recorded = dar_gather(sources, addends, q, gain)
        with torch.no_grad():
            unrecorded = dar_gather(sources, addends, q, gain)
        plain = dar_gather(*[[t.detach() for t in x] if isinstance(x, list) else x.detach()
                             for x in (sources, addends, q, gain)])
        assert recorded[0].grad_fn is not None and unrecorded[0].grad_fn is None and plain[0].grad_fn is None
        assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(recorded, unrecorded, plain))
        with fwAD.dual_level(), torch.no_grad():
            dual = fwAD.make_dual(sources[0].detach(), torch.ones_like(sources[0]))
            with pytest.raises(RuntimeError, match="jvp is not implemented"):
                dar_gather([dual, *sources[1:]], addends, q, gain)
