"""2OS band tables: exact quantiles of nested order statistics (specs/ntrk.md, "W").

For x ~ N(0, I) cut into M tiles of D, Z[r, j] is the r-th smallest (over tiles) of the tiles' j-th
smallest entries. Through the CDF Phi, a tile's j-th order statistic is Beta(j, D - j + 1) (the j-th of
D uniforms), with CDF F_j; the M values F_j(Z[:, j]) are iid uniforms, whose r-th smallest is
Beta(r, M - r + 1), with CDF B_r. So, exactly,
    P(Z[r, j] < Q^-1(F_j^-1(B_r^-1(p)))) = p,      Q = Phi (dist "normal") or the chi-square CDF ("chi2"),
and the band [L, U] at p = alpha/2 and 1 - alpha/2 holds its entry with probability 1 - alpha.
Indices r, j are 1-based above and 0-based in the tables.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

DISTS = ("normal", "chi2")


def _quantile(M: int, D: int, p: float, dist: str, dof: float | None) -> np.ndarray:
    """Q^-1(F_j^-1(B_r^-1(p))) as an [M, D] float64 array.

    Each Beta quantile is also computed from the other tail (1 - I^-1(a, b, q) = I^-1(b, a, 1 - q)), and
    the outer quantile takes whichever of t, 1 - t is small: no precision is lost near 1.
    """
    from scipy import special, stats  # here, not at import: scipy costs ~1 s to import
    r = np.arange(1, M + 1, dtype=np.float64)[:, None]
    j = np.arange(1, D + 1, dtype=np.float64)[None, :]
    b = special.betaincinv(r, M - r + 1, p)
    b_c = special.betaincinv(M - r + 1, r, 1 - p)  # 1 - b
    t = special.betaincinv(j, D - j + 1, b)
    t_c = special.betaincinv(D - j + 1, j, b_c)  # 1 - t
    if dist == "normal":
        return np.where(t < 0.5, special.ndtri(t), -special.ndtri(t_c))
    return np.where(t < 0.5, stats.chi2.ppf(t, dof), stats.chi2.isf(t_c, dof))


@functools.lru_cache(maxsize=32)
def _tables(M: int, D: int, alpha: float, dist: str, dof: float | None) -> tuple[np.ndarray, np.ndarray]:
    lower = _quantile(M, D, alpha / 2, dist, dof)
    if dist == "normal":  # Z[r, j] and -Z[M-1-r, D-1-j] have one law
        return lower, -lower[::-1, ::-1].copy()
    return lower, _quantile(M, D, 1 - alpha / 2, dist, dof)


def twoos_bands(M: int, D: int, alpha: float = 1e-4, dist: str = "normal", dof: float | None = None):
    """The [M, D] 2OS band table (lower, upper) for M tiles of D entries, exact, cached per key.

        lower[r, j] = Q^-1(F_j^-1(B_r^-1(alpha / 2))),  upper[r, j] = Q^-1(F_j^-1(B_r^-1(1 - alpha / 2)))
    with F_j, B_r the CDFs of Beta(j, D - j + 1) and Beta(r, M - r + 1) (1-based r, j) and Q the entries'
    CDF: the standard normal ("normal") or chi-square with `dof` degrees of freedom ("chi2", for tile
    energies). Each band holds its entry of a fresh draw with probability 1 - alpha.

    Returns: (lower, upper), float64 CPU tensors [M, D], fresh copies (the cache keeps its own).
    Cost: 2 M D inverse incomplete beta evaluations (~1 us each) on the first call for a key.
    Inside torch.compile the table comes from the op diffkern::twoos_band_table (no graph break).
    """
    if not (isinstance(M, int) and isinstance(D, int) and not isinstance(M, bool) and not isinstance(D, bool)
            and M >= 1 and D >= 1):
        raise ValueError(f"twoos_bands: M and D must be ints >= 1, got M={M!r}, D={D!r}")
    if isinstance(alpha, (bool, complex, str)) or alpha is None or not 0 < alpha < 1:
        raise ValueError(f"twoos_bands: alpha must be in (0, 1), got {alpha}")
    if dist not in DISTS:
        raise ValueError(f"twoos_bands: dist must be one of {DISTS}, got {dist!r}")
    if dist == "chi2" and not (dof is not None and dof > 0):
        raise ValueError(f"twoos_bands: dist 'chi2' needs dof > 0, got {dof!r}")
    if dist == "normal" and dof is not None:
        raise ValueError(f"twoos_bands: dof is only for dist 'chi2', got dof={dof!r}")
    dof = None if dof is None else float(dof)
    if torch.compiler.is_compiling():
        return band_table(M, D, float(alpha), dist, dof, torch.float64, torch.device("cpu"))
    lower, upper = _tables(M, D, float(alpha), dist, dof)
    return torch.from_numpy(lower.copy()), torch.from_numpy(upper.copy())


@functools.lru_cache(maxsize=32)
def bands_on(M: int, D: int, alpha: float, dist: str, dof: float | None, dtype: torch.dtype, device: torch.device):
    """The table in the dtype and on the device a kernel reads it from (cached: one copy per device)."""
    lower, upper = twoos_bands(M, D, alpha, dist, dof)
    return lower.to(device, dtype).contiguous(), upper.to(device, dtype).contiguous()


@torch.library.custom_op("diffkern::twoos_band_table", mutates_args=())
def band_table(M: int, D: int, alpha: float, dist: str, dof: float | None, dtype: torch.dtype,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`bands_on` as an opaque op for torch.compile: fresh copies of the cached (lower, upper) [M, D]."""
    lower, upper = bands_on(M, D, alpha, dist, dof, dtype, device)
    return lower.clone(), upper.clone()


@band_table.register_fake
def _band_table_fake(M, D, alpha, dist, dof, dtype, device):
    return torch.empty((M, D), dtype=dtype, device=device), torch.empty((M, D), dtype=dtype, device=device)


def bands_for(M: int, D: int, alpha: float, dist: str, dof: float | None, dtype: torch.dtype, device: torch.device):
    """The table a kernel reads (`bands_on`), also inside torch.compile: there it comes from the op
    diffkern::twoos_band_table, so the scipy construction stays out of the graph (no graph break, no
    recompile; a copy of the cached table per call, M * D entries twice), and eagerly from the cache."""
    if torch.compiler.is_compiling():
        return band_table(M, D, alpha, dist, dof, dtype, device)
    return bands_on(M, D, alpha, dist, dof, dtype, device)
