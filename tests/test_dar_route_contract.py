"""DAR routing as a torch op: argument errors, opcheck, torch.compile, backend switch."""
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import diffkern
from diffkern.dar.reference import dar_route_reference
from diffkern.testing.backends import backends_under_test, device_for, forced
from diffkern.testing.compiled import assert_compiled_matches_eager
from diffkern.testing.numerics import assert_close_to_oracle

from test_dar_route import make_inputs, route_oracle

BACKENDS = backends_under_test("dar_route_fwd")

B, T, D = 2, 3, 8


def good(device="cpu"):
    sources, q, gain = make_inputs(B, T, D, 3, torch.float32, "static", device=device)
    return [x.detach() for x in sources], q.detach(), gain.detach(), 1e-6


def case(edit):
    def build(device):
        sources, q, gain, eps = good(device)
        return edit(sources, q, gain, eps)
    return build


BAD_INPUTS = {
    "no sources": (case(lambda s, q, g, e: ([], q, g, e)), r"sources must hold at least one tensor"),
    "2-d source": (case(lambda s, q, g, e: ([s[0], s[1][0]], q, g, e)), r"sources\[1\] must be \[B, T, d\]"),
    "shape mismatch": (case(lambda s, q, g, e: ([s[0], s[1][:, :2]], q, g, e)), r"sources\[1\] has shape \[2, 2, 8\]"),
    "int dtype": (case(lambda s, q, g, e: ([x.long() for x in s], q, g, e)), r"sources\[0\] dtype must be float16"),
    "dtype mismatch": (case(lambda s, q, g, e: ([s[0], s[1].double()], q, g, e)), r"sources\[1\] dtype float64 differs"),
    "device mismatch": (case(lambda s, q, g, e: ([s[0], s[1].to("meta")], q, g, e)), r"sources\[1\] is on meta"),
    "strided d": (case(lambda s, q, g, e: ([s[0], torch.randn(B, T, 2 * D, device=q.device)[..., ::2]], q, g, e)),
                  r"sources\[1\] must have unit stride in its last dim"),
    "q shape": (case(lambda s, q, g, e: (s, q.new_ones(T, D), g, e)), r"q must be \[d\], \[B, d\] or \[B, T, d\]"),
    "q dtype": (case(lambda s, q, g, e: (s, q.half(), g, e)), r"q dtype must be float32"),
    "gain shape": (case(lambda s, q, g, e: (s, q, g.new_ones(D + 1), e)), r"gain must be \[d\]"),
    "gain device": (case(lambda s, q, g, e: (s, q, g.to("meta"), e)), r"gain is on meta"),
    "negative eps": (case(lambda s, q, g, e: (s, q, g, -1.0)), r"eps must be finite and >= 0"),
    "nan eps": (case(lambda s, q, g, e: (s, q, g, float("nan"))), r"eps must be finite and >= 0"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_value_error_naming_the_argument(backend, name):
    build, match = BAD_INPUTS[name]
    with forced(backend), pytest.raises(ValueError, match="dar_route: " + match):
        diffkern.dar_route(*build(device_for(backend)))


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_rejected_while_tracing(name):
    """The fake implementation (used by torch.compile) rejects the same inputs."""
    build, match = BAD_INPUTS[name]
    sources, q, gain, eps = build("cpu")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, pytest.raises(ValueError, match=match):
        fake = [mode.from_tensor(x) for x in sources]
        torch.ops.diffkern.dar_route_fwd(fake, mode.from_tensor(q), mode.from_tensor(gain), eps)


# The backends whose kernels compute in float32 with one token row per program (Triton) or block (CUDA).
FLOAT32_BACKENDS = [b for b in BACKENDS if b in ("triton", "cuda")]


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
def test_float32_backends_reject_float64(backend):
    sources, q, gain = make_inputs(B, T, D, 2, torch.float64, "static", device=device_for(backend))
    with forced(backend), pytest.raises(ValueError, match=f"{backend} backend .* float64"):
        diffkern.dar_route(sources, q, gain)


def test_backward_rejects_mismatched_saved_tensors():
    sources, q, gain, eps = good()
    h, lse = torch.ops.diffkern.dar_route_fwd(sources, q, gain, eps)
    with pytest.raises(ValueError, match=r"dar_route: lse must be a contiguous \[B, T\] = \[2, 3\] tensor of dtype float32"):
        torch.ops.diffkern.dar_route_bwd(torch.ones_like(h), sources, q, gain, h, lse.double(), eps)


@pytest.mark.parametrize("variant", ("static", "timestep", "dynamic"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, variant):
    sources, q, gain = make_inputs(2, 3, 20, 3, torch.float32, variant, device=device_for(backend))
    with forced(backend):
        torch.library.opcheck(torch.ops.diffkern.dar_route_fwd.default, (sources, q, gain, 1e-6))
        h, lse = torch.ops.diffkern.dar_route_fwd(sources, q, gain, 1e-6)
        torch.library.opcheck(torch.ops.diffkern.dar_route_bwd.default,
                              ([torch.randn_like(h), [x.detach() for x in sources], q.detach(), gain.detach(),
                                h.detach(), lse, 1e-6]))


class Router(torch.nn.Module):
    """A minimal routing layer: a learned static query over the stream history, then an MLP."""

    def __init__(self, d):
        super().__init__()
        self.q = torch.nn.Parameter(torch.randn(d))
        self.gain = torch.nn.Parameter(torch.ones(d))
        self.mlp = torch.nn.Linear(d, d)

    def forward(self, history):
        return self.mlp(diffkern.dar_route(history, self.q, self.gain))


@pytest.mark.parametrize("dynamic", (False, True))
@pytest.mark.parametrize("compiler", ("aot_eager", "inductor"))
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_torch_compile_fullgraph_forward_and_backward(backend, compiler, dynamic):
    dev = device_for(backend)
    model = Router(16).to(dev)
    history = [torch.randn(2, 5, 16, device=dev, requires_grad=True) for _ in range(4)]
    with forced(backend):
        assert_compiled_matches_eager(model, (history,), [*history, model.q, model.gain], compiler, dynamic)


def test_backend_switch_routes_cpu_tensors():
    sources, q, gain, eps = good()
    calls = []
    real = diffkern._registry._impls["dar_route_fwd"]["reference"]
    diffkern._registry._impls["dar_route_fwd"]["reference"] = lambda *a: calls.append(1) or real(*a)
    try:
        with diffkern.backend("reference"):
            diffkern.dar_route(sources, q, gain)
        diffkern.dar_route(sources, q, gain)  # default again: the C++ kernel
    finally:
        diffkern._registry._impls["dar_route_fwd"]["reference"] = real
    assert calls == [1]


def test_backend_switch_errors(monkeypatch):
    sources, q, gain, eps = good()
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        with diffkern.backend("tpu"):
            pass
    monkeypatch.delitem(diffkern._registry._impls["dar_route_fwd"], "cuda")
    with diffkern.backend("cuda"), pytest.raises(NotImplementedError, match="has no 'cuda' backend"):
        diffkern.dar_route(sources, q, gain)
    with diffkern.backend("reference"), pytest.raises(RuntimeError, match="cannot be nested"):
        with diffkern.backend("cpu"):
            pass


@pytest.mark.parametrize("with_cuda, expected", ((True, "cuda"), (False, "triton")))
def test_cuda_tensors_prefer_the_cuda_backend_only_when_built(monkeypatch, with_cuda, expected):
    monkeypatch.setitem(diffkern._registry.BUILD_INFO, "with_cuda", with_cuda)
    assert diffkern._registry.gpu_backend("dar_route_fwd") == expected
    assert diffkern._registry.gpu_backend("dar_route_bwd") == expected


def test_forced_cuda_backend_without_a_cuda_build_is_an_error(monkeypatch):
    """On CUDA tensors (the path the dispatcher's CUDA key takes) a forced but unbuilt backend never falls back."""
    monkeypatch.setitem(diffkern._registry.BUILD_INFO, "with_cuda", False)
    sources, q, gain, eps = good()
    with diffkern.backend("cuda"), pytest.raises(RuntimeError, match="'cuda' was forced but diffkern._C was built "
                                                                     "without CUDA"):
        diffkern._registry._run_cuda("dar_route_fwd", sources, q, gain, eps)


def test_cuda_backend_on_cpu_tensors_needs_the_harness():
    """Outside the tests (no harness loaded), forcing "cuda" on CPU tensors says what is missing."""
    code = ("import torch, diffkern\n"
            "x = [torch.ones(1, 2, 4)]\n"
            "with diffkern.backend('cuda'):\n"
            "    diffkern.dar_route(x, torch.ones(4), torch.ones(4))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "runs the CUDA kernels in the host-execution harness, which is not loaded" \
        in proc.stderr, proc.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
def test_cuda_tensors_use_the_gpu_backend_and_match_reference(dtype):
    sources, q, gain = make_inputs(2, 7, 1152, 18, dtype, "timestep")
    sources, q, gain = [x.detach().cuda() for x in sources], q.detach().cuda(), gain.detach().cuda()
    h = diffkern.dar_route(sources, q, gain)
    oracle, spread = route_oracle(sources, q, gain)
    assert_close_to_oracle(h, oracle, dar_route_reference(sources, q, gain), "h", spread)


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
def test_float32_backends_reject_rows_wider_than_a_program(backend):
    sources, q, gain = make_inputs(1, 1, 4097, 2, torch.float32, "static", device=device_for(backend))
    with forced(backend), pytest.raises(ValueError, match=rf"{backend} backend takes d <= 4096 .*, got d=4097"):
        diffkern.dar_route(sources, q, gain)


@pytest.mark.skipif("cuda" not in BACKENDS, reason="the CUDA harness is not loaded")
@pytest.mark.parametrize("variant", ("static", "timestep", "dynamic"))
def test_opcheck_internal_cuda_ops(variant):
    """The cuda backend's internal ops (and their fake implementations) on their own."""
    sources, q, gain = make_inputs(B, T, D, 3, torch.float32, variant, device=device_for("cuda"))
    sources, q, gain = [x.detach() for x in sources], q.detach(), gain.detach()
    torch.library.opcheck(torch.ops.diffkern.dar_route_fwd_cuda.default, (sources, q, gain, 1e-6))
    h, lse = torch.ops.diffkern.dar_route_fwd_cuda(sources, q, gain, 1e-6)
    torch.library.opcheck(torch.ops.diffkern.dar_route_bwd_cuda.default,
                          (torch.randn_like(h), sources, q, gain, h, lse, 1e-6))
