"""diffkern.recurse: every backend against the plain block applied n_iter times (float64), forward and backward."""
import functools

import pytest
import torch

import diffkern
from diffkern import _triton
from diffkern.rmdm import op, reference
from diffkern.testing.backends import backends_under_test, device_for, forced, supports
from diffkern.testing.numerics import assert_close_to_oracle, oracle_with_spread

BACKENDS = backends_under_test("rmdm_recurse")
# The backward's backends: cpu, reference, triton (the default on a GPU) and cuda (the same C++ on ATen, which on a
# GPU runs cuBLAS); the forward under test then runs on the CPU kernel when it has no backend of that name.
BWD_BACKENDS = backends_under_test("rmdm_recurse_bwd")
# (B, T, d, f, heads, K, n_iter): one token and one head, odd sizes, several blocks and iterations, and
# T, 3d and f just above the Triton tiles (16 tokens, 32 outputs, 32 MLP columns)
SHAPES = ((1, 1, 4, 4, 1, 1, 1), (2, 5, 6, 10, 2, 2, 3), (3, 7, 8, 12, 4, 1, 2), (2, 19, 12, 40, 3, 2, 2))
EPS = 1e-5


def ids(shape):
    return "B{}T{}d{}f{}h{}K{}L{}".format(*shape)


def make(shape, dtype, with_mod, seed=0, device="cpu", mlp_in_scale=1.0):
    """Blocks, x and mod (or None) drawn on CPU in float64, then cast and moved; w_1 and b_1 times mlp_in_scale."""
    B, T, d, f, heads, K, n_iter = shape
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(K):
        blk = []
        for name, s in zip(reference.BLOCK_PARAMS, reference.param_shapes(d, f)):
            base = 1.0 if name in ("ln1_w", "ln2_w") else 0.0
            scale = mlp_in_scale if name in ("w_1", "b_1") else 1.0
            blk.append((scale * (base + 0.25 * torch.randn(s, generator=g, dtype=torch.float64))).to(device, dtype))
        blocks.append(blk)
    x = torch.randn(B, T, d, generator=g, dtype=torch.float64).to(device, dtype)
    mod = (0.3 * torch.randn(B, K, 6, d, generator=g, dtype=torch.float64)).to(device, dtype) if with_mod else None
    return blocks, x, mod


LAYER_PARAMS = ("norm1.weight", "norm1.bias", "self_attn.in_proj_weight", "self_attn.in_proj_bias",
                "self_attn.out_proj.weight", "self_attn.out_proj.bias", "norm2.weight", "norm2.bias",
                "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")


@functools.cache
def _layer(d, heads, f, dtype):
    return torch.nn.TransformerEncoderLayer(d, heads, f, dropout=0.0, activation="gelu", batch_first=True,
                                            norm_first=True, layer_norm_eps=EPS, dtype=dtype)


def encoder_layer(blk, d, heads):
    """torch.nn's pre-norm encoder layer (gelu, no dropout) run with the block's tensors: the plain block."""
    layer = _layer(d, heads, blk[8].shape[0], blk[0].dtype)
    return lambda h: torch.func.functional_call(layer, dict(zip(LAYER_PARAMS, blk)), (h,))


def plain(blocks, x, mod, n_iter, heads):
    """The plain block applied n_iter times: nn.TransformerEncoderLayer without mod, reference.block with it."""
    states, h = [], x
    layers = [encoder_layer(b, x.shape[-1], heads) for b in blocks] if mod is None else None
    for _ in range(n_iter):
        for k, blk in enumerate(blocks):
            h = layers[k](h) if mod is None else reference.block(h, blk, mod[:, k], heads, EPS)
        states.append(h)
    return torch.stack(states)


def fan_in(shape) -> int:
    """The error model's n: one block's chain of reductions (LayerNorms and projections over d, attention
    scores and weights over head_dim and T, the MLP's second layer over f); later iterations and blocks
    are the oracle's own propagation of the perturbed weights."""
    B, T, d, f = shape[:4]
    return 5 * d + T + f


def leaves_of(x, blocks, mod) -> list:
    """[x, *every block's weights, mod (if any)]: the op's differentiable inputs, flat."""
    return [x, *[w for b in blocks for w in b], *([mod] if mod is not None else [])]


def unflatten(leaves, K: int, with_mod: bool):
    """(x, blocks, mod) from leaves_of's list."""
    n_w = len(reference.BLOCK_PARAMS)
    blocks = [list(leaves[1 + k * n_w:1 + (k + 1) * n_w]) for k in range(K)]
    return leaves[0], blocks, leaves[-1] if with_mod else None


def plain_oracle(shape, x, blocks, mod, dstates=None):
    """The plain blocks in float64 on the kernel's own (rounded) inputs, with the model's spreads: the states,
    or, given dstates, the gradients of every leaf (leaves_of)."""
    K, heads, n_iter = shape[5], shape[4], shape[6]

    def fn(*leaves):
        x, blocks, mod_ = unflatten(leaves, K, mod is not None)
        states = plain(blocks, x, mod_, n_iter, heads)
        return states if dstates is None else torch.autograd.grad(states, leaves, dstates)
    return oracle_with_spread(fn, leaves_of(x, blocks, mod), fan_in(shape), x.dtype)


def params(dtypes, backends=BACKENDS):
    return [(b, dt) for b in backends for dt in dtypes if supports(b, dt)]


def _interpreted_dtype(backend, dtype):
    """The Triton backward runs float16 for bfloat16 under the interpreter: there fp32 -> bf16 conversion truncates
    (../shared/TRITON_ON_CPU.md), a bias that its stored bf16 activations and gradients carry into every sum over
    rows (1.08x the tolerance at B2T5d6f10h2K2L3, 0.29x in float16, which converts as a GPU does). Its bf16 kernels
    are the same code, compiled AOT (tests/test_kernels_compile.py) and run in the GPU check."""
    return torch.float16 if backend == "triton" and dtype == torch.bfloat16 and _triton.interpreting() else dtype


def bwd_params(dtypes):
    """params of the backward's backends, the CPU kernels' both ways: the training pair keeping the forward's
    activations (recompute=None, the default for these sizes) and the recomputing backward (recompute=True)."""
    return [pytest.param(b, dt, rc, id=f"{b}-{str(dt).removeprefix('torch.')}" + ("-recompute" if rc else ""))
            for b, dt in ((b, _interpreted_dtype(b, dt)) for b, dt in params(dtypes, BWD_BACKENDS))
            for rc in ((None, True) if b == "cpu" else (None,))]


@pytest.mark.parametrize("with_mod", (False, True), ids=("plain", "adaln"))
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("backend,dtype", params((torch.float64, torch.float32, torch.bfloat16)))
def test_forward_matches_the_plain_block_applied_n_iter_times(backend, dtype, shape, with_mod):
    check_forward(backend, dtype, shape, with_mod)


def check_forward(backend, dtype, shape, with_mod, **make_kw):
    blocks, x, mod = make(shape, dtype, with_mod, device=device_for(backend), **make_kw)
    heads, n_iter = shape[4], shape[6]
    with forced(backend):
        states = diffkern.recurse(blocks, x, n_iter, heads=heads, mod=mod, return_all=True)
        last = diffkern.recurse(blocks, x, n_iter, heads=heads, mod=mod)
    with torch.no_grad():
        (oracle,), (spread,) = plain_oracle(shape, x, blocks, mod)
        low = reference.recurse(x, [w for b in blocks for w in b], mod, n_iter, heads, EPS)
    assert states.dtype == dtype and states.shape == (n_iter, *x.shape)
    assert_close_to_oracle(states.cpu(), oracle, low.cpu(), "states", spread)
    assert torch.equal(last, states[-1])


@pytest.mark.parametrize("with_mod", (False, True), ids=("plain", "adaln"))
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("backend,dtype,recompute", bwd_params((torch.float64, torch.float32, torch.bfloat16)))
def test_backward_matches_autograd_through_the_plain_blocks(backend, dtype, recompute, shape, with_mod):
    check_backward(backend, dtype, recompute, shape, with_mod)


def test_cpu_products_over_large_operands_match_the_plain_blocks():
    """The CPU GEMM walks a left operand above 256 KB (csrc/include/diffkern/rmdm_gemm.h's kPanelOuterBytes) row
    block by row block instead of panel by panel: here W_2's fp32 input [B*T, f] = [260, 256] in the forward, into
    d = 64 outputs (two panels); the training backward runs at the same sizes."""
    check_backward("cpu", torch.float32, None, (2, 130, 64, 256, 2, 1, 1), False)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("float32", "bfloat16"))
def test_cpu_packing_in_blocks_with_remainders_matches_the_plain_blocks(dtype):
    """The CPU kernels pack fp32 weights (and attention's K^T per head) into panels by 16 x 16 transposes
    (csrc/include/diffkern/rmdm_gemm.h's transpose16 on AVX-512) and the rest element by element: here every
    matrix has a remainder both ways (d = 40: W_qkv [120, 40] is three 32-row panels and one of 24, whose last 8
    rows and whose last 8 columns are not whole blocks; K^T per head [50, 20])."""
    shape = (1, 50, 40, 56, 2, 1, 1)
    check_forward("cpu", dtype, shape, False)
    check_backward("cpu", dtype, None, shape, False)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=("float64", "float32"))
def test_cpu_gelu_over_its_whole_range_matches_the_plain_blocks(dtype):
    """The CPU kernels' gelu and its slope (csrc/include/diffkern/rmdm_gelu.h: fp32 polynomials, libm in float64)
    on pre-activations z of a few tens either side (w_1, b_1 scaled 12x): both polynomial ranges, the far negative
    tail where exp(-z^2 / 2) leaves fp32's range, and the saturated positive side, forward and training backward."""
    shape = (1, 9, 16, 24, 2, 1, 2)
    check_forward("cpu", dtype, shape, False, mlp_in_scale=12.0)
    check_backward("cpu", dtype, None, shape, False, mlp_in_scale=12.0)


def check_backward(backend, dtype, recompute, shape, with_mod, **make_kw):
    """The gradients of every leaf through `backend` (the forward on it, or on the CPU or Triton kernel when it has
    no forward) against the plain blocks in float64."""
    device = device_for(backend)
    blocks, x, mod = make(shape, dtype, with_mod, device=device, **make_kw)
    heads, n_iter = shape[4], shape[6]
    leaves = leaves_of(x, blocks, mod)
    for t in leaves:
        t.requires_grad_(True)
    dstates = torch.randn((n_iter, *x.shape), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    forward = backend if backend in BACKENDS else ("triton" if device.type == "cuda" else "cpu")
    with forced(forward):
        states = diffkern.recurse(blocks, x, n_iter, heads=heads, mod=mod, return_all=True, recompute=recompute)
    with forced(backend):
        grads = [g.cpu() for g in torch.autograd.grad(states, leaves, dstates.to(device, dtype))]
    oracle, spreads = plain_oracle(shape, x, blocks, mod, dstates)
    low = torch.autograd.grad(reference.recurse(x, leaves[1:len(leaves) - with_mod], mod, n_iter, heads, EPS),
                              leaves, dstates.to(device, dtype))
    for i, (g, o, p, spread) in enumerate(zip(grads, oracle, low, spreads)):
        assert_close_to_oracle(g, o, p.cpu(), f"grad of leaf {i}", spread)


@pytest.mark.parametrize("recompute,limit", ((True, op.KEEP_LIMIT_BYTES), (None, op.KEEP_LIMIT_BYTES), (None, 0),
                                             (False, 0)), ids=("recompute", "keep-rule", "over-limit", "keep"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_saves_the_inputs_states_and_weights_and_kept_activations(backend, recompute, limit, monkeypatch):
    """Recomputation (any backend but the CPU kernels, recompute=True, or kept tensors over KEEP_LIMIT_BYTES):
    autograd keeps x, the n_iter states, the weights and mod, nothing else. The CPU kernels' training pair
    (recompute=False, or None within the limit) keeps rmdm_recurse_keep's activations (acts_numel) too."""
    monkeypatch.setattr(op, "KEEP_LIMIT_BYTES", limit)
    shape = B, T, d, f, heads, K, n_iter = (2, 5, 6, 10, 2, 2, 3)
    blocks, x, mod = make(shape, torch.float32, True)
    for t in [x, mod, *[w for b in blocks for w in b]]:
        t.requires_grad_(True)
    saved = []
    with forced(backend), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                                    lambda t: t):
        diffkern.recurse(blocks, x, n_iter, heads=heads, mod=mod, return_all=True, recompute=recompute)
    expected = x.numel() * (1 + n_iter) + mod.numel() + sum(w.numel() for b in blocks for w in b)
    keeps = backend == "cpu" and (recompute is False or (recompute is None and limit > 0))
    assert sum(saved) == expected + keeps * op.acts_numel(B, T, d, f, heads, K, n_iter, True)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cpu"])
def test_the_training_pair_is_the_cpu_kernels_alone(backend):
    """rmdm_recurse_keep's activations are laid out by the C++ kernels: another backend forced on it is refused,
    naming the op and the backend, rather than returning tensors its fake does not describe."""
    blocks, x, _ = make((2, 5, 6, 10, 2, 2, 3), torch.float32, False)
    with forced(backend), pytest.raises(NotImplementedError, match=f"rmdm_recurse_keep has no '{backend}' backend"):
        torch.ops.diffkern.rmdm_recurse_keep(x, [w for b in blocks for w in b], None, 3, 2, EPS)


def test_kept_activations_of_a_live_graph_are_never_reused():
    """The training pair reuses its activation buffer only once autograd released it (it comes from the CPU
    output cache, tests/test_cpu_cache.py): a second forward while the first graph is alive (gradient
    accumulation), and a backward run twice (retain_graph), give the gradients of a lone call."""
    shape = (2, 16, 6, 10, 2, 2, 3)  # activations of 78 KB: above the cache's 64 KiB minimum
    blocks, x, _ = make(shape, torch.float32, False)
    weights = [w.requires_grad_() for b in blocks for w in b]
    xs = [x.requires_grad_(), (2 * x).detach().requires_grad_()]

    def grads(states, retain=False):
        return torch.autograd.grad(states.square().sum(), [*xs[:1], *weights], retain_graph=retain)
    diffkern.empty_cache()
    alone = grads(diffkern.recurse(blocks, xs[0], 3, heads=2, recompute=False))
    assert diffkern.cached_bytes() >= 4 * op.acts_numel(*shape, False)  # released: the next call reuses them
    first = diffkern.recurse(blocks, xs[0], 3, heads=2, recompute=False)
    second = diffkern.recurse(blocks, xs[1], 3, heads=2, recompute=False)  # alive while `first` runs backward
    for got in (grads(first, retain=True), grads(first)):
        for a, b in zip(got, alone):
            assert torch.equal(a, b)
    assert second.requires_grad


def test_opcheck_and_compile():
    blocks, x, mod = make((2, 3, 4, 6, 2, 2, 2), torch.float32, True)
    weights = [w for b in blocks for w in b]
    for t in [x, mod, *weights]:
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.diffkern.rmdm_recurse.default, (x, weights, mod, 2, 2, EPS))
    states = diffkern.recurse(blocks, x, 2, heads=2, mod=mod, return_all=True).detach()
    for bwd in ("rmdm_recurse_bwd", "rmdm_recurse_bwd_cuda"):
        torch.library.opcheck(getattr(torch.ops.diffkern, bwd).default,
                              (torch.randn_like(states), x.detach(), states, [w.detach() for w in weights],
                               mod.detach(), 2, EPS))
    fn = torch.compile(lambda x, mod: diffkern.recurse(blocks, x, 2, heads=2, mod=mod), fullgraph=True,
                       backend="aot_eager")
    out = fn(x, mod)
    torch.testing.assert_close(out, diffkern.recurse(blocks, x, 2, heads=2, mod=mod))
    gx = torch.autograd.grad(out.sum(), x)[0]
    torch.testing.assert_close(gx, torch.autograd.grad(diffkern.recurse(blocks, x, 2, heads=2, mod=mod).sum(), x)[0])


@pytest.mark.parametrize("mutate,match", [
    (lambda b, x, m: (b, x[0], m), r"x must be \[B, T, d\]"),
    (lambda b, x, m: (b, x.int(), m), "x dtype must be"),
    (lambda b, x, m: (b, x.transpose(1, 2).contiguous().transpose(1, 2), m), "x must be contiguous"),
    (lambda b, x, m: ([b[0][:11]], x, m), "K blocks of 12 tensors"),
    (lambda b, x, m: ([[*b[0][:2], b[0][2][:-1], *b[0][3:]]], x, m),
     r"weights\[2\] \(w_qkv of block 0\) must have shape"),
    (lambda b, x, m: ([[*b[0][:4], b[0][4].double(), *b[0][5:]]], x, m), r"weights\[4\] \(w_o of block 0\) dtype"),
    (lambda b, x, m: (b, x, m[:, :, :5]), "mod must have shape"),
])
def test_bad_arguments_raise_value_errors_naming_them(mutate, match):
    blocks, x, mod = make((2, 3, 4, 6, 2, 1, 1), torch.float32, True)
    b, x, m = mutate(blocks, x, mod)
    for backend in BACKENDS:
        with forced(backend), pytest.raises(ValueError, match=match):
            diffkern.recurse(b, x, 1, heads=2, mod=m)


@pytest.mark.parametrize("n_iter,heads,eps,match", [(0, 2, EPS, "n_iter must be >= 1"), (1, 3, EPS, "heads must be"),
                                                    (1, 2, 0.0, "eps must be")])
def test_bad_scalars_raise_value_errors(n_iter, heads, eps, match):
    blocks, x, mod = make((2, 3, 4, 6, 2, 1, 1), torch.float32, False)
    for backend in BACKENDS:
        with forced(backend), pytest.raises(ValueError, match=match):
            diffkern.recurse(blocks, x, n_iter, heads=heads, eps=eps)
