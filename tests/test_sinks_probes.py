"""The paper's probes: each row's top-p from the fused forward (row_top), the statistics built on it (top_k_conc,
max_act, the sink's position class) and the anti-sink control, on every backend against the explicit matrix."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import diffkern
from diffkern.sinks import reference
from diffkern.testing.backends import device_for, forced
from diffkern.testing.numerics import assert_close_to_oracle

from test_sinks import BACKENDS, assert_corrected_output_close, attention_oracle, ids, make_qkv, oracle, params, \
    suppressed_mass

# (B, H, N_q, N_k, head_dim, n_query): fewer keys than row_top; one query; odd sizes past one tile.
SHAPES = ((1, 2, 9, 3, 16, 6), (2, 1, 1, 7, 16, 1), (1, 2, 70, 67, 64, 66))


def explicit_probs(q, k):
    """P [B, H, N_q, N_k], the whole softmax matrix in q's (float64) dtype."""
    return torch.softmax(reference.logits(q, k, q.shape[-1] ** -0.5), -1)


def explicit_top(p, r):
    """Each row's r largest P_ij by a full descending sort, zero-padded past N_k."""
    top = p.sort(-1, descending=True).values[..., :r]
    return torch.cat([top, top.new_zeros((*top.shape[:-1], r - top.shape[-1]))], -1)


@pytest.mark.parametrize("row_top", (1, 5, 8))
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("backend,dtype", params((torch.float32, torch.bfloat16)))
def test_row_top_p_equals_explicit_sorted_rows(backend, dtype, shape, row_top):
    B, H, N_q, N_k, d, n = shape
    q, k, v = make_qkv(B, H, N_q, N_k, d, dtype, seed=4, planted=1, device=device_for(backend), bnhd=True)
    with forced(backend):
        got = torch.ops.diffkern.sink_attention_fwd(q, k, v, n, d ** -0.5, row_top)
    (want,), (spread,) = attention_oracle(lambda q, k, v: [explicit_top(explicit_probs(q, k), row_top)], q, k, v)
    plain = explicit_top(explicit_probs(q.cpu(), k.cpu()), row_top)
    assert got[4].dtype == (torch.float32 if dtype != torch.float64 else dtype)
    assert_close_to_oracle(got[4], want, plain, "top_p", spread)
    if N_k < row_top:
        assert (got[4][..., N_k:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_probabilities_count_separately(backend):
    """Zero queries give every key the probability 1/N_k: a 3-way tie fills three slots, then zeros."""
    q, k, v = make_qkv(1, 2, 4, 3, 16, torch.float32, device=device_for(backend))
    with forced(backend):
        top = torch.ops.diffkern.sink_attention_fwd(torch.zeros_like(q), k, v, 4, 0.25, 5)[4].cpu()
    want = torch.tensor([1 / 3] * 3 + [0.0] * 2).expand(1, 2, 4, 5)
    torch.testing.assert_close(top, want, rtol=2 ** -22, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_top_zero_is_the_plain_forward(backend):
    q, k, v = make_qkv(1, 2, 37, 45, 64, torch.float32, device=device_for(backend))
    with forced(backend):
        plain = torch.ops.diffkern.sink_attention_fwd(q, k, v, 30, 0.125)
        with_top = torch.ops.diffkern.sink_attention_fwd(q, k, v, 30, 0.125, 5)
    assert plain[4].shape == (1, 2, 37, 0)
    assert all(torch.equal(a, b) for a, b in zip(plain[:4], with_top[:4]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_query_row_makes_its_top_p_nan(backend):
    """NaN policy: a NaN reaches its row's probabilities (as its lse), and only that row."""
    q, k, v = make_qkv(1, 2, 9, 11, 16, torch.float32, device=device_for(backend))
    q[0, 1, 4, 3] = float("nan")
    with forced(backend):
        top = torch.ops.diffkern.sink_attention_fwd(q, k, v, 9, 0.25, 5)[4].cpu()
    nan = torch.zeros(1, 2, 9, 5, dtype=torch.bool)
    nan[0, 1, 4] = True
    assert torch.equal(top.isnan(), nan)


def placed_sinks(H, N_q, N_k, n_query, places, dtype, device, seed=0):
    """q, k, v with one planted sink per head h at key places[h] (a strong shared direction)."""
    g = torch.Generator().manual_seed(seed)
    d = 16
    q, k, v = (torch.randn(2, H, n, d, generator=g) for n in (N_q, N_k, N_k))
    u = torch.randn(d, generator=g)
    q += 2.0 * u / u.norm()
    for h, j in enumerate(places):
        k[:, h, j] = 3.0 * u / u.norm() * d ** 0.5 / 2
    return [x.to(device, dtype) for x in (q, k, v)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_paper_statistics_equal_explicit_matrix(backend):
    """top_k_conc (mean over image rows of the sum of each row's 5 largest P), max_act (mean over b, h of the
    largest P of any image row) and the sink's position class, against the float64 matrix; one head's sink at
    index 0, one in the image, one in the text."""
    H, N_q, N_k, n = 3, 23, 29, 17
    q, k, v = placed_sinks(H, N_q, N_k, n, (0, 9, 25), torch.float32, device_for(backend))
    with forced(backend):
        _, stats = diffkern.sink_attention(q, k, v, k_sink=1, n_query=n, return_stats=True)

    def explicit(q, k, v):
        p = explicit_probs(q, k)[:, :, :n]
        return p.sort(-1, descending=True).values[..., :5].sum(-1).mean(), p.amax((-1, -2)).mean()
    (conc, act), spreads = attention_oracle(explicit, q, k, v)
    plain = explicit(q.cpu(), k.cpu(), v.cpu())
    assert_close_to_oracle(stats["top_k_conc"].cpu(), conc, plain[0], "top_k_conc", spreads[0])
    assert_close_to_oracle(stats["max_act"].cpu(), act, plain[1], "max_act", spreads[1])
    sink = explicit_probs(*oracle(q, k))[:, :, :n].mean(2).argmax(-1)
    assert sink[0].tolist() == [0, 9, 25]
    for name, where in (("sink_at_index0", sink == 0), ("sink_in_image", (sink > 0) & (sink < n)),
                        ("sink_in_text", sink >= n)):
        assert torch.equal(stats[name].cpu(), where.float().mean()) and abs(stats[name].item() - 1 / 3) < 1e-6, name
    # the column-mass concentration is a different quantity from the paper's row concentration
    assert abs(stats["top5_mass"].item() - stats["top_k_conc"].item()) > 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_conc_is_one_with_fewer_than_five_keys(backend):
    q, k, v = make_qkv(2, 2, 6, 3, 16, torch.float32, seed=2, device=device_for(backend))
    with forced(backend):
        stats = diffkern.sink_attention(q, k, v, mode="measure", return_stats=True)[1]
    assert abs(stats["top_k_conc"].item() - 1.0) < 1e-6
    assert stats["sink_in_text"].item() == 0  # n_query = N_q: no key is a text key past the image tokens


def explicit_anti_sink(q, k, k_sink, n):
    """The anti-sink control's keys [B, 1, K]: the image tokens of largest mean_h max_j P (float64 matrix)."""
    r = explicit_probs(*oracle(q, k))[:, :, :n].amax(-1).mean(1, keepdim=True)
    return r.sort(dim=-1, descending=True, stable=True).indices[..., :min(k_sink * q.shape[1], n)]


@pytest.mark.parametrize("shape", ((2, 3, 41, 53, 64, 35), (1, 2, 1, 3, 16, 1), (1, 2, 9, 9, 16, 9)), ids=ids)
@pytest.mark.parametrize("backend", BACKENDS)
def test_anti_sink_selects_the_explicit_image_tokens(backend, shape):
    B, H, N_q, N_k, d, n = shape
    q, k, v = make_qkv(B, H, N_q, N_k, d, torch.float32, seed=5, planted=1, device=device_for(backend))
    with forced(backend):
        out, stats = diffkern.sink_attention(q, k, v, k_sink=2, mode="anti_sink", n_query=n, return_stats=True)
        out_no_stats = diffkern.sink_attention(q, k, v, k_sink=2, mode="anti_sink", n_query=n)  # row_top = 1
    want = explicit_anti_sink(q, k, 2, n)
    assert torch.equal(stats["indices"].cpu(), want)
    assert (want < n).all()
    mbar = explicit_probs(*oracle(q, k))[:, :, :n].mean(2).mean(1, keepdim=True)
    torch.testing.assert_close(stats["index_mass"].cpu().double(), torch.gather(mbar, -1, want), rtol=1e-5, atol=1e-7)
    assert torch.equal(out_no_stats, out), "the row maxima of row_top = 1 select the same tokens"


@pytest.mark.parametrize("row_scope", ("image", "all"))
@pytest.mark.parametrize("backend,dtype", params((torch.float32, torch.bfloat16)))
def test_anti_sink_output_matches_explicit_masked_reference(backend, dtype, row_scope):
    B, H, N_q, N_k, n, d = 2, 2, 37, 45, 30, 64
    q, k, v = make_qkv(B, H, N_q, N_k, d, dtype, seed=6, planted=1, device=device_for(backend))
    with forced(backend):
        out, stats = diffkern.sink_attention(q, k, v, k_sink=2, mode="anti_sink", row_scope=row_scope, n_query=n,
                                             return_stats=True)
    idx = explicit_anti_sink(q, k, 2, n)
    assert torch.equal(stats["indices"].cpu(), idx)
    rows = n if row_scope == "image" else N_q
    (want, _), spreads = attention_oracle(
        lambda *x: reference.sink_suppress(*x, None, None, idx, rows, d ** -0.5, -1e4), q, k, v)
    plain = reference.sink_suppress(*[t.cpu() for t in (q, k, v)], None, None, idx, rows, d ** -0.5, -1e4)[0]
    assert_corrected_output_close(out, want, plain, spreads[0], suppressed_mass(q, k, idx, rows))


class _FwdCalls(TorchDispatchMode):
    """Records the row_top of every diffkern::sink_attention_fwd call."""

    def __init__(self):
        super().__init__()
        self.row_top = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.diffkern.sink_attention_fwd.default:
            self.row_top.append(args[5] if len(args) > 5 else (kwargs or {}).get("row_top", 0))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode,stats,row_top", (("per_head", False, 0), ("measure", False, 0), ("per_head", True, 5),
                                                ("anti_sink", False, 1), ("anti_sink", True, 5)))
def test_row_top_is_asked_for_only_when_needed(mode, stats, row_top):
    q, k, v = make_qkv(1, 2, 9, 11, 16, torch.float32)
    with forced("cpu"), _FwdCalls() as calls:
        diffkern.sink_attention(q, k, v, mode=mode, return_stats=stats)
    assert calls.row_top == [row_top]


@pytest.mark.parametrize("row_top", (-1, 9))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_row_top_raises_value_error(backend, row_top):
    q, k, v = make_qkv(1, 2, 9, 11, 16, torch.float32, device=device_for(backend))
    match = rf"sink_attention: row_top must be in \[0, 8\], got {row_top}"
    with forced(backend), pytest.raises(ValueError, match=match):
        torch.ops.diffkern.sink_attention_fwd(q, k, v, 9, 0.25, row_top)
    with FakeTensorMode(allow_non_fake_inputs=True) as fake, pytest.raises(ValueError, match=match):
        torch.ops.diffkern.sink_attention_fwd(*(fake.from_tensor(x.cpu()) for x in (q, k, v)), 9, 0.25, row_top)


@pytest.mark.parametrize("backend", BACKENDS)
def test_anti_sink_needs_every_image_token_as_a_key(backend):
    q, k, v = make_qkv(1, 2, 9, 5, 16, torch.float32, device=device_for(backend))
    with forced(backend), pytest.raises(ValueError, match=r"sink_attention: mode 'anti_sink' .* needs N_k >= "
                                                          r"n_query, got N_k = 5, n_query = 6"):
        diffkern.sink_attention(q, k, v, mode="anti_sink", n_query=6)
