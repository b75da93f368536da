"""The tolerance model (diffkern.testing.numerics) separates right from wrong, for each technique.

Each case runs a real kernel (the C++ CPU backend) and holds it to the comparison the op's own tests use:
- the kernel passes, and so does the plain float32 computation in another summation order (the reduction
  axis reversed), which no per-machine tuning could have anticipated;
- a planted defect fails: the same kernel fed what a defective one would read, one term of a reduction
  dropped (an element read as zero) or an off-by-one (an element read from its neighbour).
"""
from __future__ import annotations

import pytest
import torch

import diffkern
from diffkern.grpo import reference as grpo
from diffkern.ntrk import reference as ntrk
from diffkern.rmdm import reference as rmdm
from diffkern.sinks import reference as sinks
from diffkern.dar.reference import dar_route_reference
from diffkern.testing.numerics import assert_close_to_oracle, oracle_with_spread

from test_rmdm_recurse import EPS, fan_in as rmdm_fan_in, leaves_of, make as rmdm_make, unflatten


def randn(*shape, seed=0, scale=1.0):
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def dropped(x: torch.Tensor, index) -> torch.Tensor:
    x = x.clone()
    x[index] = 0
    return x


def off_by_one(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The last element along `dim` read from its neighbour."""
    x = x.clone()
    x.select(dim, -1).copy_(x.select(dim, -2))
    return x


class Case:
    """One technique's comparison: kernel(*inputs) against oracle(*inputs) under the model."""

    def __init__(self, kernel, oracle, inputs, n, reversed_plain, mutants):
        self.kernel, self.oracle, self.inputs, self.n = kernel, oracle, inputs, n
        self.reversed_plain, self.mutants = reversed_plain, mutants

    def check(self, outputs):
        want, spreads = oracle_with_spread(self.oracle, self.inputs, self.n, torch.float32)
        plain = self.oracle(*self.inputs)
        for i, (got, w, p, spread) in enumerate(zip(outputs, want, plain, spreads)):
            assert_close_to_oracle(got, w, p, f"output {i}", spread)


def dar_case():
    sources = [randn(2, 3, 531, seed=i, scale=0.5 + i) for i in range(3)]
    q, gain = randn(531, seed=7, scale=2.0), 1 + 0.2 * randn(531, seed=8)

    def kernel(s0, s1, s2, q, gain):
        return [diffkern.dar_route([s0, s1, s2], q, gain)]

    def oracle(s0, s1, s2, q, gain):
        return [dar_route_reference([s0, s1, s2], q, gain)]

    def reversed_plain(s0, s1, s2, q, gain):
        return [dar_route_reference([x.flip(-1) for x in (s0, s1, s2)], q.flip(-1), gain.flip(-1)).flip(-1)]
    return Case(kernel, oracle, [*sources, q, gain], 3 * sources[0].numel(), reversed_plain, {
        "dropped": lambda x: [x[0], dropped(x[1], (1, 2, 100)), *x[2:]],
        "off_by_one": lambda x: [x[0], off_by_one(x[1]), *x[2:]]})


def grpo_case():
    B, D = 3, 1025
    v, x_next, x = randn(B, D, seed=1, scale=1.5), randn(B, D, seed=2), randn(B, D, seed=3)
    sigmas = grpo.flow_sigmas()
    sigma, sigma_next = sigmas[[0, 4, 9]].float(), sigmas[[1, 5, 10]].float()

    def kernel(v, x, x_next, sigma, sigma_next):
        return list(torch.ops.diffkern.grpo_log_prob(v, x, x_next, sigma, sigma_next, None, None, 1.0, 0,
                                                     grpo.WAN_STD_COEF)[:1])

    def oracle(v, x, x_next, sigma, sigma_next):
        return list(grpo.log_prob(v, x, x_next, sigma, sigma_next, None, None, 1.0, 0, grpo.WAN_STD_COEF)[:1])

    def reversed_plain(v, x, x_next, sigma, sigma_next):
        return oracle(v.flip(-1), x.flip(-1), x_next.flip(-1), sigma, sigma_next)
    # a latent's fan-in is its size; the sigmas are read exactly into per-sample coefficients
    return Case(kernel, oracle, [v, x, x_next, sigma, sigma_next], [B * D] * 3 + [None, None], reversed_plain, {
        "dropped": lambda a: [dropped(a[0], (1, 700)), *a[1:]],
        "off_by_one": lambda a: [off_by_one(a[0]), *a[1:]]})


def ntrk_case():
    mu, w, eps = (randn(2, 1025, seed=s) for s in (1, 2, 3))
    sigma, rho = 0.2 + torch.rand(2, generator=torch.Generator().manual_seed(4)), torch.tensor([0.3, 0.8])

    def kernel(mu, sigma, w, rho, eps):
        return [diffkern.ntrk_step(mu, sigma, w, rho, eps=eps)]

    def oracle(mu, sigma, w, rho, eps):
        return [ntrk.ntrk_step(mu, sigma, w, rho, eps, None)]
    # elementwise: no reduction, so no summation order to reverse; sigma and rho read exactly into scalars
    return Case(kernel, oracle, [mu, sigma, w, rho, eps], [0, None, 0, None, 0], oracle, {
        "dropped": lambda a: [*a[:2], dropped(a[2], (0, 5)), *a[3:]],
        "off_by_one": lambda a: [*a[:4], off_by_one(a[4])]})


def rmdm_case():
    shape = (2, 7, 8, 12, 2, 2, 2)
    blocks, x, mod = rmdm_make(shape, torch.float32, True)

    def kernel(*a):
        x, blks, mod = unflatten(a, 2, True)
        return [diffkern.recurse(blks, x, 2, heads=2, mod=mod, return_all=True)]

    def oracle(*a):
        x, blks, mod = unflatten(a, 2, True)
        return [rmdm.recurse(x, [w for b in blks for w in b], mod, 2, 2, EPS)]

    def reversed_plain(*a):
        """The blocks with their feature axis permuted (every weight consistently): the same function, every
        reduction over d in reverse order."""
        x, blks, mod = unflatten(a, 2, True)
        d = x.shape[-1]
        perm = torch.arange(d - 1, -1, -1)
        qkv = torch.cat([perm + i * d for i in range(3)])
        flipped = []
        for b in blks:
            ln1_w, ln1_b, w_qkv, b_qkv, w_o, b_o, ln2_w, ln2_b, w_1, b_1, w_2, b_2 = b
            flipped.append([ln1_w[perm], ln1_b[perm], w_qkv[qkv][:, perm], b_qkv[qkv], w_o[perm][:, perm], b_o[perm],
                            ln2_w[perm], ln2_b[perm], w_1[:, perm], b_1, w_2[perm], b_2[perm]])
        return [rmdm.recurse(x[..., perm], [w for b in flipped for w in b], mod[..., perm], 2, 2, EPS)[..., perm]]
    inputs = leaves_of(x, blocks, mod)
    w_1 = 1 + rmdm.BLOCK_PARAMS.index("w_1")
    return Case(kernel, oracle, inputs, rmdm_fan_in(shape), reversed_plain, {
        "dropped": lambda a: [*a[:w_1], dropped(a[w_1], (3, 5)), *a[w_1 + 1:]],
        "off_by_one": lambda a: [off_by_one(a[0]), *a[1:]]})


def sinks_case():
    q, k = randn(1, 2, 37, 64, seed=1), randn(1, 2, 45, 64, seed=2)
    q[..., :8] += 2.0  # a leaning direction, so some keys draw far more mass than others
    k[:, :, 3, :8] += 3.0
    scale = 64 ** -0.5

    def kernel(q, k):
        return list(diffkern.sink_mass(q, k, 30, scale))

    def oracle(q, k):
        return list(sinks.sink_mass(q, k, 30, scale))

    def reversed_plain(q, k):
        """Keys in reverse order (softmax and mass sums reversed) and head_dim reversed."""
        mass, lse = sinks.sink_mass(q.flip(-1), k.flip(-1).flip(-2), 30, scale)
        return [mass.flip(-1), lse]
    return Case(kernel, oracle, [q, k], 64 + 45 + 37, reversed_plain, {
        "dropped": lambda a: [dropped(a[0], (0, 1, 4, 10)), a[1]],
        "off_by_one": lambda a: [a[0], off_by_one(a[1], dim=-2)]})


CASES = {"dar": dar_case, "grpo": grpo_case, "ntrk": ntrk_case, "rmdm": rmdm_case, "sinks": sinks_case}


@pytest.mark.parametrize("name", CASES)
def test_kernel_and_reversed_summation_pass(name):
    case = CASES[name]()
    with diffkern.backend("cpu"):
        case.check(case.kernel(*case.inputs))
    case.check(case.reversed_plain(*case.inputs))


@pytest.mark.parametrize("mutant", ("dropped", "off_by_one"))
@pytest.mark.parametrize("name", CASES)
def test_planted_defect_fails(name, mutant):
    case = CASES[name]()
    with diffkern.backend("cpu"):
        outputs = case.kernel(*case.mutants[mutant](case.inputs))
    with pytest.raises(AssertionError, match="max error"):
        case.check(outputs)
