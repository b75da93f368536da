"""diffkern.ntrk.mmd: the unbiased MMD^2 against a float64 double loop; the permutation test on known-equal
and known-different distributions (seeded); bad input and NaN policy."""
import math

import pytest
import torch

from diffkern.ntrk.mmd import median_bandwidth, mmd2, mmd_test
from diffkern.testing.numerics import assert_close_to_oracle, oracle_with_spread


def _direct(x, y, h):
    """MMD^2_u term by term, float64."""
    k = lambda a, b: math.exp(-sum((p - q) ** 2 for p, q in zip(a, b)) / (2 * h * h))  # noqa: E731
    xs, ys = x.reshape(len(x), -1).tolist(), y.reshape(len(y), -1).tolist()
    n, m = len(xs), len(ys)
    sxx = sum(k(xs[i], xs[j]) for i in range(n) for j in range(n) if i != j)
    syy = sum(k(ys[i], ys[j]) for i in range(m) for j in range(m) if i != j)
    sxy = sum(k(a, b) for a in xs for b in ys)
    return torch.tensor(sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m), dtype=torch.float64)


def _direct_median(z):
    rows = z.reshape(len(z), -1).tolist()
    d = sorted(math.dist(rows[i], rows[j]) for i in range(len(rows)) for j in range(i + 1, len(rows)))
    return 0.5 * (d[(len(d) - 1) // 2] + d[len(d) // 2]) if len(d) % 2 == 0 else d[len(d) // 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mmd2_matches_float64_double_loop(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 2, 3, generator=g).to(dtype)
    y = (0.5 + torch.randn(9, 2, 3, generator=g)).to(dtype)
    h = 1.7
    fan_in = 6 + 9 * 8  # a distance sums 6 squares, then the largest kernel sum has m (m - 1) terms
    (oracle,), (spread,) = oracle_with_spread(lambda a, b: _direct(a, b, h), [x, y], fan_in, torch.float64)
    assert_close_to_oracle(torch.tensor(mmd2(x, y, bandwidth=h), dtype=torch.float64), oracle, oracle, "mmd2", spread)


def test_default_bandwidth_is_the_pooled_median_distance():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    h = _direct_median(torch.cat([x, y]))
    assert median_bandwidth(torch.cat([x, y])) == pytest.approx(h, rel=1e-12)
    assert mmd2(x, y) == pytest.approx(_direct(x, y, h).item(), rel=1e-9, abs=1e-15)
    assert mmd_test(x, y, permutations=5)["bandwidth"] == pytest.approx(h, rel=1e-12)


def test_same_distribution_mmd2_centres_on_zero_and_test_keeps_its_level():
    """20 seeded pairs from N(0, I_8): the unbiased MMD^2 averages within 4 standard errors of 0, and the
    5% test rejects at most 4 of 20 (Binomial(20, 0.05): P(>= 5) = 0.003)."""
    values, rejected = [], 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        t = mmd_test(torch.randn(40, 8, generator=g), torch.randn(60, 8, generator=g), permutations=99, generator=g)
        values.append(t["mmd2"])
        rejected += t["p"] < 0.05
    v = torch.tensor(values, dtype=torch.float64)
    assert abs(v.mean()) <= 4 * v.std() / math.sqrt(len(v))
    assert rejected <= 4


@pytest.mark.parametrize("shift, scale", [(0.6, 1.0), (0.0, 1.6)])
def test_different_distributions_are_rejected(shift, scale):
    """A mean shift of 0.6 per coordinate or a 1.6x scale, 60 vs 60 samples in 8 dims: p at its floor."""
    for seed in range(3):
        g = torch.Generator().manual_seed(100 + seed)
        x = torch.randn(60, 8, generator=g)
        y = shift + scale * torch.randn(60, 8, generator=g)
        t = mmd_test(x, y, permutations=99, generator=g)
        assert t["mmd2"] > 0 and t["p"] == pytest.approx(0.01)


def test_statistic_ignores_sample_order_and_p_is_reproducible():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(10, 5, generator=g), torch.randn(12, 5, generator=g) + 0.3
    assert mmd2(x.flip(0), y[torch.randperm(12, generator=g)]) == pytest.approx(mmd2(x, y), rel=1e-12)
    a = mmd_test(x, y, permutations=50, generator=torch.Generator().manual_seed(7))
    b = mmd_test(x, y, permutations=50, generator=torch.Generator().manual_seed(7))
    assert a == b and 1 / 51 <= a["p"] <= 1


def test_nan_policy():
    x, y = torch.randn(5, 3), torch.randn(6, 3)
    x[2, 1] = float("nan")
    assert math.isnan(mmd2(x, y)) and math.isnan(mmd2(x, y, bandwidth=1.0))
    t = mmd_test(x, y, permutations=5)
    assert math.isnan(t["mmd2"]) and math.isnan(t["p"])
    assert math.isnan(median_bandwidth(x))


@pytest.mark.parametrize("call, match", [
    (lambda: mmd2([[1.0, 2.0]], torch.randn(3, 2)), "x"),
    (lambda: mmd2(torch.randn(1, 2), torch.randn(3, 2)), "x must be"),
    (lambda: mmd2(torch.randn(3, 2), torch.randint(0, 3, (3, 2))), "y must be"),
    (lambda: mmd2(torch.randn(3, 2), torch.randn(3, 3)), "one size"),
    (lambda: mmd2(torch.randn(3, 2), torch.randn(3, 2), bandwidth=0.0), "bandwidth"),
    (lambda: mmd_test(torch.randn(3, 2), torch.randn(3, 2), permutations=0), "permutations"),
    (lambda: median_bandwidth(torch.randn(1, 4)), "z must be"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()
