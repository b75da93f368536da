"""dar_gather as a torch op: argument errors, opcheck, torch.compile."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from diffkern.dar import dar_gather
from diffkern.testing.backends import backends_under_test, device_for, forced
from diffkern.testing.compiled import assert_compiled_matches_eager

from test_dar_gather import gather_inputs
from test_dar_route_contract import Router

BACKENDS = backends_under_test("dar_gather_fwd")
B, T, D = 2, 3, 8


def good(device="cpu"):
    sources, addends, q, gain = gather_inputs(B, T, D, 2, 3, torch.float32, "static", device=device)
    return [x.detach() for x in sources], [x.detach() for x in addends], q.detach(), gain.detach(), 1e-6


def case(edit):
    def build(device):
        return edit(*good(device))
    return build


BAD_INPUTS = {
    "no sources": (case(lambda s, a, q, g, e: ([], a, q, g, e)), r"sources must hold at least one tensor"),
    "addend shape": (case(lambda s, a, q, g, e: (s, [a[0], a[1][:, :2]], q, g, e)),
                     r"addends\[1\] has shape \[2, 2, 8\] but sources\[0\] has shape \[2, 3, 8\]"),
    "addend dtype": (case(lambda s, a, q, g, e: (s, [a[0].double()], q, g, e)), r"addends\[0\] dtype float64 differs"),
    "addend device": (case(lambda s, a, q, g, e: (s, [a[0], a[1].to("meta")], q, g, e)), r"addends\[1\] is on meta"),
    "addend stride": (case(lambda s, a, q, g, e: (s, [torch.randn(B, T, 2 * D, device=q.device)[..., ::2]], q, g, e)),
                      r"addends\[0\] must have unit stride in its last dim"),
    "source shape": (case(lambda s, a, q, g, e: ([s[0], s[1][:, :1]], a, q, g, e)), r"sources\[1\] has shape"),
    "q shape": (case(lambda s, a, q, g, e: (s, a, q.new_ones(T, D), g, e)), r"q must be \[d\], \[B, d\] or \[B, T, d\]"),
    "gain dtype": (case(lambda s, a, q, g, e: (s, a, q, g.half(), e)), r"gain dtype must be float32"),
    "negative eps": (case(lambda s, a, q, g, e: (s, a, q, g, -1.0)), r"eps must be finite and >= 0"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_value_error_naming_the_argument(backend, name):
    build, match = BAD_INPUTS[name]
    with forced(backend), pytest.raises(ValueError, match="dar_gather: " + match):
        dar_gather(*build(device_for(backend)))


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_rejected_while_tracing(name):
    build, match = BAD_INPUTS[name]
    sources, addends, q, gain, eps = build("cpu")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, pytest.raises(ValueError, match=match):
        fake = [mode.from_tensor(x) for x in sources]
        torch.ops.diffkern.dar_gather_fwd(fake, [mode.from_tensor(x) for x in addends], mode.from_tensor(q),
                                          mode.from_tensor(gain), eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_rejects_a_mismatched_summary_gradient(backend):
    sources, addends, q, gain, eps = good(device_for(backend))
    with forced(backend):
        h, lse, c = torch.ops.diffkern.dar_gather_fwd(sources, addends, q, gain, eps)
        with pytest.raises(ValueError, match=r"dar_gather: dlast must be a contiguous \[B, T, d\] = \[2, 3, 8\] tensor "
                                             r"of dtype float32"):
            torch.ops.diffkern.dar_gather_bwd(torch.ones_like(h), [*sources, c], q, gain, h, lse, c.double(), eps)


@pytest.mark.parametrize("k", (0, 3))
@pytest.mark.parametrize("variant", ("static", "timestep", "dynamic"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, variant, k):
    sources, addends, q, gain = gather_inputs(2, 3, 20, 2, k, torch.float32, variant, device=device_for(backend))
    with forced(backend):
        torch.library.opcheck(torch.ops.diffkern.dar_gather_fwd.default, (sources, addends, q, gain, 1e-6))
        h, lse, c = torch.ops.diffkern.dar_gather_fwd(sources, addends, q, gain, 1e-6)
        routed = [x.detach() for x in sources] + ([c.detach()] if k else [])
        dlast = torch.randn_like(h) if k else None
        torch.library.opcheck(torch.ops.diffkern.dar_gather_bwd.default,
                              (torch.randn_like(h), routed, q.detach(), gain.detach(), h.detach(), lse, dlast, 1e-6))


class Chunk(Router):
    """Forms a summary of the previous chunk while routing, then an MLP reads both outputs."""

    def forward(self, summaries, pending):
        h, c = dar_gather(summaries, pending, self.q, self.gain)
        return self.mlp(h) + c


@pytest.mark.parametrize("dynamic", (False, True))
@pytest.mark.parametrize("compiler", ("aot_eager", "inductor"))
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_torch_compile_fullgraph_forward_and_backward(backend, compiler, dynamic):
    dev = device_for(backend)
    model = Chunk(16).to(dev)
    summaries = [torch.randn(2, 5, 16, device=dev, requires_grad=True) for _ in range(2)]
    pending = [torch.randn(2, 5, 16, device=dev, requires_grad=True) for _ in range(3)]
    inputs = [*summaries, *pending, model.q, model.gain]
    with forced(backend):
        assert_compiled_matches_eager(model, (summaries, pending), inputs, compiler, dynamic)
