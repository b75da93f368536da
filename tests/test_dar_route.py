"""DAR routing (diffkern.dar_route): every backend against the float64 reference, forward and backward."""
import pytest
import triton
import triton.language as tl
import torch

import diffkern
from diffkern import _triton
from diffkern.dar import reference, triton_kernels
from diffkern.dar.reference import dar_route_reference
from diffkern.testing.backends import backends_under_test, device_for, forced, supports
from diffkern.testing.numerics import assert_close_to_oracle, oracle_with_spread

BACKENDS = backends_under_test("dar_route_fwd")

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
Q_VARIANTS = ("static", "timestep", "dynamic")
# (B, T, d, n): one-element edges, odd sizes, T just past a token tile (16 rows when d <= 256),
# d just past a power of two, one source, many sources, a wide d with a 2-row tile.
SHAPES = ((1, 1, 1, 1), (2, 5, 40, 2), (1, 17, 130, 3), (2, 3, 16, 64), (2, 3, 1100, 5))


def make_inputs(B, T, d, n, dtype, variant, param_dtype=None, seed=0, device="cpu"):
    """Sources with uneven scales (so the routing weights are far from uniform), q, gain: leaf tensors."""
    g = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype
    sources = [(torch.randn(B, T, d, generator=g) * (0.5 + i % 3)).to(device, dtype).requires_grad_()
               for i in range(n)]
    q_shape = {"static": (d,), "timestep": (B, d), "dynamic": (B, T, d)}[variant]
    q = (2 * torch.randn(q_shape, generator=g)).to(device, param_dtype).requires_grad_()
    gain = (1 + 0.2 * torch.randn(d, generator=g)).to(device, param_dtype).requires_grad_()
    return sources, q, gain


def randn_like(x, seed=1):
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.device, x.dtype)


def on_cpu(tensors, dtype=None):
    """Detached CPU copies (in `dtype` if given) of a (nested) list of tensors: the oracles' inputs."""
    return [on_cpu(x, dtype) if isinstance(x, list) else x.detach().cpu().to(dtype or x.dtype) for x in tensors]


def strided_views(n, B, T, d, g, device):
    """n [B, T, d] tensors with their own batch/token strides: the first n - 1 every other d-wide slice of one
    [B, T, 2(n-1)d] buffer, the last a transposed [T, B, d] buffer."""
    wide = torch.randn(B, T, 2 * (n - 1) * d, generator=g).to(device)
    return [wide[..., 2 * i * d:(2 * i + 1) * d] for i in range(n - 1)] + \
        [torch.randn(T, B, d, generator=g).to(device).transpose(0, 1)]


def fan_in(sources) -> int:
    """The largest fan-in of a routing output (the error model's n): a static query's gradient sums over
    every element of every source."""
    return len(sources) * sources[0].numel()


def route_oracle(sources, q, gain):
    """(h, spread): the float64 reference and its error-model spread (diffkern.testing.numerics)."""
    (h,), (spread,) = oracle_with_spread(dar_route_reference, [sources, q, gain], fan_in(sources), sources[0].dtype)
    return h, spread


def route_bwd_oracle(args, eps, extra=()):
    """The spec's backward formulas in float64, flattened to [*dsources, dq, dgain], with their spreads."""
    def bwd(*a):
        dsources, dq, dgain = reference.route_bwd(*a[:6], eps, *a[6:])
        return [*dsources, dq, dgain]
    sources = args[1]
    return oracle_with_spread(bwd, [*args, *extra], fan_in(sources), sources[0].dtype)


def reference_grads(sources, q, gain, dh, dtype):
    """The plain reference's output and gradients on CPU, with every input cast to `dtype`."""
    inputs = [x.requires_grad_() for x in on_cpu([*sources, q, gain], dtype)]
    h = dar_route_reference(inputs[:-2], inputs[-2], inputs[-1])
    return h, torch.autograd.grad(h, inputs, dh.cpu().to(h.dtype))


def params(backends=BACKENDS, dtypes=DTYPES):
    return [(b, dt) for b in backends for dt in dtypes if supports(b, dt)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", Q_VARIANTS)
@pytest.mark.parametrize("backend,dtype", params())
def test_forward_matches_float64_reference(backend, dtype, variant, shape):
    sources, q, gain = make_inputs(*shape, dtype, variant, device=device_for(backend))
    with forced(backend), torch.no_grad():
        h = diffkern.dar_route(sources, q, gain)
    oracle, spread = route_oracle(sources, q, gain)
    plain = dar_route_reference(on_cpu(sources), *on_cpu([q, gain]))
    assert h.dtype == dtype
    assert_close_to_oracle(h, oracle, plain, "h", spread)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", Q_VARIANTS)
@pytest.mark.parametrize("backend,dtype", params())
def test_backward_matches_float64_formulas(backend, dtype, variant, shape):
    """The backward op, given the forward's own h and lse, against the spec's formulas in float64.

    The formulas use delta = <dh, h> with h as stored (in the sources' dtype): that rounding is part
    of the op's contract (as in flash-attention), so the oracle sees the same h.
    """
    check_backward_op(backend, *make_inputs(*shape, dtype, variant, device=device_for(backend)))


@pytest.mark.parametrize("variant", Q_VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_with_float32_params(backend, variant):
    """bf16 sources with float32 q and gain (the autocast case): dq and dgain come back in float32."""
    check_backward_op(backend, *make_inputs(2, 5, 40, 3, torch.bfloat16, variant, param_dtype=torch.float32,
                                            device=device_for(backend)))


def misaligned_inputs(B, T, d, dtype, variant, param_dtype, seed=5, device="cpu"):
    """Sources whose rows start off 16-byte boundaries: slices at odd offsets of one wider buffer, and a
    [T, B, d] buffer seen as [B, T, d] (odd strides for odd d)."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(B, T, 2 * d + 3, generator=g).to(device, dtype)
    sources = [wide[..., 1:1 + d], 2 * wide[..., d + 2:2 * d + 2],
               (0.5 * torch.randn(T, B, d, generator=g)).to(device, dtype).transpose(0, 1)]
    _, q, gain = make_inputs(B, T, d, 1, dtype, variant, param_dtype, seed, device)
    return sources, q.detach(), gain.detach()


# Every pairing of source and parameter dtypes the float32-accumulating kernels take.
MIXED = ((torch.float32, None), (torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, torch.float32),
         (torch.float16, torch.float32))


@pytest.mark.parametrize("B,T,d", ((2, 3, 37), (2, 3, 531), (1, 2, 4093)))
@pytest.mark.parametrize("variant", Q_VARIANTS)
@pytest.mark.parametrize("backend,dtype,param_dtype",
                         [(b, dt, p) for b in BACKENDS for dt, p in MIXED if supports(b, dt)])
def test_misaligned_rows(backend, dtype, param_dtype, variant, B, T, d):
    """Rows no vector access may start, at odd d: within one warp, across two, and near the widest d the
    float32 backends take (4096; 4093 needs 8 warps per row in the CUDA kernels): forward and backward."""
    sources, q, gain = misaligned_inputs(B, T, d, dtype, variant, param_dtype, device=device_for(backend))
    with forced(backend), torch.no_grad():
        h = diffkern.dar_route(sources, q, gain)
    oracle, spread = route_oracle(sources, q, gain)
    assert_close_to_oracle(h, oracle, dar_route_reference(on_cpu(sources), *on_cpu([q, gain], dtype)), "h", spread)
    check_backward_op(backend, sources, q, gain)


@pytest.mark.parametrize("variant", Q_VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend, variant):
    """Bit-identical gradients from two runs: no atomics, and the partial sums over tokens add up in a fixed
    order (the harness runs the CUDA blocks in a different shuffled order at every launch)."""
    sources, q, gain = make_inputs(2, 17, 130, 3, torch.float32, variant, device=device_for(backend))
    sources, q, gain = [x.detach() for x in sources], q.detach(), gain.detach()
    dh = randn_like(sources[0])
    with forced(backend):
        h, lse = torch.ops.diffkern.dar_route_fwd(sources, q, gain, 1e-6)
        runs = [torch.ops.diffkern.dar_route_bwd(dh, sources, q, gain, h, lse, 1e-6) for _ in range(2)]
    for a, b in zip([*runs[0][0], *runs[0][1:]], [*runs[1][0], *runs[1][1:]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", Q_VARIANTS)
def test_cpu_token_blocks_do_not_depend_on_the_thread_count(variant):
    """A few tokens over many sources (n * d = 11000) are split into token blocks sized by the shape alone (3
    tokens: blocks 3, 3, 1 per batch row), so that they spread over threads: against the oracle, and outputs
    and gradients bit-identical at 1 and 2 threads."""
    sources, q, gain = make_inputs(2, 7, 1100, 10, torch.float32, variant)
    sources, q, gain = [x.detach() for x in sources], q.detach(), gain.detach()
    dh = randn_like(sources[0])
    threads, runs = torch.get_num_threads(), []
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            with forced("cpu"):
                h, lse = torch.ops.diffkern.dar_route_fwd(sources, q, gain, 1e-6)
                dsources, dq, dgain = torch.ops.diffkern.dar_route_bwd(dh, sources, q, gain, h, lse, 1e-6)
            runs.append([h, lse, *dsources, dq, dgain])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    check_backward_op("cpu", sources, q, gain)


def check_backward_op(backend, sources, q, gain, eps=1e-6):
    """dar_route_bwd on `backend` against the float64 formulas; returns (its arguments, its gradients)."""
    sources, q, gain = [x.detach() for x in sources], q.detach(), gain.detach()
    dh = randn_like(sources[0])
    with forced(backend):
        h, lse = torch.ops.diffkern.dar_route_fwd(sources, q, gain, eps)
        grads = torch.ops.diffkern.dar_route_bwd(dh, sources, q, gain, h, lse, eps)
    args = (dh, sources, q, gain, h, lse)
    oracle, spreads = route_bwd_oracle(args, eps)
    fp32 = reference.route_bwd(*on_cpu(args, torch.float32), eps)
    names = [f"dsources[{i}]" for i in range(len(sources))] + ["dq", "dgain"]
    for name, x, grad, ref, plain, spread in zip(names, [*sources, q, gain], [*grads[0], *grads[1:]], oracle,
                                                 [*fp32[0], *fp32[1:]], spreads):
        assert grad.dtype == x.dtype and grad.shape == x.shape, name
        assert_close_to_oracle(grad, ref, plain, name, spread)
    return args, grads


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", Q_VARIANTS)
def test_backward_formulas_match_autograd(variant, shape):
    """reference.route_bwd (the spec's formulas) equals autograd through the plain definition, in float64."""
    sources, q, gain = make_inputs(*shape, torch.float64, variant)
    dh = torch.randn(shape[:3], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    h, autograd = reference_grads(sources, q, gain, dh, torch.float64)
    _, lse = reference.route_fwd(sources, q, gain, 1e-6)
    dsources, dq, dgain = reference.route_bwd(dh, sources, q, gain, h, lse, 1e-6)
    for grad, ref in zip([*dsources, dq, dgain], autograd):
        torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", Q_VARIANTS)
@pytest.mark.parametrize("backend,dtype", params(dtypes=(torch.float32, torch.float64)))
def test_autograd_matches_float64_autograd(backend, dtype, variant):
    """End to end through diffkern.dar_route and its registered autograd formula."""
    sources, q, gain = make_inputs(2, 5, 40, 3, dtype, variant, device=device_for(backend))
    dh = randn_like(sources[0])
    with forced(backend):
        h = diffkern.dar_route(sources, q, gain)
        grads = torch.autograd.grad(h, [*sources, q, gain], dh)
    oracle, spreads = oracle_with_spread(lambda *x: reference_grads(x[:-2], x[-2], x[-1], dh, torch.float64)[1],
                                         [*sources, q, gain], fan_in(sources), dtype)
    _, plain = reference_grads(sources, q, gain, dh, dtype)
    for grad, ref, low, spread in zip(grads, oracle, plain, spreads):
        assert_close_to_oracle(grad, ref, low, "grad", spread)


@pytest.mark.parametrize("variant", Q_VARIANTS)
@pytest.mark.parametrize("backend", ("cpu", "reference"))
def test_gradcheck_float64(backend, variant):
    sources, q, gain = make_inputs(2, 3, 7, 3, torch.float64, variant, device=device_for(backend))
    with forced(backend):
        assert torch.autograd.gradcheck(lambda *x: diffkern.dar_route(x[:-2], x[-2], x[-1]),
                                        (*sources, q, gain), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_sources_are_read_in_place(backend):
    """Each source with its own batch/token strides (slices of larger buffers) gives the contiguous result."""
    B, T, d = 2, 5, 24
    g = torch.Generator().manual_seed(3)
    dev = device_for(backend)
    sources = strided_views(3, B, T, d, g, dev)
    q, gain = torch.randn(B, T, d, generator=g).to(dev), torch.randn(d, generator=g).to(dev)
    with forced(backend):
        h = diffkern.dar_route(sources, q, gain)
    dense = on_cpu([x.contiguous() for x in sources])
    expected, spread = route_oracle(dense, q, gain)
    assert_close_to_oracle(h, expected, dar_route_reference(dense, *on_cpu([q, gain])), "h", spread)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_offsets_beyond_int32(backend):
    """Batch strides past 2^31 elements (expanded views of a lazily-mapped buffer): 64-bit offset math."""
    B, T, d, stride_b = 2, 3, 16, 2**31 + 64
    dev = device_for(backend)
    big = torch.empty(stride_b + T * d, dtype=torch.float16, device=dev)  # 4 GiB, mapped lazily on CPU
    g = torch.Generator().manual_seed(4)
    for b in (0, stride_b):
        big[b:b + T * d] = torch.randn(T * d, generator=g).half()
    far = big.as_strided((B, T, d), (stride_b, d, 1))
    near = torch.randn(B, T, d, generator=g).half().to(dev)
    q = torch.randn(B, d, generator=g).half().to(dev)
    gain = torch.ones(d, dtype=torch.float16, device=dev)
    with forced(backend), torch.no_grad():
        h = diffkern.dar_route([far, near], q, gain)
    dense = on_cpu([far.contiguous(), near, q, gain])
    oracle, spread = route_oracle(dense[:2], *dense[2:])
    assert_close_to_oracle(h, oracle, dar_route_reference(dense[:2], *dense[2:]), "h", spread)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_to_its_token_only(backend):
    sources, q, gain = make_inputs(2, 4, 20, 3, torch.float32, "static", device=device_for(backend))
    sources = [x.detach().clone() for x in sources]
    sources[1][1, 2, 5] = float("nan")
    with forced(backend):
        h = diffkern.dar_route(sources, q.detach(), gain.detach()).cpu()
    bad = torch.zeros(2, 4, dtype=torch.bool)
    bad[1, 2] = True
    assert torch.isnan(h[bad]).all()
    assert torch.isfinite(h[~bad]).all()


@pytest.mark.parametrize("B,T", ((0, 3), (2, 0), (0, 0)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_token_sets(backend, B, T):
    sources, q, gain = make_inputs(B, T, 8, 2, torch.float32, "timestep", device=device_for(backend))
    with forced(backend):
        h = diffkern.dar_route(sources, q, gain)
        grads = torch.autograd.grad(h.sum(), [*sources, q, gain])
    assert h.shape == (B, T, 8)
    assert all(gr.shape == x.shape and not gr.any() for gr, x in zip(grads, (*sources, q, gain)))


@pytest.mark.parametrize("variant", Q_VARIANTS)
def test_triton_backward_walks_several_tiles_per_program(monkeypatch, variant):
    """A modeled GPU with one SM makes each backward program walk all of its row's tiles (and past the end)."""
    monkeypatch.setattr(_triton, "MODEL_SMS", 1)
    monkeypatch.setattr(_triton, "PROGRAMS_PER_SM", 1)
    B, T, d = 2, 17, 130
    n_tiles = -(-T // triton_kernels.route_config(d, backward=True)[0])
    assert _triton.tiles_per_chunk(B, n_tiles, torch.device("cpu")) > n_tiles
    check_backward_op("triton", *make_inputs(B, T, d, 3, torch.float32, variant, device=device_for("triton")))


@triton.jit
def _tile_offsets_kernel(row_ptr, q_ptr, b, tile, T, d, stride_qb, stride_qt,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    dd = tl.arange(0, BLOCK_D)
    _, _, _, row, q_offs = triton_kernels._tile(b.to(tl.int64), tile, T, d, stride_qb, stride_qt, dd, BLOCK_T)
    out = tl.arange(0, BLOCK_T)[:, None] * BLOCK_D + dd[None, :]
    tl.store(row_ptr + out, row)
    tl.store(q_ptr + out, q_offs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter's index math on CPU tensors")
def test_tile_offsets_are_64_bit():
    """The kernels' shared index math, evaluated at B*T*d ~ 2^45 without allocating such tensors."""
    b, T, d, BLOCK_T, BLOCK_D = 3, 2**30 + 7, 4096, 2, 4096
    tile = (T - 1) // BLOCK_T
    stride_qb, stride_qt = T * d, d
    row, q_offs = (torch.empty(BLOCK_T, BLOCK_D, dtype=torch.int64) for _ in range(2))
    _tile_offsets_kernel[(1,)](row, q_offs, b, tile, T, d, stride_qb, stride_qt, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D)
    t = torch.arange(BLOCK_T, dtype=torch.int64)[:, None] + tile * BLOCK_T
    dd = torch.arange(BLOCK_D, dtype=torch.int64)[None, :]
    assert torch.equal(row, (b * T + t) * d + dd)
    assert torch.equal(q_offs, b * stride_qb + t * stride_qt + dd)
