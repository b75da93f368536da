"""Extreme but legal inputs, every backend against the float64 reference (issue 22, section 4, numerics):
sink suppression when the suppressed keys hold nearly all of a row's mass, DAR routing near the float32
maximum, whiten at tiny scales, NaN through the 2OS projection, and flow_sde_step reproducible from the
first call of a process."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import diffkern
from diffkern.dar import reference as dar_reference
from diffkern.ntrk import reference as ntrk_reference
from diffkern.sinks import reference as sinks_reference
from diffkern.testing.backends import backends_under_test, device_for, forced, supports
from diffkern.testing.numerics import assert_close_to_oracle, max_error, oracle_with_spread, tolerance

LOW = (torch.float32, torch.float16, torch.bfloat16)


def params(op, dtypes):
    return [(b, dt) for b in backends_under_test(op) for dt in dtypes if supports(b, dt)]


# ---- sink_attention: the suppressed key holds nearly all of a row's mass ----

def dominant_sink_qkv(dtype, device, seed=0, n_q=70, d=16, sink_logit=40.0):
    """B=1, H=2, n_q queries (70: two fp32 Triton tiles), 67 keys, head_dim d: key 0's logit is sink_logit / 2
    above the rest in two of every three rows (at 40, suppressed mass 1 - 1e-8, the paper's situation) and an
    eighth of that in the others (~0.7 of the mass at 40), so a tile holds rows on both sides of
    recompute_below(dtype)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, n_q, d, generator=g)
    k = 0.3 * torch.randn(1, 2, 67, d, generator=g)
    v = torch.randn(1, 2, 67, d, generator=g)
    q[:, :, :, 0] = 2.0
    q[:, :, ::3, 0] = 0.25
    k[:, :, 0, 0] = sink_logit
    return [x.to(device, dtype) for x in (q, k, v)]


@pytest.mark.parametrize("backend,dtype", params("sink_suppress", (*LOW, torch.float64)))
def test_issue_repro_matches_float64_reference(backend, dtype):
    """The issue's case: q = 1, k = 0 but key 0 = 10, so P(key 0) = 1 - 4e-9 rounds to 1 in fp32 (the
    correction's denominator was 0: NaN)."""
    q = torch.ones(1, 1, 2, 4)
    k = torch.zeros(1, 1, 3, 4)
    k[0, 0, 0] = 10.0
    v = torch.randn(1, 1, 3, 4, generator=torch.Generator().manual_seed(0))
    q, k, v = (x.to(device_for(backend), dtype) for x in (q, k, v))
    with forced(backend):
        out, stats = diffkern.sink_attention(q, k, v, return_stats=True)
    idx = stats["indices"].cpu()
    assert idx.flatten().tolist() == [0]
    (want, post), spreads = oracle_with_spread(
        lambda *x: sinks_reference.sink_suppress(*x, None, None, idx, 2, 0.5, -1e4), [q, k, v], 4 + 3, dtype)
    plain, plain_post = sinks_reference.sink_suppress(q.cpu(), k.cpu(), v.cpu(), None, None, idx, 2, 0.5, -1e4)
    assert_close_to_oracle(out, want, plain, "out", spreads[0])
    assert_close_to_oracle(stats["top_sink_mass_after"], post.mean(), plain_post.float().mean(),
                           "top_sink_mass_after", spreads[1])


@pytest.mark.parametrize("backend,dtype", params("sink_suppress", (*LOW, torch.float64)))
def test_dominant_sink_output_and_post_mass_match_explicit_masked_reference(backend, dtype):
    q, k, v = dominant_sink_qkv(dtype, device_for(backend))
    with forced(backend):
        out, stats = diffkern.sink_attention(q, k, v, k_sink=1, return_stats=True)
        mass, lse = diffkern.sink_mass(q, k)
    (want_mass, want_lse), mass_spreads = oracle_with_spread(lambda q, k: sinks_reference.sink_mass(q, k, 70, 0.25),
                                                             [q, k], 16 + 67 + 70, dtype)
    plain_mass, plain_lse = sinks_reference.sink_mass(q.cpu(), k.cpu(), 70, 0.25)
    assert_close_to_oracle(mass, want_mass, plain_mass, "sink_mass mass", mass_spreads[0])
    assert_close_to_oracle(lse, want_lse, plain_lse, "sink_mass lse", mass_spreads[1])
    idx = stats["indices"].cpu()
    assert (idx[..., 0] == 0).all()
    p0 = torch.softmax(sinks_reference.logits(q.cpu().double(), k.cpu().double(), 0.25), -1)[..., 0]
    below = sinks_reference.recompute_below(dtype)
    assert p0.max() > 1 - 1e-7 and (p0 < 1 - below).any(), "both kinds of rows"
    # fan-in: the scores over d, the softmax and P v over N_k
    (want, post), spreads = oracle_with_spread(
        lambda *x: sinks_reference.sink_suppress(*x, None, None, idx, 70, 0.25, -1e4), [q, k, v], 16 + 67, dtype)
    plain, plain_post = sinks_reference.sink_suppress(q.cpu(), k.cpu(), v.cpu(), None, None, idx, 70, 0.25, -1e4)
    amp = 1.0 / below  # the worst a corrected row may amplify its error
    assert not torch.isnan(out).any()
    err, tol = max_error(out, want), tolerance(out.dtype, want, plain, amp * spreads[0])
    assert err <= tol, f"out: error {err:.3e} > tolerance {tol:.3e}"
    assert_close_to_oracle(stats["top_sink_mass_after"], post.mean(), plain_post.float().mean(),
                           "top_sink_mass_after", spreads[1])


# ---- dar_route / dar_gather near the float32 maximum ----

def huge_sources(dtype, n=3, B=2, T=5, d=24, seed=0):
    """Finite sources whose squares (and <q*g, v>, and their sum over sources) overflow float32."""
    g = torch.Generator().manual_seed(seed)
    scales = (3e37, 6e37, 3e36)
    sources = [(torch.randn(B, T, d, generator=g).clamp(-5, 5) * scales[i % 3]).to(dtype) for i in range(n)]
    q = 2 * torch.randn(d, generator=g)
    gain = 1 + 0.2 * torch.randn(d, generator=g)
    dh = 1e-30 * torch.randn(B, T, d, generator=g)  # keeps the true dq and dgain inside float32
    return sources, q.to(dtype), gain.to(dtype), dh.to(dtype)


def dar_fan_in(sources):
    return len(sources) * sources[0].numel()


# the kernels that route an overflowing token again (in double on cpu, rescaled in the GPU kernels)
DAR_BACKENDS = [b for b in ("cpu", "triton", "cuda") if b in backends_under_test("dar_route_fwd")]


@pytest.mark.parametrize("d", (24, 1100), ids=("d24", "d1100"))  # one warp holds several rows / a row spans warps
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("backend", DAR_BACKENDS)
def test_dar_route_near_float32_max_matches_float64_reference(backend, dtype, d):
    """A token whose float32 sums overflow is routed again (in double on cpu, rescaled in the GPU kernels).
    The plain float32 computation is inf/NaN here, so the tolerance is the error model's spread and the
    output ulp only."""
    sources, q, gain, dh = huge_sources(dtype, d=d)
    dev = device_for(backend)
    sources, q, gain, dh = [x.to(dev) for x in sources], q.to(dev), gain.to(dev), dh.to(dev)
    with forced(backend):
        h, lse = torch.ops.diffkern.dar_route_fwd(sources, q, gain, 1e-6)
        dsources, dq, dgain = torch.ops.diffkern.dar_route_bwd(dh, sources, q, gain, h, lse, 1e-6)
    (want_h,), (spread_h,) = oracle_with_spread(dar_reference.dar_route_reference, [sources, q, gain],
                                                dar_fan_in(sources), dtype)
    assert_close_to_oracle(h, want_h, want_h, "h", spread_h)

    def bwd(dh, sources, q, gain, h, lse):
        ds, dq, dg = dar_reference.route_bwd(dh, sources, q, gain, h, lse, 1e-6)
        return [*ds, dq, dg]
    want, spreads = oracle_with_spread(bwd, [dh, sources, q, gain, h, lse], dar_fan_in(sources), dtype)
    for name, got, w, spread in zip(("dv0", "dv1", "dv2", "dq", "dgain"), [*dsources, dq, dgain], want, spreads):
        assert_close_to_oracle(got, w, w, name, spread)


@pytest.mark.parametrize("backend", [b for b in DAR_BACKENDS if b in backends_under_test("dar_gather_fwd")])
def test_dar_gather_near_float32_max_matches_float64_reference(backend):
    dev = device_for(backend)
    sources, q, gain, _ = huge_sources(torch.float32, n=2)
    addends = [x.to(dev) * 0.5 for x in huge_sources(torch.float32, n=2, seed=1)[0]]
    sources, q, gain = [x.to(dev) for x in sources], q.to(dev), gain.to(dev)
    with forced(backend):
        h, lse, c = torch.ops.diffkern.dar_gather_fwd(sources, addends, q, gain, 1e-6)
    assert torch.isfinite(c).all()
    (want_h,), (spread,) = oracle_with_spread(dar_reference.dar_route_reference, [[*sources, c], q, gain],
                                              dar_fan_in(sources) + c.numel(), torch.float32)
    assert_close_to_oracle(h, want_h, want_h, "h", spread)
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("backend", DAR_BACKENDS)
def test_dar_route_nan_policy_is_kept_by_the_fallback(backend):
    """A NaN source element makes its token's h NaN (as in the reference), and only that token's."""
    sources, q, gain, _ = huge_sources(torch.float32)
    sources[1][0, 2, 3] = float("nan")
    dev = device_for(backend)
    sources, q, gain = [x.to(dev) for x in sources], q.to(dev), gain.to(dev)
    with forced(backend):
        h, lse = torch.ops.diffkern.dar_route_fwd(sources, q, gain, 1e-6)
    bad = torch.isnan(h).any(-1)
    assert bad[0, 2] and bad.sum() == 1 and torch.isnan(lse[0, 2]) and torch.isfinite(lse).sum() == lse.numel() - 1


@pytest.mark.parametrize("backend", DAR_BACKENDS)
@pytest.mark.parametrize("n", [1, 3])
def test_dar_route_infinite_scores_are_nan_like_the_reference(backend, n):
    """An inf in q makes every score +-inf: the reference's softmax is NaN wherever a score is +inf
    (inf - inf) or all are -inf, so every token is NaN there, single-source calls included."""
    g = torch.Generator().manual_seed(3)
    sources = [torch.randn(2, 5, 8, generator=g) for _ in range(n)]
    q, gain = torch.randn(8, generator=g), torch.ones(8)
    q[3] = math.inf
    with forced("reference"):
        want = torch.ops.diffkern.dar_route_fwd([s.double() for s in sources], q.double(), gain.double(), 1e-6)[0]
    dev = device_for(backend)
    with forced(backend):
        h, _ = torch.ops.diffkern.dar_route_fwd([s.to(dev) for s in sources], q.to(dev), gain.to(dev), 1e-6)
    assert torch.isnan(want).all()
    assert torch.isnan(h).all()


# ---- whiten at tiny scales ----

def test_whiten_is_scale_invariant_down_to_the_smallest_normal():
    """Power-of-two scales are exact, so w must be bitwise the same; the smallest scale puts every entry
    just above float32's smallest normal (2^-126)."""
    g = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.sign(g) * (1 + g.abs() % 1)  # |g| in [1, 2): every scaled entry stays normal
    w = diffkern.whiten(g)
    assert w.abs().max() > 0
    for k in (-125, -90, -40, 60, 126):
        assert torch.equal(diffkern.whiten(g * 2.0**k), w), k
    small = diffkern.whiten(g * 1e-30)
    assert torch.isfinite(small).all() and small.abs().max() > 0


def test_whiten_zero_and_nan_samples_follow_the_documented_policy():
    g = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    g[0] = 0.0
    g[2, 7] = float("nan")
    w = diffkern.whiten(g)
    assert (w[0] == 0).all() and torch.isfinite(w[1]).all() and torch.isnan(w[2]).any()
    assert torch.equal(w[1], diffkern.whiten(g[1:2])[0])


# ---- twoos_project: one NaN policy on every backend ----

@pytest.mark.parametrize("backend", backends_under_test("twoos_project"))
def test_twoos_project_nan_entries_stay_nan_and_out_of_set_like_the_reference(backend):
    """NaN (either sign) ranks above every number and stays NaN; every other entry equals the float64
    reference's (outputs are inputs or band edges: no arithmetic). 16 tiles of 4 (a quarter of the interpreter's
    column programs of 4 tiles of 16): every number is in its band after 2 of the 4 clipping passes, and the
    last 2 clip with only the NaNs outside."""
    M, D = 16, 4
    x = 1.5 * torch.randn(2, M * D, generator=torch.Generator().manual_seed(3))
    x[0, 19] = float("nan")
    x[1, 0] = -float("nan")
    x[1, 34] = float("nan")
    lower, upper = (b.float() for b in diffkern.twoos_bands(M, D, alpha=0.3))
    dev = device_for(backend)
    with forced(backend):
        out, in_set = torch.ops.diffkern.twoos_project(x.to(dev), lower.to(dev), upper.to(dev), 4)
    ref, ref_in = ntrk_reference.twoos_project(x.double(), lower.double(), upper.double(), 4)
    out = out.cpu().double()
    assert torch.equal(out.isnan(), x.isnan())
    assert torch.equal(out.nan_to_num(), ref.float().double().nan_to_num())
    assert torch.equal((in_set.cpu().double() * M * D).round(), (ref_in * M * D).round())
    assert (in_set < 1).all()


def test_twoos_project_rejects_a_nan_band_table():
    lower, upper = (b.float().clone() for b in diffkern.twoos_bands(4, 16))
    upper[2, 3] = float("nan")
    with pytest.raises(ValueError, match="bands .* must not hold NaN"):
        diffkern.twoos_project(torch.randn(1, 64), bands=(lower, upper))


# ---- flow_sde_step: the first call of a process equals the later ones ----

FIRST_CALL = textwrap.dedent("""
    import threading
    import torch, diffkern
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    bad = []

    def step(x, v, s, eps):
        return torch.ops.diffkern.flow_sde_step(x, v, s, s - 0.1, eps, 0, 0.98)

    def in_fresh_thread(*args):  # a new thread's first call, as a fresh process's
        box = []
        t = threading.Thread(target=lambda: box.append(step(*args)))
        t.start()
        t.join()
        return box[0]

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        s = torch.tensor([0.9, 0.7, 0.5, 0.3], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        for trial, D in enumerate((969, 4 * 16384 + 77, *range(1000, 1160, 8))):
            x, v, eps = (torch.randn(4, D, generator=g).to(dtype) for _ in range(3))
            first = step(x, v, s, eps) if trial < 2 else in_fresh_thread(x, v, s, eps)
            for again in (step(x, v, s, eps), step(x, v, s, eps)):
                if not all(torch.equal(a, b) for a, b in zip(first, again)):
                    bad.append((str(dtype), D))
    print("BAD", bad)
""")


def test_flow_sde_step_first_call_in_a_fresh_process_is_bitwise_reproducible():
    """Each dtype's first call in a fresh process, then 20 first calls in fresh threads (the thread-local
    row buffers were the cause: 24 of 40 such calls differed in the last bits before the fix)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    run = subprocess.run([sys.executable, "-c", FIRST_CALL], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "BAD []" in run.stdout, run.stdout
