"""Every autotune candidate of a kernel gives the same output bits, so a run does not depend on which one wins.

Two halves, because the interpreter cannot see the GPU's summation order:
* interpreter: each tuned DAR / NTRK / GRPO launcher run once per candidate (diffkern._autotune.pick forced to
  it), at shapes where the candidates tile differently, gives bit-identical outputs;
* compiled (sm_90a, no GPU): every candidate's floating-point reductions are laid out as configs[0]'s along the
  reduced axis (diffkern.testing.aot.reduction_orders), so the GPU adds in the same order. Every kernel's
  candidates (each technique's aot_specs() through _autotune.candidate_specs) are held to it, and a num_warps
  change that moves a reduction is shown to be caught.
"""
import dataclasses

import pytest
import torch

import diffkern
from diffkern import _autotune
from diffkern._triton import register_budget
from diffkern.grpo import triton_kernels as grpo_triton
from diffkern.testing.aot import library_specs, reduction_orders

INTERPRETER = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests (CPU tensors)")


def _randn(g, *shape, grad=False):
    return torch.randn(*shape, generator=g).requires_grad_(grad)


def dar_route(g):
    """d = 600, 300: route_config's BLOCK_T 4 (candidate 8) and 8 (16); T = 37 and 21 leave ragged tiles; one
    token near the float32 maximum takes the overflow path."""
    out = []
    for d, T in ((600, 37), (300, 21)):
        sources = [_randn(g, 2, T, d) for _ in range(3)]
        sources[1][1, 5] = 3e38
        out.append(diffkern.dar_route(sources, _randn(g, d), _randn(g, d)))
        out.append(diffkern.dar_route(sources, _randn(g, 2, T, d), torch.ones(d)))
        out += diffkern.dar.dar_gather(sources[:2], sources[2:], _randn(g, 2, d), _randn(g, d))
    return out


def ntrk_step(g):
    """D = 2053: ragged tiles of 1024 and 2048 elements; eps drawn in-kernel and given."""
    mu, w, eps = (_randn(g, 2, 2053) for _ in range(3))
    sigma, rho = torch.tensor([0.5, 0.7]), torch.tensor([0.3, 0.9])
    drawn = diffkern.ntrk_step(mu, sigma, w, rho, generator=torch.Generator().manual_seed(1))
    return [drawn, diffkern.ntrk_step(mu, sigma, w, rho, eps=eps)]


def twoos_project(g):
    return list(diffkern.twoos_project(_randn(g, 2, 4, 6)))


def grpo_backward(g):
    """D = 2053: ragged tiles of 1024 and 2048 elements; CFG and KL on and off; the ratio inside the clip range,
    so every gradient is live."""
    B, D = 2, 2053
    sigma, sigma_next = torch.tensor([0.8, 0.6]), torch.tensor([0.7, 0.5])
    out = []
    for cfg in (False, True):
        x, eps, v_ref = (_randn(g, B, D) for _ in range(3))
        v = _randn(g, B, D, grad=True)
        v_uncond = _randn(g, B, D, grad=True) if cfg else None
        x_next, _, log_prob, _ = diffkern.flow_sde_step(x, v.detach(), sigma, sigma_next, eps=eps)
        kwargs = dict(beta=0.1, v_ref=v_ref, v_uncond=v_uncond, cfg_scale=4.5) if cfg else {}
        loss = diffkern.grpo_iso_loss(v, x, x_next, sigma, sigma_next, log_prob + 0.01, torch.tensor([1.0, -1.0]),
                                      clip_eps=0.5, **kwargs)
        (loss[0] if isinstance(loss, tuple) else loss).backward()
        out += [v.grad] + ([v_uncond.grad] if cfg else [])
    assert all(bool(t.abs().sum() > 0) for t in out)
    return out


TUNED = [("route_fwd_kernel", dar_route), ("ntrk_step_kernel", ntrk_step), ("row_sort_kernel", twoos_project),
         ("col_sort_kernel", twoos_project), ("clip_kernel", twoos_project), ("log_prob_bwd_kernel", grpo_backward)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


@INTERPRETER
@pytest.mark.parametrize(("kernel", "call"), TUNED, ids=[k for k, _ in TUNED])
def test_every_candidate_gives_the_same_bits(kernel, call, monkeypatch):
    real = _autotune.pick
    candidates, launched = [], set()

    def run(index):
        def pick(name, key, configs, launch, **kwargs):
            if name != kernel:
                return real(name, key, configs, launch, **kwargs)
            candidates[:] = configs
            launched.add(configs[index])
            return configs[index]

        monkeypatch.setattr(_autotune, "pick", pick)
        with diffkern.backend("triton"):
            return call(torch.Generator().manual_seed(0))

    first = run(0)
    assert len(candidates) > 1, f"{kernel} has no candidate to compare"
    for index in range(1, len(candidates)):
        for a, b in zip(first, run(index), strict=True):
            assert torch.equal(_bits(a), _bits(b)), f"{kernel} candidate {candidates[index]} changes the output bits"
    assert set(candidates) <= launched


def _candidate_groups() -> dict[str, list]:
    """Group name (candidate_specs' tag: everything but the configuration) -> the specs of its candidates."""
    groups = {}
    for spec in library_specs():
        if "candidate" in spec.tags:
            groups.setdefault(spec.tags["group"], []).append(spec)
    return {name: specs for name, specs in groups.items() if len(specs) > 1}


GROUPS = _candidate_groups()


@pytest.mark.parametrize("name", GROUPS)
def test_every_candidate_reduces_in_the_same_order_on_the_gpu(name):
    first, *others = sorted(GROUPS[name], key=lambda s: s.tags["candidate"])
    assert [s.tags["candidate"] for s in (first, *others)] == list(range(len(others) + 1)), "a group mixes kernels"
    order = reduction_orders(first, 90)
    for spec in others:
        assert reduction_orders(spec, 90) == order, f"{spec.name} sums floats in another order than {first.name}"


def test_reduction_orders_see_a_change_of_warps():
    """The check above can fail: sde_step_kernel's sum over its tile at 8 warps instead of 4 adds in another order."""
    spec = next(s for s in grpo_triton.aot_specs() if s.name.startswith("sde_step_kernel[bf16"))
    wider = dataclasses.replace(spec, num_warps=2 * spec.num_warps, maxnreg=register_budget(2 * spec.num_warps))
    assert reduction_orders(spec, 90) and reduction_orders(spec, 90) != reduction_orders(wider, 90)
