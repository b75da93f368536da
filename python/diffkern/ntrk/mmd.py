"""How far is a set of samples from a data distribution? A kernel two-sample statistic and its test.

MMD^2 (Gretton et al. 2012) with the Gaussian kernel k(a, b) = exp(-|a - b|^2 / (2 h^2)) on flattened
samples, unbiased estimator (the i = j terms left out of both within-set means):

    MMD^2_u = sum_{i != j} k(x_i, x_j) / (n (n - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
              - 2 sum_{i, j} k(x_i, y_j) / (n m)

zero in expectation when x and y come from the same distribution (it can then be negative), > 0 in
expectation otherwise. The bandwidth h defaults to the median heuristic (the median pairwise distance);
compare statistics only at one bandwidth (e.g. median_bandwidth of the reference set, fixed for all the
sample sets compared against it). The permutation test relabels the pooled sample: its p-value is exact
for any bandwidth that does not depend on the labels.
"""
from __future__ import annotations

import torch

from .. import _checks


def _rows(op: str, name: str, z) -> torch.Tensor:
    _checks.tensor(op, name, z)
    if z.dim() < 1 or z.shape[0] < 2 or not z.is_floating_point():
        raise ValueError(f"{op}: {name} must be a float tensor [n, ...] with n >= 2 samples, got "
                         f"{z.dtype} {list(z.shape)}")
    return z.detach().reshape(z.shape[0], -1).double().cpu()


def _pair(op: str, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _rows(op, "x", x), _rows(op, "y", y)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{op}: x and y must hold samples of one size, got {list(x.shape[1:])} and "
                         f"{list(y.shape[1:])}")
    return a, b


def _sq_dists(z: torch.Tensor) -> torch.Tensor:
    # the direct difference form: no |a|^2 + |b|^2 - 2 a.b cancellation for close samples
    return torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist").pow(2)


def _median(d2: torch.Tensor) -> float:
    n = d2.shape[0]
    iu = torch.triu_indices(n, n, 1)
    return d2[iu[0], iu[1]].sqrt().median().item()


def median_bandwidth(z: torch.Tensor) -> float:
    """The median heuristic: the median Euclidean distance over the pairs i < j of z's samples.

    z: [n, ...] float, n >= 2 (each sample flattened; math in float64). NaN policy: a NaN in z gives NaN.
    Bad input: TypeError (not a tensor) or ValueError (fewer than two samples, not float) naming z.
    """
    d2 = _sq_dists(_rows("median_bandwidth", "z", z))
    return float("nan") if d2.isnan().any() else _median(d2)


def _bandwidth(op: str, bandwidth, d2: torch.Tensor) -> float:
    if bandwidth is None:
        return float("nan") if d2.isnan().any() else _median(d2)
    h = _checks.number(op, "bandwidth", bandwidth)
    if not h > 0:
        raise ValueError(f"{op}: bandwidth must be > 0, got {bandwidth}")
    return h


def _mmd2_rows(k: torch.Tensor, member: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """MMD^2_u for each row of member [P, n + m] (1.0: the sample is in x, 0.0: in y); k has a zero diagonal."""
    other = 1 - member
    kx, ky = member @ k, other @ k
    sxx, syy, sxy = (kx * member).sum(1), (ky * other).sum(1), (kx * other).sum(1)
    return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)


def _kernel(op: str, x, y, bandwidth):
    a, b = _pair(op, x, y)
    d2 = _sq_dists(torch.cat([a, b]))
    h = _bandwidth(op, bandwidth, d2)
    k = torch.exp(-d2 / (2 * h * h))
    k.fill_diagonal_(0)
    member = torch.cat([torch.ones(a.shape[0]), torch.zeros(b.shape[0])]).double()
    return k, member, a.shape[0], b.shape[0], h


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None) -> float:
    """Unbiased MMD^2 between the samples x [n, ...] and y [m, ...] (module docstring's equation).

    Samples are flattened; any float dtype, math in float64 on the CPU. bandwidth: h > 0, default the
    median heuristic over the pooled n + m samples.
    NaN policy: a NaN in x or y gives NaN. Bad input: TypeError / ValueError naming x, y (fewer than two
    samples, not float, unequal sample sizes) or bandwidth (<= 0).
    """
    k, member, n, m, _ = _kernel("mmd2", x, y, bandwidth)
    return _mmd2_rows(k, member[None], n, m).item()


def mmd_test(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None, permutations: int = 200,
             generator: torch.Generator | None = None) -> dict:
    """Permutation test of "x and y come from one distribution" by the unbiased MMD^2.

    Returns {"mmd2", "bandwidth", "p", "permutations"}: p = (1 + #{permuted MMD^2 >= observed}) /
    (1 + permutations), each permutation a uniformly random relabelling of the pooled samples drawn from
    `generator` (seed it for a reproducible p). Arguments, dtypes and NaN policy (p NaN too) as mmd2's;
    permutations: an int >= 1 (ValueError otherwise, naming it).
    """
    if _checks.integer("mmd_test", "permutations", permutations) < 1:
        raise ValueError(f"mmd_test: permutations must be >= 1, got {permutations}")
    k, member, n, m, h = _kernel("mmd_test", x, y, bandwidth)
    observed = _mmd2_rows(k, member[None], n, m).item()
    if observed != observed:
        return {"mmd2": observed, "bandwidth": h, "p": float("nan"), "permutations": permutations}
    perms = torch.stack([torch.randperm(n + m, generator=generator) for _ in range(permutations)])
    null = _mmd2_rows(k, member[perms], n, m)
    p = (1 + (null >= observed).sum().item()) / (1 + permutations)
    return {"mmd2": observed, "bandwidth": h, "p": p, "permutations": permutations}
