"""The sinks Triton kernels in the interpreter: awkward shapes against float64 under the bounds checker, the
pass that writes the output (each element once, corrected or recomputed), and every candidate launch
configuration. Outputs start as NaN (tests/conftest.py), so an unwritten element fails."""
import pytest
import torch

import diffkern
from diffkern import _autotune
from diffkern.sinks import reference
from diffkern.sinks import triton_kernels as tk
from diffkern.testing.numerics import assert_close_to_oracle
from diffkern.testing.triton_monitor import TritonMonitor
from test_extreme_values import dominant_sink_qkv
from test_sinks import assert_corrected_output_close, attention_oracle, explicit_selection, make_qkv, suppressed_mass

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreted launches run only without a GPU")

# (B, H, N_q, N_k, head_dim, n_query, row_scope): N_k above N_q, odd, head_dim 40 (padded to 64); N_k below
# N_q, head_dim 72 (padded to 128), text rows corrected too
AWKWARD = ((1, 2, 45, 77, 40, 33, "image"), (2, 1, 99, 50, 72, 97, "all"))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("shape", AWKWARD, ids=lambda s: "x".join(map(str, s)))
def test_awkward_shapes_match_float64_within_bounds(shape, dtype):
    B, H, N_q, N_k, d, n, row_scope = shape
    q, k, v = make_qkv(B, H, N_q, N_k, d, dtype, seed=5, planted=1)
    scale = d ** -0.5
    with diffkern.backend("triton"), TritonMonitor():
        got = torch.ops.diffkern.sink_attention_fwd(q, k, v, n, scale, 5)
        out, stats = diffkern.sink_attention(q, k, v, k_sink=2, n_query=n, row_scope=row_scope, return_stats=True)
    want, spreads = attention_oracle(lambda *x: reference.attention_fwd(*x, n, scale, 5), q, k, v)
    plain = reference.attention_fwd(q, k, v, n, scale, 5)
    for name, x, w, p, spread in zip(("o", "lse", "mass", "entropy", "top_p"), got, want, plain, spreads):
        assert_close_to_oracle(x, w, p, name, spread)
    idx = stats["indices"]
    rows = n if row_scope == "image" else N_q
    (want_out, _), out_spreads = attention_oracle(
        lambda *x: reference.sink_suppress(*x, None, None, idx, rows, scale, -1e4), q, k, v)
    plain_out = reference.sink_suppress(q, k, v, None, None, idx, rows, scale, -1e4)[0]
    assert_corrected_output_close(out, want_out, plain_out, out_spreads[0], suppressed_mass(q, k, idx, rows))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_suppression_writes_each_output_element_once(dtype):
    """The dominant sink: its rows are recomputed as the masked softmax and the others corrected, in one pass that
    stores each output element once (the recomputed rows are not written twice), and the answer is the masked
    reference's, with no NaN; rows past n_query keep the unmasked output."""
    # key 0 holds 1 - 1e-9 of two in three rows' mass and a quarter of the others': every suppress tile has rows
    # recomputed and rows corrected
    q, k, v = dominant_sink_qkv(dtype, "cpu", seed=1, n_q=77, d=24, sink_logit=60.0)
    n, scale = 70, 24 ** -0.5
    with diffkern.backend("triton"), TritonMonitor(by_tensor=True) as mon:
        out, stats = diffkern.sink_attention(q, k, v, k_sink=1, n_query=n, return_stats=True)
    idx = stats["indices"]
    assert (idx == 0).all()
    p0 = torch.softmax(reference.logits(q.double(), k.double(), scale), -1)[:, :, :n, 0]
    assert p0.max() > 1 - 1e-7 and (p0 < 1 - reference.recompute_below(dtype)).any(), "both kinds of rows"
    written = sum(r.stored_by.get("argument 'out_ptr'", 0) for r in mon.launches)
    assert written == out.numel() * out.element_size()
    (want, post), spreads = attention_oracle(
        lambda *x: reference.sink_suppress(*x, None, None, idx, n, scale, -1e4), q, k, v)
    plain, plain_post = reference.sink_suppress(q, k, v, None, None, idx, n, scale, -1e4)
    assert_close_to_oracle(out, want, plain, "out", spreads[0])
    assert_close_to_oracle(stats["top_sink_mass_after"], post.mean(), plain_post.float().mean(), "top_sink_mass_after",
                           spreads[1])


REDUCED_TILE = {"fwd_configs": "BLOCK_N", "col_mass_configs": "BLOCK_M", "suppress_configs": "BLOCK_N"}


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_every_candidate_configuration_is_correct_and_keeps_the_reduced_tile(monkeypatch, dtype):
    """Candidate i of every tuned kernel (the last one where a list is shorter) against float64: the selection
    equals the explicit reference's and the output meets the error model, so the candidates a GPU may pick are
    run here too (the interpreter otherwise runs only configs[0]). No candidate changes the tile of a reduced
    dimension (the keys per online-softmax step, the queries per column-sum step), so a row's or a column's
    terms are added in the same order whichever candidate the tuner picks."""
    for fn, tile in REDUCED_TILE.items():
        for d in (64, 128):
            configs = getattr(tk, fn)(d, dtype)
            assert {c.constexprs[tile] for c in configs} == {configs[0].constexprs[tile]}, (fn, d)
    B, H, N_q, N_k, d, n = 1, 2, 70, 67, 64, 60
    q, k, v = make_qkv(B, H, N_q, N_k, d, dtype, seed=2, planted=1)
    q = 1.5 * q  # some rows recomputed, some corrected
    scale = d ** -0.5
    want_idx = explicit_selection(q, k, "per_head", 1, n)
    (want, _), spreads = attention_oracle(
        lambda *x: reference.sink_suppress(*x, None, None, want_idx, n, scale, -1e4), q, k, v)
    plain = reference.sink_suppress(q, k, v, None, None, want_idx, n, scale, -1e4)[0]
    count = max(len(getattr(tk, fn)(d, dtype)) for fn in REDUCED_TILE)
    for i in range(count):
        monkeypatch.setattr(_autotune, "pick",
                            lambda name, key, configs, launch, kernel=None: configs[min(i, len(configs) - 1)])
        with diffkern.backend("triton"):
            out, stats = diffkern.sink_attention(q, k, v, k_sink=1, n_query=n, return_stats=True)
        assert torch.equal(stats["indices"], want_idx), f"candidate {i}"
        assert_corrected_output_close(out, want, plain, spreads[0], suppressed_mass(q, k, want_idx, n))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_row_top_when_later_key_tiles_hold_no_larger_logit(dtype):
    """Logits falling with the key index, with ties (keys 3-5 repeat key 2, and key 40 repeats key 4 in a later
    tile): after the first key tile no tile holds a logit above any row's 5th largest, so the forward skips
    their merge; the top-5 probabilities, ties counted separately, are still the reference's."""
    g = torch.Generator().manual_seed(4)
    B, H, N_q, N_k, d = 1, 2, 40, 100, 32
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    q = (torch.rand(B, H, N_q, 1, generator=g) + 1.0) * u + 0.01 * torch.randn(B, H, N_q, d, generator=g)
    k = (4.0 - 0.03 * torch.arange(N_k, dtype=torch.float32))[None, None, :, None] * u.expand(B, H, 1, d)
    k[:, :, 3:6] = k[:, :, 2:3]
    k[:, :, 40] = k[:, :, 4]
    v = torch.randn(B, H, N_k, d, generator=g)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    with diffkern.backend("triton"), TritonMonitor():
        got = torch.ops.diffkern.sink_attention_fwd(q, k, v, N_q, 1.0, 5)[4]
    (*_, want), spreads = attention_oracle(lambda *x: reference.attention_fwd(*x, N_q, 1.0, 5), q, k, v)
    plain = reference.attention_fwd(q, k, v, N_q, 1.0, 5)[4]
    assert_close_to_oracle(got, want, plain, "top_p", spreads[4])
