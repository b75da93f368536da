"""diffkern.ntrk.diagnostics beyond the marginal check: the DCT against its float64 matrix definition, and
the power of looks_white / common_direction_p on known non-N(0, I) inputs whose marginals are N(0, 1)."""
import math

import pytest
import torch

from diffkern.ntrk.diagnostics import common_direction_p, dct_coefficients, looks_gaussian, looks_white
from diffkern.ntrk.whiten import whiten
from diffkern.testing.numerics import assert_close_to_oracle, oracle_with_spread


def _dct_matrix(n):
    k, i = torch.arange(n, dtype=torch.float64)[:, None], torch.arange(n, dtype=torch.float64)[None]
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    c[0] /= math.sqrt(2)
    return c


def test_dct_coefficients_match_the_orthonormal_dct_ii_matrices():
    v = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (oracle,), (spread,) = oracle_with_spread(lambda z: _dct_matrix(5) @ z @ _dct_matrix(6).T, [v], 11, torch.float64)
    assert_close_to_oracle(dct_coefficients(v), oracle, oracle, "dct_coefficients", spread)
    with pytest.raises(ValueError, match="v must be"):
        dct_coefficients(torch.randn(4))


def _correlated(seed, a=0.5):
    """[256, 1, 16, 16]: each entry (e_j + a e_{j+1}) / sqrt(1 + a^2): exactly N(0, 1) marginals, neighbour
    correlation a / (1 + a^2) = 0.4 along the rows."""
    e = torch.randn(256, 1, 16, 17, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (e[..., :16] + a * e[..., 1:]) / math.sqrt(1 + a * a)


@pytest.mark.parametrize("seed", range(5))
def test_looks_white_rejects_a_correlated_field_the_marginal_check_passes(seed):
    f = _correlated(seed)
    assert looks_gaussian(f)
    assert not looks_white(f)


@pytest.mark.parametrize("seed", range(5))
def test_looks_white_and_common_direction_pass_n0i_draws(seed):
    z = torch.randn(256, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    assert looks_white(z)
    assert common_direction_p(z) > 1e-3


def _tilted(seed, rho=0.1, whitened=True):
    """sqrt(rho) w + sqrt(1 - rho) eps, w the per-sample gradient of a bump reward (a smooth field) scaled to
    unit rms, whitened by diffkern.whiten or not: NTRK's injected noise vs the raw-gradient ablation."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    c = 16 * torch.rand(256, 2, generator=g)
    grad = -torch.exp(-((ys - c[:, 0, None, None]) ** 2 + (xs - c[:, 1, None, None]) ** 2) / 8).unsqueeze(1)
    w = whiten(grad, tile=16) if whitened else grad / grad.pow(2).mean((1, 2, 3), keepdim=True).sqrt()
    return math.sqrt(rho) * w + math.sqrt(1 - rho) * torch.randn(grad.shape, generator=g)


@pytest.mark.parametrize("seed", range(3))
def test_whitened_gradient_noise_passes_and_raw_gradient_noise_fails(seed):
    assert looks_white(_tilted(seed, whitened=True))
    assert not looks_white(_tilted(seed, whitened=False))


def test_common_direction_p_detects_a_shared_shift():
    """A shift of 0.1 noise sd along one fixed direction for all 256 samples: B |mean|^2 ~ 256 + 655."""
    z = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    assert common_direction_p(z) > 1e-3
    assert common_direction_p(z + 0.1) < 1e-12
    nan = z.clone()
    nan[0, 0] = float("nan")
    assert math.isnan(common_direction_p(nan))
