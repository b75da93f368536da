"""Seeded percentile-bootstrap confidence intervals of a mean over paired units ((prompt, seed) pairs).

A paired comparison of two conditions measured on the same units is the bootstrap of the per-unit
differences a_u - b_u: every resample draws units, and both conditions of a drawn unit come with it.
Every interval of one analysis is drawn with the same seed, hence the same resampled units.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass
class Interval:
    """The mean of `values` (one per unit) and its bootstrap interval [lo, hi] at confidence `level`."""
    mean: float
    lo: float
    hi: float
    level: float
    values: list


def bootstrap_ci(values, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean of `values`.

    values: one number per unit (a 1-D sequence, at least one). The n_boot resamples draw len(values)
    units with replacement from numpy.random.default_rng(seed); lo and hi are the (1 - level)/2 and
    (1 + level)/2 quantiles (numpy's linear interpolation) of the resample means.
    NaN policy: a NaN among the values makes the mean and both bounds NaN.
    Bad input: ValueError naming values (not 1-D, empty), n_boot (< 1) or level (outside (0, 1)).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap_ci: values must be a non-empty 1-D sequence, got shape {list(x.shape)}")
    if not (isinstance(n_boot, int) and n_boot >= 1):
        raise ValueError(f"bootstrap_ci: n_boot must be an int >= 1, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level!r}")
    if np.isnan(x).any():
        return Interval(math.nan, math.nan, math.nan, level, x.tolist())
    draws = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    lo, hi = np.quantile(x[draws].mean(1), [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(x.mean()), float(lo), float(hi), level, x.tolist())


def paired_difference_ci(a, b, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> Interval:
    """Bootstrap interval of mean(a - b) for two conditions measured on the same units (a[u], b[u] of unit u):
    units are resampled, never the conditions apart. Arguments and policies as bootstrap_ci's."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference_ci: a and b must hold one value per unit each, got shapes "
                         f"{list(a.shape)} and {list(b.shape)}")
    return bootstrap_ci(a - b, n_boot, level, seed)
