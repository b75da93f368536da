"""diffkern.sink_attention_given (torch.ops.diffkern.sink_attention_given): attention with keys known before the call
suppressed in one biased flash forward, on every backend against the explicit masked matrix in float64."""
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import diffkern
from diffkern.sinks import reference
from diffkern.testing.backends import backends_under_test, device_for, forced, supports
from diffkern.testing.numerics import assert_close_to_oracle
from test_extreme_values import dominant_sink_qkv
from test_sinks import assert_corrected_output_close, attention_oracle, make_qkv, suppressed_mass

BACKENDS = backends_under_test("sink_attention_given")


def given_oracle(q, k, v, idx, rows, bias=-1e4):
    """(float64 out, its spread, the out in q's dtype) of the explicit masked matrix (reference.sink_suppress, the
    existing op's oracle, on a set of distinct keys)."""
    (want, _), spreads = attention_oracle(
        lambda *x: reference.sink_suppress(*x, None, None, idx.cpu(), rows, q.shape[-1] ** -0.5, bias), q, k, v)
    plain = reference.sink_suppress(*(t.cpu() for t in (q, k, v)), None, None, idx.cpu(), rows, q.shape[-1] ** -0.5,
                                    bias)[0]
    return want, spreads[0], plain


# (B, H, N_q, N_k, head_dim, n_query, row_scope, indices): odd sizes, head_dim 40 (padded to 64), the first and the
# last key, k = 1 and k = 5, per head [B, H, K] and per sample [B, K]; N_k below N_q at head_dim 72 with text rows.
CASES = (
    (1, 2, 45, 77, 40, 33, "image", [[[0], [76]]]),
    (2, 2, 37, 45, 64, 30, "all", [[0, 44, 7, 20, 3], [44, 1, 2, 9, 0]]),
    (2, 1, 99, 50, 72, 97, "image", [[[49, 0, 13, 26, 31]], [[5, 6, 7, 8, 49]]]),
)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_masked_reference(backend, dtype, case):
    if not supports(backend, dtype):
        pytest.skip(f"{backend} has no {dtype}")
    B, H, N_q, N_k, d, n, row_scope, indices = CASES[case]
    q, k, v = make_qkv(B, H, N_q, N_k, d, dtype, seed=case, planted=1, device=device_for(backend), bnhd=True)
    idx = torch.tensor(indices, device=q.device)
    with forced(backend), torch.no_grad():
        out = diffkern.sink_attention_given(q, k, v, idx, row_scope=row_scope, n_query=n)
    assert out.dtype == dtype and out.shape == q.shape
    want, spread, plain = given_oracle(q, k, v, idx.view(B, -1, idx.shape[-1]), n if row_scope == "image" else N_q)
    assert_close_to_oracle(out, want, plain, "out", spread)


@pytest.mark.parametrize("bias", (-1e4, -math.inf))
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_key_of_a_head_given_keeps_its_unmasked_attention(backend, bias):
    """Head 0 lists every key (with a duplicate: a key listed twice is suppressed once), head 1 all but key 2: head
    0's rows keep plain attention (the bias cancels; -inf gives no NaN), head 1's rows attend to key 2 alone."""
    q, k, v = make_qkv(1, 2, 9, 5, 16, torch.float32, seed=3, device=device_for(backend))
    idx = torch.tensor([[[4, 0, 1, 3, 2], [0, 1, 3, 4, 4]]], device=q.device)
    with forced(backend):
        out = diffkern.sink_attention_given(q, k, v, idx, row_scope="all", bias=bias)
    plain = torch.softmax(reference.logits(q.double(), k.double(), 0.25), -1) @ v.double()
    torch.testing.assert_close(out[:, 0].double(), plain[:, 0], rtol=0, atol=1e-5)
    if bias == -math.inf:
        torch.testing.assert_close(out[0, 1], v[0, 1, 2].expand(9, 16), rtol=0, atol=1e-6)
    assert not out.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_on_every_key_of_the_first_key_tiles(backend):
    """bias -inf on keys 0..69 of 80: a row's first key tiles (64 or 32 keys wide) hold no finite logit, and the
    online softmax must not turn their -inf max into NaN; the rows attend to keys 70..79 alone."""
    q, k, v = make_qkv(1, 2, 9, 80, 16, torch.float32, seed=7, device=device_for(backend))
    idx = torch.arange(70, device=q.device)[None]
    with forced(backend):
        out = diffkern.sink_attention_given(q, k, v, idx, row_scope="all", bias=-math.inf)
    want, spread, plain = given_oracle(q, k, v, idx[:, None], 9, -math.inf)
    assert_close_to_oracle(out, want, plain, "out", spread)


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_indices_equal_the_distinct_set(backend):
    q, k, v = make_qkv(1, 2, 11, 13, 16, torch.float32, seed=4, device=device_for(backend))
    with forced(backend):
        twice = diffkern.sink_attention_given(q, k, v, torch.tensor([[3, 3, 7, 0]], device=q.device))
        once = diffkern.sink_attention_given(q, k, v, torch.tensor([[3, 7, 0]], device=q.device))
    torch.testing.assert_close(twice, once, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_sink_attention_on_the_keys_it_selected(backend):
    """Given the keys sink_attention selected (per head, head-union), the output is the same masked attention:
    sink_attention corrects the unmasked output (its rows' errors amplified up to 1 / (1 - their suppressed share),
    assert_corrected_output_close) and this path computes the masked softmax directly."""
    q, k, v = make_qkv(2, 2, 37, 45, 64, torch.float32, seed=1, planted=1, device=device_for(backend))
    for mode, row_scope in (("per_head", "image"), ("head_union", "all")):
        with forced(backend):
            out, stats = diffkern.sink_attention(q, k, v, k_sink=2, mode=mode, row_scope=row_scope, n_query=30,
                                                 return_stats=True)
            given = diffkern.sink_attention_given(q, k, v, stats["indices"], row_scope=row_scope, n_query=30)
        rows = 30 if row_scope == "image" else 37
        want, spread, plain = given_oracle(q, k, v, stats["indices"], rows)
        assert_close_to_oracle(given, want, plain, "given", spread)
        assert_corrected_output_close(out, want, plain, spread, suppressed_mass(q, k, stats["indices"].cpu(), rows))


def test_rows_sink_attention_recomputes_are_bit_identical_on_cpu():
    """Where sink_attention recomputes a row as the masked softmax (the dominant sink's rows) the C++ kernels run
    the same blocked computation (sinks.cpp biased_softmax, the same 64-row blocks): the same bits."""
    q, k, v = dominant_sink_qkv(torch.float32, "cpu", seed=2)
    n = 60
    with forced("cpu"):
        out, stats = diffkern.sink_attention(q, k, v, k_sink=1, n_query=n, return_stats=True)
        given = diffkern.sink_attention_given(q, k, v, stats["indices"], n_query=n)
    p0 = torch.softmax(reference.logits(q.double(), k.double(), 0.25), -1)[..., 0]
    recomputed = p0 > 1 - reference.recompute_below(q.dtype)
    recomputed[:, :, n:] = False
    assert recomputed.any() and (stats["indices"] == 0).all()
    assert torch.equal(given[recomputed], out[recomputed])


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_intervention_and_no_keys(backend):
    """intervention "scale" is the bias log alpha; K = 0 suppresses nothing (plain attention)."""
    q, k, v = make_qkv(1, 2, 9, 11, 16, torch.float32, seed=6, device=device_for(backend))
    idx = torch.tensor([[[2, 5], [0, 10]]], device=q.device)
    with forced(backend):
        scaled = diffkern.sink_attention_given(q, k, v, idx, intervention="scale", alpha=0.25)
        biased = diffkern.sink_attention_given(q, k, v, idx, bias=math.log(0.25))
        none = diffkern.sink_attention_given(q, k, v, idx[..., :0])
    torch.testing.assert_close(scaled, biased, rtol=0, atol=0)
    plain = torch.softmax(reference.logits(q.double(), k.double(), 0.25), -1) @ v.double()
    torch.testing.assert_close(none.double(), plain.to(none.device), rtol=0, atol=1e-5)


BAD = {
    "idx out of range": (dict(idx=torch.tensor([[3, 11]])), ValueError, r"idx values must be in \[0, N_k\)"),
    "negative index": (dict(idx=torch.tensor([[-1, 2]])), ValueError, r"idx values must be in \[0, N_k\)"),
    "int32 idx": (dict(idx=torch.tensor([[3]], dtype=torch.int32)), ValueError, "idx must be an int64"),
    "4-d idx": (dict(idx=torch.zeros(1, 2, 1, 1, dtype=torch.int64)), ValueError, "idx must be an int64"),
    "idx heads": (dict(idx=torch.zeros(1, 3, 1, dtype=torch.int64)), ValueError, r"G = 1 or H = 2"),
    "idx batch": (dict(idx=torch.zeros(2, 1, dtype=torch.int64)), ValueError, r"idx must be .* B = 1"),
    "idx device": (dict(idx=torch.zeros(1, 1, device="meta", dtype=torch.int64)), ValueError, "idx is on meta"),
    "idx list": (dict(idx=[[1]]), TypeError, "idx must be a torch.Tensor"),
    "value": (dict(intervention="value"), ValueError, "intervention 'value'"),
    "bias > 0": (dict(bias=1.0), ValueError, "bias must be <= 0"),
    "row_scope": (dict(row_scope="text"), ValueError, "row_scope must be one of"),
}


@pytest.mark.parametrize("name", BAD)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_naming_the_argument(backend, name):
    changes, error, match = BAD[name]
    q, k, v = make_qkv(1, 2, 9, 11, 16, torch.float32, device=device_for(backend))
    kw = dict(q=q, k=k, v=v, idx=torch.tensor([[1]], device=q.device))
    kw |= {n: x.to(q.device) if isinstance(x, torch.Tensor) and x.device.type != "meta" else x
           for n, x in changes.items()}
    with forced(backend), pytest.raises(error, match="sink_attention_given: .*" + match):
        diffkern.sink_attention_given(**kw)


def test_fake_rejects_bad_indices_while_tracing():
    q, k, v = make_qkv(1, 2, 9, 11, 16, torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, \
            pytest.raises(ValueError, match="sink_attention_given: idx must be"):
        torch.ops.diffkern.sink_attention_given(*(mode.from_tensor(x) for x in (q, k, v)),
                                                mode.from_tensor(torch.zeros(1, 3, 1, dtype=torch.int64)), 9, 0.25,
                                                -1e4)


def test_gradient_request_raises():
    q, k, v = make_qkv(1, 2, 9, 11, 16, torch.float32)
    with pytest.raises(RuntimeError, match="sink_attention_given is forward-only"):
        diffkern.sink_attention_given(q.requires_grad_(), k, v, torch.tensor([[1]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    q, k, v = make_qkv(1, 2, 9, 11, 64, torch.float32, device=device_for(backend), bnhd=True)
    with forced(backend):
        for idx, n_rows, bias in ((torch.tensor([[[4, 0]]]), 7, -1e4), (torch.tensor([[[1], [10]]]), 9, -math.inf)):
            torch.library.opcheck(torch.ops.diffkern.sink_attention_given.default,
                                  (q, k, v, idx.to(q.device), n_rows, 0.125, bias))


@pytest.mark.parametrize("backend,compiler", (("cpu", "inductor"), ("triton", "aot_eager")))
def test_torch_compile_fullgraph(backend, compiler):
    torch._dynamo.reset()
    q, k, v = make_qkv(2, 2, 9, 11, 64, torch.float32, planted=1, device=device_for(backend))
    idx = torch.tensor([[3, 0], [10, 4]], device=q.device)

    def step(q, k, v, idx):
        return diffkern.sink_attention_given(q, k, v, idx, n_query=7)
    with forced(backend):
        eager = step(q, k, v, idx)
        compiled = torch.compile(step, backend=compiler, fullgraph=True)(q, k, v, idx)
    torch.testing.assert_close(compiled, eager)
