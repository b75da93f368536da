"""The ablations' interventions: diffkern.sink_attention(intervention="scale" | "value", alpha) and
diffkern::sink_suppress(renormalize), every backend against the explicit float64 probability matrix."""
import math

import pytest
import torch

import diffkern
from diffkern import _dtypes
from diffkern.sinks import reference
from diffkern.sinks.processors import SinkJointAttnProcessor
from diffkern.testing.backends import device_for, forced
from diffkern.testing.numerics import assert_close_to_oracle, max_error, tolerance

from test_sinks import BACKENDS, attention_oracle, make_qkv, oracle, params

INTERVENTIONS = ("scale", "value")


def explicit(q, k, v, idx, rows, scale, intervention, alpha):
    """(out, post) from the whole matrix P = softmax(s): "scale" adds log alpha to the logits of the keys idx
    [B, G, K] in rows i < rows and re-softmaxes; "value" keeps P and multiplies those keys' values by alpha.
    post: the probability of idx[..., 0] in rows i < rows, after the intervention."""
    s = q @ k.transpose(-1, -2) * scale
    B, H, N_q, N_k = s.shape
    chosen = torch.zeros(B, idx.shape[1], N_k, dtype=torch.bool).scatter_(-1, idx, True).expand(B, H, N_k)
    changed = chosen[:, :, None, :] & (torch.arange(N_q) < rows)[:, None]
    p = torch.softmax(s, -1)
    if intervention == "scale":
        p = torch.softmax(s + torch.where(changed, math.log(alpha) if alpha > 0 else -math.inf, 0.0), -1)
        out = p @ v
    else:
        out = torch.where(changed[..., None], alpha * v[:, :, None], v[:, :, None]).mul(p[..., None]).sum(-2)
    top = idx[..., :1].expand(B, H, 1)[:, :, None, :].expand(B, H, rows, 1)
    return out, torch.gather(p[:, :, :rows], -1, top)[..., 0]


def dominant_qkv(dtype, device, B=2, H=2, N_q=37, N_k=45, d=64):
    """A planted sink per head, sharpened: the selected key holds 0.1% to 99.95% of the image rows' mass
    (float64, seed 1; 70 of 120 rows over half, 41 over 7/8, 12 over 99%), so corrected rows, recomputed rows
    and near-total ones all occur."""
    q, k, v = make_qkv(B, H, N_q, N_k, d, torch.float64, seed=1, planted=1)
    return [x.to(device, dtype) for x in (2.0 * q, k, v)]


def run(backend, q, k, v, n, **kw):
    with forced(backend):
        return diffkern.sink_attention(q, k, v, k_sink=1, n_query=n, return_stats=True, **kw)


def amplification(q, k, idx, rows, alpha):
    """How much a corrected row's error may exceed the plain error model: out is (1 - (1 - alpha) sum_S P)
    times o's size (scale: its denominator; value: the cancellation in o - (1 - alpha) sum_S P v), capped by
    the recompute rule (sinks_math.h); 1 for alpha >= 1."""
    p = torch.softmax(reference.logits(*oracle(q, k), q.shape[-1] ** -0.5), -1)[:, :, :rows]
    kept = 1.0 - (1.0 - alpha) * (p * reference.key_mask(idx, q.shape[1], k.shape[2])).sum(-1).max()
    return min(1.0 / kept.item(), 1.0 / reference.recompute_below(q.dtype)) if alpha < 1 else 1.0


def assert_matches_explicit(backend, q, k, v, n, intervention, alpha, plain_model=False):
    out, stats = run(backend, q, k, v, n, intervention=intervention, alpha=alpha)
    idx = stats["indices"].cpu()
    scale = q.shape[-1] ** -0.5
    (want, post), spreads = attention_oracle(lambda *x: explicit(*x, idx, n, scale, intervention, alpha), q, k, v)
    plain, plain_post = explicit(*[t.cpu().to(_dtypes.acc(q.dtype)) for t in (q, k, v)], idx, n, scale,
                                 intervention, alpha)
    amp = 1.0 if plain_model else amplification(q, k, idx, n, alpha)
    assert not torch.isnan(out).any()
    tol = tolerance(out.dtype, want, plain.to(out.dtype), amp * spreads[0])
    assert max_error(out, want) <= tol, f"out: error {max_error(out, want):.3e} > {tol:.3e} (amplification {amp:.1f})"
    assert_close_to_oracle(stats["top_sink_mass_after"], post.mean(), plain_post.mean(), "top_sink_mass_after",
                           amp * spreads[1])
    return out


@pytest.mark.parametrize("alpha", (0.0, 0.5, 3.0))
@pytest.mark.parametrize("intervention", INTERVENTIONS)
@pytest.mark.parametrize("backend,dtype", params((torch.float32, torch.bfloat16)))
def test_intervention_matches_explicit_reference(backend, dtype, intervention, alpha):
    """Dominant-sink rows, n_query < N_q (row_scope image)."""
    q, k, v = dominant_qkv(dtype, device_for(backend))
    assert_matches_explicit(backend, q, k, v, 30, intervention, alpha)


def sink_everywhere(dtype, device):
    """Key 0 holds 96.7% to 99.85% of every row's mass (float64, seed 5): every output is 1/30 to 1/700 of o's size."""
    g = torch.Generator().manual_seed(5)
    u = torch.randn(64, generator=g, dtype=torch.float64)
    u /= u.norm()
    q, k, v = (torch.randn(2, 2, n, 64, generator=g, dtype=torch.float64) for n in (37, 45, 45))
    q = 0.2 * q + 3.0 * u
    k[:, :, 0] = 24.0 * u
    return [x.to(device, dtype) for x in (q, k, v)]


@pytest.mark.parametrize("intervention", INTERVENTIONS)
@pytest.mark.parametrize("backend,dtype", params((torch.float32, torch.float64)))
def test_rows_where_the_sink_holds_most_of_the_mass_meet_the_plain_error_model(backend, dtype, intervention):
    """With alpha = 0 a row whose sink holds over recompute_below(dtype) = 1/2 of its mass is recomputed, for
    the value path too (its o - sum_S P v cancels as the masked correction's denominator does): no allowance
    for amplification. The corrected value path alone misses this by 20x (Triton, fp32) to 130x (CPU, fp64)."""
    q, k, v = sink_everywhere(dtype, device_for(backend))
    assert_matches_explicit(backend, q, k, v, 37, intervention, 0.0, plain_model=True)


@pytest.mark.parametrize("alpha", (0.0, 1.0))
@pytest.mark.parametrize("intervention", INTERVENTIONS)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_unchanged_rows_are_the_unmasked_output(backend, intervention, alpha):
    """alpha = 1 changes nothing: the fused output is the unmasked o, bit for bit; so are the rows past
    n_query (row_scope image) for any alpha. float32: no output rounding (the interpreter's bf16 stores
    truncate). The reference backend recomputes the rows from the explicit matrix: only close (above)."""
    q, k, v = dominant_qkv(torch.float32, device_for(backend))
    out = assert_matches_explicit(backend, q, k, v, 30, intervention, alpha)
    with forced(backend):
        unmasked = diffkern.sink_attention(q, k, v, mode="measure")
    rows = 0 if alpha == 1.0 else 30
    assert torch.equal(out[:, :, rows:], unmasked[:, :, rows:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_key_selected(backend):
    """head_union selects k_sink * H >= N_k keys: scale renormalises them all alike (the unmasked output, alpha
    = 0 included: the every-key rule); value scales every value: alpha times the unmasked output."""
    q, k, v = make_qkv(1, 3, 10, 4, 64, torch.float32, device=device_for(backend))
    with forced(backend):
        plain = diffkern.sink_attention(q, k, v, mode="measure")
        for alpha in (0.0, 0.5, 3.0):
            got = diffkern.sink_attention(q, k, v, k_sink=2, mode="head_union", intervention="scale", alpha=alpha)
            torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-6)
            got = diffkern.sink_attention(q, k, v, k_sink=2, mode="head_union", intervention="value", alpha=alpha)
            torch.testing.assert_close(got, alpha * plain, rtol=1e-6, atol=1e-6)


# (B, H, N_q, N_k, head_dim, n_query): one query and one key (S = the only key); above a 64-wide tile in both
# directions at head_dim 128 with n_query inside the second tile
AWKWARD = ((2, 1, 1, 1, 64, 1), (1, 1, 70, 67, 128, 66))


@pytest.mark.parametrize("shape", AWKWARD, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("intervention", INTERVENTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_awkward_shapes(backend, intervention, shape):
    B, H, N_q, N_k, d, n = shape
    q, k, v = make_qkv(B, H, N_q, N_k, d, torch.float32, seed=4, planted=1, device=device_for(backend))
    assert_matches_explicit(backend, q, k, v, n, intervention, 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_alpha_leaves_only_the_selected_keys(backend):
    """scale with alpha = 1e300 (bias 690.8: e^-bias underflows float32, and the bottom keys' unmasked
    probabilities, e^-120, too): the rows attend to the selected keys alone, as the explicit softmax does."""
    k = torch.zeros(1, 1, 6, 4)
    k[0, 0, 0] = 60.0
    q = torch.ones(1, 1, 3, 4)
    v = torch.randn(1, 1, 6, 4, generator=torch.Generator().manual_seed(0))
    q, k, v = (x.to(device_for(backend)) for x in (q, k, v))
    with forced(backend):
        out, stats = diffkern.sink_attention(q, k, v, mode="bottom", intervention="scale", alpha=1e300,
                                             return_stats=True)
    idx = stats["indices"].cpu()
    assert 0 not in idx.tolist()
    want, _ = explicit(*oracle(q, k, v), idx, 3, 0.5, "scale", 1e300)
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    q, k, v = make_qkv(1, 2, 9, 11, 64, torch.float32, device=device_for(backend), bnhd=True)
    with forced(backend):
        o, lse = torch.ops.diffkern.sink_attention_fwd(q, k, v, 7, 0.125)[:2]
        for idx in (torch.tensor([[[4, 0]]]), torch.tensor([[[1], [10]]])):
            for bias, renormalize in ((math.log(3.0), True), (-math.inf, False), (0.5, False)):
                torch.library.opcheck(torch.ops.diffkern.sink_suppress.default,
                                      (q, k, v, o, lse, idx.to(q.device), 7, 0.125, bias, renormalize))


@pytest.mark.parametrize("bias", (math.nan, math.inf))
@pytest.mark.parametrize("backend", BACKENDS)
def test_op_refuses_nan_and_plus_inf_bias(backend, bias):
    q, k, v = make_qkv(1, 2, 9, 11, 64, torch.float32, device=device_for(backend))
    with forced(backend):
        o, lse = torch.ops.diffkern.sink_attention_fwd(q, k, v, 9, 0.125)[:2]
        idx = torch.tensor([[[3]]], device=o.device)
        with pytest.raises(ValueError, match=r"sink_attention: bias must be finite or -inf, got"):
            torch.ops.diffkern.sink_suppress(q, k, v, o, lse, idx, 9, 0.125, bias, True)


def test_processor_passes_the_intervention_through():
    q, k, v = make_qkv(2, 2, 13, 17, 64, torch.float32, planted=1)
    proc = SinkJointAttnProcessor(mode="per_head", k_sink=2, intervention="value", alpha=0.25)
    want = diffkern.sink_attention(q, k, v, k_sink=2, n_query=10, intervention="value", alpha=0.25)
    with torch.no_grad():
        assert torch.equal(proc._attend(q, k, v, n_query=10), want)
    assert not torch.equal(want, diffkern.sink_attention(q, k, v, k_sink=2, n_query=10))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v = make_qkv(2, 2, 9, 11, 64, torch.float32, planted=1)

    def step(q, k, v):
        return diffkern.sink_attention(q, k, v, n_query=7, intervention="value", alpha=0.5)
    torch.testing.assert_close(torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v), step(q, k, v))
