"""Every Triton launch a call of a public op makes passes the maxnreg its ahead-of-time spec compiles with.

The no-spill checks (tests/test_kernels_compile.py, test_kernels_specialise.py) compile each kernel's AOT
specs with `maxnreg=register_budget(num_warps)`; a launch without it lets ptxas pick a lower cap, which
can spill, so what runs on a GPU would not be what the checks saw. Each op runs once at a tiny shape in
the interpreter (forward and, where there is one, the Triton backward) and every recorded launch is
matched with the AOT specs of the same kernel at the same num_warps.
"""
import pytest
import torch

import diffkern
from diffkern._triton import register_budget
from diffkern.rmdm import triton_kernels as rmdm_triton
from diffkern.testing.aot import jit_function, library_specs
from diffkern.testing.triton_monitor import TritonMonitor
from test_rmdm_recurse import make

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests (CPU tensors)")


def _randn(g, *shape, grad=False):
    return torch.randn(*shape, generator=g).requires_grad_(grad)


def dar_route(g):
    sources = [_randn(g, 2, 5, 8, grad=True) for _ in range(3)]
    diffkern.dar_route(sources, _randn(g, 8, grad=True), _randn(g, 8, grad=True)).sum().backward()


def dar_gather(g):
    diffkern.dar.dar_gather([_randn(g, 2, 5, 8)], [_randn(g, 2, 5, 8)], _randn(g, 8), _randn(g, 8))


def grpo(g):
    B, D = 2, 24
    x, v = _randn(g, B, D), _randn(g, B, D, grad=True)
    sigma, sigma_next = torch.tensor([0.8, 0.6]), torch.tensor([0.7, 0.5])
    x_next, _, log_prob, _ = diffkern.flow_sde_step(x, v.detach(), sigma, sigma_next, eps=_randn(g, B, D))
    loss = diffkern.grpo_iso_loss(v, x, x_next, sigma, sigma_next, log_prob + 0.01, torch.tensor([1.0, -1.0]))
    (loss[0] if isinstance(loss, tuple) else loss).backward()


def ntrk(g):
    diffkern.ntrk_step(_randn(g, 2, 12), torch.tensor([0.5, 0.7]), _randn(g, 2, 12), torch.tensor([0.3, 0.9]))
    diffkern.twoos_project(_randn(g, 2, 4, 6))


def sinks(g):
    q, k, v = (_randn(g, 1, 2, 12, 16) for _ in range(3))
    diffkern.sink_mass(q, k, n_query=8)
    diffkern.sink_attention(q, k, v, k_sink=2, n_query=8)
    diffkern.sink_attention_given(q, k, v, torch.tensor([[3, 0]]), n_query=8)


def recurse_persistent(g):
    blocks, x, mod = make((1, 5, 8, 12, 2, 2, 2), torch.float32, True)
    diffkern.recurse(blocks, x, 2, heads=2, mod=mod)


def recurse_tiled(g, monkeypatch):
    monkeypatch.setattr(rmdm_triton._cooperative, "max_programs", lambda device: 1)
    recurse_persistent(g)


CALLS = (dar_route, dar_gather, grpo, ntrk, sinks, recurse_persistent, recurse_tiled)


@pytest.fixture(scope="module")
def spec_warps():
    """kernel name -> {num_warps: maxnreg} over its AOT specs."""
    found = {}
    for spec in library_specs():
        found.setdefault(jit_function(spec.kernel).__name__, {})[spec.num_warps] = spec.maxnreg
    return found


@pytest.mark.parametrize("call", CALLS, ids=lambda c: c.__name__)
def test_every_launch_passes_the_maxnreg_of_its_aot_spec(call, spec_warps, monkeypatch):
    """Every AOT spec of the kernel compiles with maxnreg = register_budget(num_warps), and so must the
    launch at its own num_warps (tiny test shapes may pick fewer warps than the specs' real shapes)."""
    g = torch.Generator().manual_seed(0)
    with diffkern.backend("triton"), TritonMonitor(check_bounds=False) as mon:
        call(g, monkeypatch) if call is recurse_tiled else call(g)
    assert mon.launches, "the call made no Triton launch"
    for launch in mon.launches:
        specs = spec_warps.get(launch.kernel)
        assert specs, f"{launch.kernel}: no AOT spec compiles this kernel"
        assert all(maxnreg == register_budget(w) for w, maxnreg in specs.items()), specs
        num_warps, maxnreg = launch.meta.get("num_warps", 4), launch.meta.get("maxnreg")  # 4: Triton's default
        assert maxnreg == register_budget(num_warps), (
            f"{launch.kernel} (num_warps={num_warps}) launched with maxnreg={maxnreg}; its AOT specs compile "
            f"with register_budget(num_warps) = {register_budget(num_warps)}")
