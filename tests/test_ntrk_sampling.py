"""diffkern.sampling on a Gaussian data distribution whose velocity field is known in closed form."""
import pytest
import torch

from diffkern.ntrk.diagnostics import gaussianity
from diffkern.sampling import BaseSampler, DPSSampler, NTRKSampler, SVDDSampler, best_of_n

M0, S0 = 0.5, 0.3  # data: x0 ~ N(M0, S0^2 I)
SHAPE = (16, 4, 8, 8)


def velocity(x, t):
    """E[eps - x0 | x_t] for x_t = (1 - t) x0 + t eps, Gaussian x0."""
    t = t.reshape(-1, 1, 1, 1)
    var = (1 - t) ** 2 * S0 ** 2 + t ** 2
    centred = x - (1 - t) * M0
    return t / var * centred - (M0 + (1 - t) * S0 ** 2 / var * centred)


# the reward prefers a fixed +-1 pattern: a structured gradient with zero mean
PATTERN = torch.randint(0, 2, SHAPE[1:], generator=torch.Generator().manual_seed(9)) * 2.0 - 1


def reward(x0):
    return (x0 * PATTERN).flatten(1).mean(1)


def start(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def test_base_sampler_reproduces_the_data_distribution():
    x, trace = BaseSampler(velocity, reward, steps=25).sample(start(), torch.Generator().manual_seed(1))
    assert abs(x.mean().item() - M0) < 0.03 and abs(x.std().item() - S0) < 0.03
    assert trace.nfe == 25 and trace.grads == 0


@pytest.mark.parametrize("make", [lambda: NTRKSampler(velocity, reward, rho=0.8, record=True),
                                  lambda: DPSSampler(velocity, reward, scale=2000.0, record=True)], ids=("ntrk", "dps"))
def test_guided_samplers_raise_the_reward_at_one_nfe_per_step(make):
    sampler = make()
    base = BaseSampler(velocity, reward).sample(start(), torch.Generator().manual_seed(1))[1].reward.mean()
    x, trace = sampler.sample(start(), torch.Generator().manual_seed(1))
    assert trace.nfe == 25 and trace.grads == 25
    assert trace.reward.mean() > base + 0.05
    assert len(trace.perturbations) == 25


def test_ntrk_injected_noise_keeps_unit_scale_and_near_gaussian_moments():
    """rho = 0.8 of a whitened two-valued (+-1 pattern) gradient in 256 entries per sample: measured var
    ~0.92 and excess kurtosis ~-0.4 (the band edges thin the tails; the strict check of
    test_ntrk_whiten.py is not met for such a gradient at this size), KS distance ~0.02 (4096 entries)."""
    _, trace = NTRKSampler(velocity, reward, rho=0.8, record=True).sample(start(), torch.Generator().manual_seed(2))
    for p in trace.perturbations:
        s = gaussianity(p)
        assert abs(s["mean"]) < 0.05 and abs(s["var"] - 1) < 0.12 and abs(s["kurt"]) < 0.7 and s["ks"] < 0.04


def test_search_baselines_count_their_nfe():
    _, svdd = SVDDSampler(velocity, reward, steps=10, k=3).sample(start(), torch.Generator().manual_seed(3))
    assert svdd.nfe == 10 + 3 * 9  # the last step's candidates are already at t = 0
    x, best = best_of_n(BaseSampler(velocity, reward, steps=10), start, 3, torch.Generator().manual_seed(4))
    assert best.nfe == 30 and x.shape == SHAPE
    torch.testing.assert_close(best.reward, reward(x))
