"""Attention sinks as torch ops: argument errors, forward-only, opcheck, torch.compile."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import diffkern
from diffkern.testing.backends import backends_under_test, device_for, forced

from test_sinks import make_qkv

BACKENDS = backends_under_test("sink_attention_fwd")


def good(device="cpu"):
    q, k, v = make_qkv(1, 2, 9, 11, 64, torch.float32, device=device)
    return dict(q=q, k=k, v=v)


def edit(**changes):
    def build(device):
        kw = good(device)
        return kw | {k: f(kw) for k, f in changes.items()}
    return build


BAD_INPUTS = {
    "3-d q": (edit(q=lambda a: a["q"][0]), r"q must be \[B, H, N_q, head_dim\]"),
    "int q": (edit(q=lambda a: a["q"].long()), r"q dtype must be float16, bfloat16, float32 or float64"),
    "k dtype": (edit(k=lambda a: a["k"].half()), r"k dtype float16 differs from q dtype float32"),
    "k device": (edit(k=lambda a: a["k"].to("meta")), r"k is on meta"),
    "k heads": (edit(k=lambda a: a["k"][:, :1]), r"k has shape \[1, 1, 11, 64\] but q has shape \[1, 2, 9, 64\]"),
    "v keys": (edit(v=lambda a: a["v"][:, :, :5]), r"v has shape \[1, 2, 5, 64\] but k has shape \[1, 2, 11, 64\]"),
    "strided v": (edit(v=lambda a: torch.randn(1, 2, 11, 128, device=a["q"].device)[..., ::2]),
                  r"v must have unit stride in its last dim"),
    "no keys": (edit(k=lambda a: a["k"][:, :, :0], v=lambda a: a["v"][:, :, :0]), r"k must hold at least one key"),
    "n_query": (lambda device: good(device) | dict(n_query=10), r"n_query must be in \[1, N_q\] = \[1, 9\], got 10"),
    "scale": (lambda device: good(device) | dict(scale=-1.0), r"scale must be finite and > 0"),
}
ATTENTION_ONLY = {
    "mode": (lambda device: good(device) | dict(mode="top"), r"mode must be one of"),
    "row_scope": (lambda device: good(device) | dict(row_scope="text"), r"row_scope must be one of"),
    "k_sink": (lambda device: good(device) | dict(k_sink=-1), r"k_sink must be an int >= 0"),
    "bias": (lambda device: good(device) | dict(bias=1.0), r"bias must be <= 0"),
    "random without seed": (lambda device: good(device) | dict(mode="random"), r"mode 'random' needs a seed"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS) + list(ATTENTION_ONLY))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_value_error_naming_the_argument(backend, name):
    build, match = {**BAD_INPUTS, **ATTENTION_ONLY}[name]
    with forced(backend), pytest.raises(ValueError, match="sink_attention: " + match):
        diffkern.sink_attention(**build(device_for(backend)))


@pytest.mark.parametrize("name", [n for n in BAD_INPUTS if n not in ("v keys", "strided v")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sink_mass_bad_input_raises_value_error(backend, name):
    build, match = BAD_INPUTS[name]
    kw = build(device_for(backend))
    kw.pop("v")
    with forced(backend), pytest.raises(ValueError, match="sink_mass: " + match):
        diffkern.sink_mass(**kw)


@pytest.mark.parametrize("name", [n for n in BAD_INPUTS if n != "k device"])
def test_bad_input_is_rejected_while_tracing(name):
    """The fake implementation (used by torch.compile) rejects the same inputs."""
    build, match = BAD_INPUTS[name]
    a = build("cpu")
    n, scale = a.get("n_query", 9), a.get("scale", 0.125)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, pytest.raises(ValueError, match=match):
        torch.ops.diffkern.sink_attention_fwd(*(mode.from_tensor(a[x]) for x in "qkv"), n, scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_suppress_rejects_out_of_range_indices(backend):
    kw = good(device_for(backend))
    with forced(backend):
        o, lse, *_ = torch.ops.diffkern.sink_attention_fwd(kw["q"], kw["k"], kw["v"], 9, 0.125)
        idx = torch.tensor([[[3, 11]]], device=o.device)
        with pytest.raises(ValueError, match=r"sink_attention: idx values must be in \[0, N_k\) = \[0, 11\)"):
            torch.ops.diffkern.sink_suppress(kw["q"], kw["k"], kw["v"], o, lse, idx, 9, 0.125, -1e4)
        with pytest.raises(ValueError, match=r"sink_attention: idx must be a contiguous int64 \[B, G, K\]"):
            torch.ops.diffkern.sink_suppress(kw["q"], kw["k"], kw["v"], o, lse, idx.int(), 9, 0.125, -1e4)


def test_triton_rejects_float64():
    kw = {k: t.double() for k, t in good(device_for("triton")).items()}
    with forced("triton"), pytest.raises(ValueError, match="triton backend .* float64"):
        diffkern.sink_attention(**kw)


def test_gradient_request_raises_a_clear_error():
    kw = good()
    kw["q"].requires_grad_()
    with pytest.raises(RuntimeError, match="sink_attention is forward-only"):
        diffkern.sink_attention(**kw)
    with torch.no_grad():
        assert not diffkern.sink_attention(**kw).requires_grad
    o = torch.ops.diffkern.sink_attention_fwd(kw["q"], kw["k"], kw["v"], 9, 0.125)[0]
    with pytest.raises(NotImplementedError, match="sink_attention_fwd is forward-only"):
        o.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    q, k, v = make_qkv(1, 2, 9, 11, 64, torch.float32, device=device_for(backend), bnhd=True)
    with forced(backend):
        torch.library.opcheck(torch.ops.diffkern.sink_mass.default, (q, k, 7, 0.125))
        o, lse, mass, *_ = torch.ops.diffkern.sink_attention_fwd(q, k, v, 7, 0.125)
        torch.library.opcheck(torch.ops.diffkern.sink_attention_fwd.default, (q, k, v, 7, 0.125))
        for keys in (11, 3):  # each row's top-5 probabilities, past N_k too
            torch.library.opcheck(torch.ops.diffkern.sink_attention_fwd.default,
                                  (q, k[:, :, :keys], v[:, :, :keys], 7, 0.125, 5))
        torch.library.opcheck(torch.ops.diffkern.sink_topk.default, (mass, 3, True))
        for idx in (torch.tensor([[[4, 0]]]), torch.tensor([[[1], [10]]])):
            torch.library.opcheck(torch.ops.diffkern.sink_suppress.default,
                                  (q, k, v, o, lse, idx.to(q.device), 7, 0.125, -1e4))


@pytest.mark.parametrize("backend,compiler", (("cpu", "inductor"), ("triton", "aot_eager")))
def test_torch_compile_fullgraph(backend, compiler):
    torch._dynamo.reset()
    q, k, v = make_qkv(2, 2, 9, 11, 64, torch.float32, planted=1, device=device_for(backend))

    def step(q, k, v):
        out, stats = diffkern.sink_attention(q, k, v, k_sink=1, n_query=7, return_stats=True)
        return out, stats["indices"], stats["max_mass"]
    with forced(backend):
        eager = step(q, k, v)
        compiled = torch.compile(step, backend=compiler, fullgraph=True)(q, k, v)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)

