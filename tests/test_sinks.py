"""Attention sinks (diffkern.sink_mass, diffkern.sink_attention): every backend against the explicit matrix."""
import pytest
import torch

import diffkern
from diffkern.sinks import reference
from diffkern.testing.backends import backends_under_test, device_for, forced, supports
from diffkern.testing.numerics import assert_close_to_oracle, max_error, oracle_with_spread, tolerance

BACKENDS = backends_under_test("sink_attention_fwd")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# (B, H, N_q, N_k, head_dim, n_query): odd sizes inside one tile; one query and one key; just above a
# 64-wide tile in both directions at head_dim 128.
SHAPES = ((1, 2, 37, 45, 64, 30), (2, 1, 1, 1, 64, 1), (1, 1, 70, 67, 128, 66))
SUPPRESSING = ("per_head", "head_union", "bottom", "random")


def ids(shape):
    return "x".join(map(str, shape))


def params(dtypes=DTYPES):
    return [(b, dt) for b in BACKENDS for dt in dtypes if supports(b, dt)]


def make_qkv(B, H, N_q, N_k, d, dtype, seed=0, planted=0, device="cpu", bnhd=False):
    """q, k, v; `planted` > 0 plants that many sink keys per head (a shared direction every query leans
    towards, with head-dependent strength and position). bnhd gives diffusers' transposed views."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, d, generator=g) for n in (N_q, N_k, N_k))
    if planted:
        u = torch.randn(d, generator=g)
        u = u / u.norm()
        q += 2.0 * u
        for h in range(H):
            for r in range(planted):
                j = (7 * h + 3 * r + 1) % N_k
                k[:, h, j] = 3.0 * (1.0 + 0.3 * r + 0.1 * h) * u * d ** 0.5 / 2
    out = []
    for x in (q, k, v):
        x = x.to(device, dtype)
        out.append(x.transpose(1, 2).contiguous().transpose(1, 2) if bnhd else x)
    return out


def oracle(*tensors):
    return [t.detach().cpu().double() for t in tensors]


def attention_oracle(fn, q, k, v):
    """fn(q, k, v) in float64 with its error-model spreads; the fan-in of an attention output: the scores over
    head_dim, the softmax and P v over N_k, the mass over the N_q rows."""
    return oracle_with_spread(fn, [q, k, v], q.shape[-1] + k.shape[-2] + q.shape[-2], q.dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("backend,dtype", params())
def test_forward_outputs_match_float64_reference(backend, dtype, shape):
    B, H, N_q, N_k, d, n = shape
    q, k, v = make_qkv(B, H, N_q, N_k, d, dtype, device=device_for(backend), bnhd=True)
    with forced(backend):
        got = torch.ops.diffkern.sink_attention_fwd(q, k, v, n, 0.3)
        mass, lse = diffkern.sink_mass(q, k, n, 0.3)
    want, spreads = attention_oracle(lambda *x: reference.attention_fwd(*x, n, 0.3), q, k, v)
    plain = reference.attention_fwd(*[t.cpu() for t in (q, k, v)], n, 0.3)
    for name, x, w, p, spread in zip(("o", "lse", "mass", "entropy"), got, want, plain, spreads):
        assert_close_to_oracle(x, w, p, name, spread)
    assert_close_to_oracle(mass, want[2], plain[2], "sink_mass mass", spreads[2])
    assert_close_to_oracle(lse, want[1], plain[1], "sink_mass lse", spreads[1])


def explicit_selection(q, k, mode, k_sink, n):
    """The authors' way: the full float64 probability matrix, then sort."""
    mass = reference.sink_mass(*oracle(q, k), n, q.shape[-1] ** -0.5)[0]
    if mode == "per_head":
        return reference.sink_topk(mass, k_sink, True)
    return reference.sink_topk(mass.mean(1, keepdim=True), k_sink * q.shape[1], mode == "head_union")


@pytest.mark.parametrize("planted", (0, 2), ids=("random", "planted"))
@pytest.mark.parametrize("mode", ("per_head", "head_union", "bottom"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_selected_indices_equal_explicit_reference(backend, mode, planted):
    q, k, v = make_qkv(2, 3, 41, 53, 64, torch.float32, seed=3, planted=planted, device=device_for(backend))
    with forced(backend):
        _, stats = diffkern.sink_attention(q, k, v, k_sink=2, mode=mode, n_query=35, return_stats=True)
    want = explicit_selection(q, k, mode, 2, 35)
    assert torch.equal(stats["indices"].cpu(), want)
    if planted and mode == "per_head":
        assert {j for j in stats["indices"][0, 0].tolist()} == {1, 4}


def suppressed_mass(q, k, idx, rows):
    """max over corrected rows of sum_S P (unmasked, float64): how much the correction cancels."""
    p = torch.softmax(reference.logits(*oracle(q, k), q.shape[-1] ** -0.5), -1)[:, :, :rows]
    sel = reference.key_bias(idx, q.shape[1], k.shape[2], 1.0, p.dtype)
    return (p * sel).sum(-1).max().item() if rows else 0.0


def assert_corrected_output_close(out, want, plain, spread, suppressed):
    """The correction out = (o - w sum_S P v) / (1 - w sum_S P) divides the fp32 error of the unmasked o
    by 1 - sum_S P (documented in sink_attention), and rows where that is below recompute_below(dtype) are
    recomputed as the masked softmax: the model's accumulation term is scaled by the smaller of the two
    amplifications, unlike the explicit masked reference's."""
    assert not torch.isnan(out).any()
    amp = min(1.0 / (1.0 - suppressed), 1.0 / reference.recompute_below(out.dtype))
    tol = tolerance(out.dtype, want, plain, amp * spread)
    assert max_error(out, want) <= tol, f"out: error {max_error(out, want):.3e} > {tol:.3e} (amplification {amp:.1f})"


@pytest.mark.parametrize("row_scope", ("image", "all"))
@pytest.mark.parametrize("mode", SUPPRESSING)
@pytest.mark.parametrize("backend,dtype", params((torch.float32, torch.bfloat16)))
def test_suppressed_output_matches_explicit_masked_reference(backend, dtype, mode, row_scope, d=64):
    B, H, N_q, N_k, n = 2, 2, 37, 45, 30
    q, k, v = make_qkv(B, H, N_q, N_k, d, dtype, seed=1, planted=1, device=device_for(backend))
    with forced(backend):
        out, stats = diffkern.sink_attention(q, k, v, k_sink=2, mode=mode, row_scope=row_scope, n_query=n,
                                             seed=11, call_index=4, return_stats=True)
    idx = stats["indices"].cpu()
    rows = n if row_scope == "image" else N_q
    (want, post), spreads = attention_oracle(
        lambda *x: reference.sink_suppress(*x, None, None, idx, rows, d ** -0.5, -1e4), q, k, v)
    plain, plain_post = reference.sink_suppress(*[t.cpu() for t in (q, k, v)], None, None, idx, rows, d ** -0.5, -1e4)
    assert_corrected_output_close(out, want, plain, spreads[0], suppressed_mass(q, k, idx, rows))
    assert_close_to_oracle(stats["top_sink_mass_after"], post[:, :, :n].mean(), plain_post[:, :, :n].float().mean(),
                           "top_sink_mass_after", spreads[1])


@pytest.mark.parametrize("backend,dtype", params((torch.float16,)))
def test_suppressed_output_at_head_dim_128(backend, dtype):
    test_suppressed_output_matches_explicit_masked_reference(backend, dtype, "per_head", "image", d=128)


def strong_sink_qkv(dtype, device):
    """The GPU check's finding: B=1, H=2, N=20, d=64, key 0 half the direction every query leans towards:
    it holds 31-87% of each of the 16 image rows' mass (float64, seed 0)."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(64, generator=g)
    q, k, v = (torch.randn(1, 2, 20, 64, generator=g) for _ in range(3))
    q += u
    k[:, :, 0] = 0.5 * u
    return [x.to(device, dtype) for x in (q, k, v)]


@pytest.mark.parametrize("backend,dtype", params((torch.float32, torch.float64)))
def test_sink_holding_a_third_to_most_of_rows_meets_the_error_model(backend, dtype):
    """A corrected row amplifies the rounding of o, lse and the selected keys' logits by 1 / (1 - sum_S P),
    which the masked output does not have. With 32/64-bit outputs, rows past recompute_below(dtype) = 1/2 are
    recomputed, so the output meets the plain error model (no allowance for amplification; the GPU check's
    criterion). Recomputing only past 7/8, the CPU kernel missed it by 1.7x (fp32) and 1.3x (fp64) here."""
    q, k, v = strong_sink_qkv(dtype, device_for(backend))
    with forced(backend):
        out, stats = diffkern.sink_attention(q, k, v, k_sink=1, n_query=16, return_stats=True)
    idx = stats["indices"].cpu()
    assert (idx == 0).all()
    share = torch.softmax(reference.logits(*oracle(q, k), 64 ** -0.5), -1)[:, :, :16, 0]
    assert share.min() > 0.3 and share.max() < 0.9, "the sink holds 30-90% of every image row"
    assert (share < 0.5).any() and (share > 0.5).any(), "corrected and recomputed rows"
    (want, post), spreads = attention_oracle(
        lambda *x: reference.sink_suppress(*x, None, None, idx, 16, 64 ** -0.5, -1e4), q, k, v)
    plain, plain_post = reference.sink_suppress(*[t.cpu() for t in (q, k, v)], None, None, idx, 16, 64 ** -0.5, -1e4)
    assert_close_to_oracle(out, want, plain, "out", spreads[0])
    assert_close_to_oracle(stats["top_sink_mass_after"], post.mean(), plain_post.mean(), "top_sink_mass_after",
                           spreads[1])


@pytest.mark.parametrize("backend,dtype", params((torch.float32, torch.bfloat16)))
def test_measure_mode_is_bit_identical_to_unmasked_path(backend, dtype):
    q, k, v = make_qkv(1, 2, 37, 45, 64, dtype, planted=1, device=device_for(backend))
    with forced(backend):
        measured, stats = diffkern.sink_attention(q, k, v, mode="measure", return_stats=True)
        unmasked = diffkern.sink_attention(q, k, v, k_sink=0)
        o = torch.ops.diffkern.sink_attention_fwd(q, k, v, 37, 64 ** -0.5)[0]
    assert torch.equal(measured, unmasked) and torch.equal(measured, o.to(dtype))
    assert stats["indices"] is None and stats["top_sink_mass_after"] is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_match_explicit_matrix(backend):
    q, k, v = make_qkv(2, 3, 37, 45, 64, torch.float32, planted=2, device=device_for(backend))
    with forced(backend):
        _, stats = diffkern.sink_attention(q, k, v, k_sink=1, n_query=30, return_stats=True)
    names = ("max_mass", "index0_mass", "row_entropy", "top5_mass", "index_mass")
    indices = stats["indices"].cpu()

    def explicit(q, k, v):
        p = torch.softmax(reference.logits(q, k, 64 ** -0.5), -1)
        mass = p[:, :, :30].mean(2)
        return (mass.amax(-1).mean(), mass[..., 0].mean(), -(p * torch.log(p)).sum(-1)[:, :, :30].mean(),
                mass.sort(-1, descending=True).values[..., :5].sum(-1).mean(), torch.gather(mass, -1, indices))
    want, spreads = attention_oracle(explicit, q, k, v)
    plain = explicit(*[t.cpu() for t in (q, k, v)])
    for name, w, p, spread in zip(names, want, plain, spreads):
        assert_close_to_oracle(stats[name].cpu().reshape(w.shape), w, p, name, spread)
    chosen = want[-1]
    # under the -1e4 bias the top sink's mass drops by far more than 1e4x
    assert stats["top_sink_mass_after"].item() < chosen[..., 0].min().item() * 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_mode_is_reproducible_per_seed_call_and_sample(backend):
    """The draw (op._random_keys: tensor ops, every backend's) of 6 of 40 keys: two draws coincide with
    probability 1 / C(40, 6) ~ 3e-7 (and are seeded, so the asserts below hold or fail on every run alike)."""
    q, k, v = make_qkv(2, 2, 9, 40, 64, torch.float32, device=device_for(backend))

    def draw(seed, call):
        with forced(backend):
            return diffkern.sink_attention(q, k, v, k_sink=3, mode="random", seed=seed, call_index=call,
                                           return_stats=True)[1]["indices"].cpu()
    a = draw(5, 0)
    assert a.shape == (2, 1, 6) and torch.equal(a, draw(5, 0))
    assert not torch.equal(a, draw(5, 1)) and not torch.equal(a, draw(6, 0))
    assert not torch.equal(a[0], a[1])
    assert all(len(set(row.tolist())) == 6 for row in a[:, 0])


@pytest.mark.parametrize("bias", (-1e4, float("-inf")))
@pytest.mark.parametrize("backend", BACKENDS)
def test_row_with_every_key_suppressed_keeps_unmasked_attention(backend, bias):
    """head_union selects k_sink * H >= N_k keys: every key of every row, so the bias cancels."""
    q, k, v = make_qkv(1, 3, 10, 4, 64, torch.float32, device=device_for(backend))
    with forced(backend):
        out, stats = diffkern.sink_attention(q, k, v, k_sink=2, mode="head_union", bias=bias, return_stats=True)
        plain = diffkern.sink_attention(q, k, v, mode="measure")
    assert stats["indices"].shape == (1, 1, 4)
    torch.testing.assert_close(out, plain, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(stats["top_sink_mass_after"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_bias_equals_large_finite_bias(backend):
    q, k, v = make_qkv(1, 2, 37, 45, 64, torch.float32, planted=1, device=device_for(backend))
    with forced(backend):
        a = diffkern.sink_attention(q, k, v, k_sink=3, bias=-1e4)
        b = diffkern.sink_attention(q, k, v, k_sink=3, bias=float("-inf"))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_merges_chunks_and_breaks_ties_towards_lower_index(backend, largest=True):
    """1100 scores: the Triton kernel merges two 1024-wide sorts; equal scores keep index order."""
    g = torch.Generator().manual_seed(2)
    score = torch.rand(1, 1, 1100, generator=g)
    score[0, 0, [5, 700, 1099, 300]] = 2.0 if largest else -1.0  # a four-way tie at the top
    score[0, 0, [1050, 12]] = 1.5 if largest else -0.5
    with forced(backend):
        idx = torch.ops.diffkern.sink_topk(score.to(device_for(backend)), 20, largest).cpu()
    assert idx[0, 0, :6].tolist() == [5, 300, 700, 1099, 12, 1050]
    assert torch.equal(idx, reference.sink_topk(score.double(), 20, largest))


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts interpreted launches, which run only without a GPU")
def test_benchmark_traffic_model_equals_interpreter_counts():
    """The bytes and matrix-product FLOPs the benchmark models for each Triton kernel are those the kernels issue
    (statistics on: the
    forward stores each row's top-5), with the suppression's recomputed tiles (the planted sink holds nearly all
    of some rows' mass) counted apart."""
    from diffkern.bench.sinks import default_tiles, kernel_traffic, recompute_traffic
    from diffkern.sinks import triton_kernels as tk
    from diffkern.sinks.op import STATS_ROW_TOP
    from diffkern.testing.triton_monitor import TritonMonitor
    B, H, N_q, N_k, d, n = 1, 2, 70, 67, 64, 60
    q, k, v = make_qkv(B, H, N_q, N_k, d, torch.bfloat16, planted=1)
    q = 1.5 * q  # sharper rows: the sink holds over 1 - recompute_below(bf16) of the mass in ~1 of 6
    with diffkern.backend("triton"), TritonMonitor(check_bounds=False) as mon:
        _, stats = diffkern.sink_attention(q, k, v, k_sink=1, n_query=n, return_stats=True)
    counted = mon.by_kernel()
    tiles = default_tiles(d, torch.bfloat16)
    model = kernel_traffic(N_q, N_k, d, n, 1, n, 2, tiles, tk.SEL_BLOCK, tk.topk_config(1, N_k)[:2], STATS_ROW_TOP)
    bm = tiles["suppress_kernel"][0]
    # suppress_kernel's tiles holding a row whose selected key has more than 1 - recompute_below(bf16) of its
    # mass (float64)
    p = torch.softmax(reference.logits(*oracle(q, k), d ** -0.5), -1)[:, :, :n]
    sel = torch.gather(p, -1, stats["indices"][:, :, None, :].expand(B, H, n, 1))[..., 0]
    redo = torch.nn.functional.pad(sel > 1 - reference.recompute_below(torch.bfloat16), (0, -n % bm)).view(B, H, -1, bm)
    flagged = [recompute_traffic(int(redo[b, h, t].sum()), N_k, d, 2, tiles["suppress_kernel"])
               for b, h, t in redo.any(-1).nonzero().tolist()]
    assert flagged, "the planted sink must make some tile recompute"
    assert not redo.all(), "and some tile correct its rows"
    for kind in ("loaded", "stored", "flops"):
        model["suppress_kernel"][kind] += sum(tile[kind] for tile in flagged) / (B * H)
    assert set(counted) == set(model)
    for name, m in model.items():
        assert (counted[name]["bytes_loaded"], counted[name]["bytes_stored"], counted[name]["flops"]) == (
            m["loaded"] * B * H, m["stored"] * B * H, m["flops"] * B * H), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts interpreted launches, which run only without a GPU")
def test_given_keys_traffic_model_equals_interpreter_counts():
    """sink_attention_given launches one kernel, which issues the bytes and matrix-product FLOPs the benchmark
    models for it (given_traffic)."""
    from diffkern.bench.sinks import given_traffic
    from diffkern.sinks import triton_kernels as tk
    from diffkern.testing.triton_monitor import TritonMonitor
    B, H, N_q, N_k, d, n = 1, 2, 70, 67, 64, 60
    q, k, v = make_qkv(B, H, N_q, N_k, d, torch.bfloat16, planted=1)
    with diffkern.backend("triton"), TritonMonitor(check_bounds=False) as mon:
        diffkern.sink_attention_given(q, k, v, torch.tensor([[3, 0]]), n_query=n)
    counted = mon.by_kernel()
    tile = tk.given_configs(d, torch.bfloat16)[0].constexprs
    model = given_traffic(N_q, N_k, d, 2, (tile["BLOCK_M"], tile["BLOCK_N"]))
    assert set(counted) == {"attn_fwd_kernel"}
    c = counted["attn_fwd_kernel"]
    assert (c["bytes_loaded"], c["bytes_stored"], c["flops"]) == (
        model["loaded"] * B * H, model["stored"] * B * H, model["flops"] * B * H)


def test_modeled_given_keys_path_is_one_flash_forward_at_sd3_shapes():
    """Keys known before the call: the FLOPs of one flash forward and within 1% of its predicted H100 time."""
    from diffkern.bench.sinks import modeled_given_rows
    for r in modeled_given_rows((4096,), K=1) + modeled_given_rows((4096,), K=120):
        assert r["flops_ratio"] == 1.0 and r["h100_us"] <= 1.01 * r["plain_h100_us"], r


def test_modeled_flops_stay_under_1_6x_flash_at_sd3_shapes():
    """The issue's bar, on the model the test above holds to the kernels: SD3 at 1024 px (4096 image +
    333 text tokens), per-head k in {1, 5} and head-union k = 5 (120 keys); head-union k = 50 exceeds it."""
    from diffkern.bench.sinks import modeled_rows
    rows = modeled_rows((4096,), K=1) + modeled_rows((4096,), K=5) + modeled_rows((4096,), K=120)
    assert all(1.4 < r["flops_ratio"] <= 1.6 for r in rows), [r["flops_ratio"] for r in rows]
    assert modeled_rows((4096,), K=1200)[0]["flops_ratio"] > 1.6


def test_random_mode_draws_uniform_key_sets():
    """The random control set (Philox words by tensor ops, the K smallest): over 3000 calls each key is
    chosen K / N_k of the time and each unordered pair equally often (chi-square, seeded: deterministic)."""
    from scipy import stats

    from diffkern.sinks.op import _random_keys
    n_keys, K, calls = 7, 2, 3000
    idx = torch.cat([_random_keys(2, n_keys, K, 11, c, "cpu")[:, 0] for c in range(calls)])  # [2 * calls, K]
    assert all(len(set(row.tolist())) == K for row in idx)
    per_key = torch.bincount(idx.flatten(), minlength=n_keys).double()
    pairs = torch.bincount(idx.min(1).values * n_keys + idx.max(1).values, minlength=n_keys * n_keys).double()
    pairs = pairs[pairs > 0]
    assert len(pairs) == n_keys * (n_keys - 1) // 2
    assert stats.chisquare(per_key.numpy()).pvalue > 1e-3 and stats.chisquare(pairs.numpy()).pvalue > 1e-3
