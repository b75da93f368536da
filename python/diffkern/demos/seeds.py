"""Across-seed summaries for the demos: one number per seed, its mean and a Student-t interval.

With the 3-10 seeds a demo can afford, a percentile bootstrap under-covers (it can never reach past the
extreme seeds); the t interval mean ± t_{n-1, (1+level)/2} · s / sqrt(n) is the standard choice.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats

from ..sinks.bootstrap import Interval


def t_interval(values, level: float = 0.95) -> Interval:
    """Student-t interval of the mean of `values` (one number per seed, a 1-D sequence of at least two).

    lo, hi = mean ∓ t_{n-1, (1+level)/2} · s / sqrt(n), s the sample standard deviation (ddof=1).
    NaN policy: a NaN among the values makes the mean and both bounds NaN.
    Bad input: ValueError naming values (not 1-D, fewer than two) or level (outside (0, 1)).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size < 2:
        raise ValueError(f"t_interval: values must be a 1-D sequence of at least two seeds, got shape {list(x.shape)}")
    if not 0 < level < 1:
        raise ValueError(f"t_interval: level must be in (0, 1), got {level!r}")
    if np.isnan(x).any():
        return Interval(math.nan, math.nan, math.nan, level, x.tolist())
    half = stats.t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    mean = float(x.mean())
    return Interval(mean, mean - half, mean + half, level, x.tolist())


def t_interval_dict(values, level: float = 0.95) -> dict:
    """t_interval(values, level) as the JSON-ready dict the demos store (the Interval's fields)."""
    return dataclasses.asdict(t_interval(values, level))


def fmt(iv: Interval | dict, digits: int = 3) -> str:
    """`mean [lo, hi]` with `digits` significant digits, for the demos' Markdown tables; iv is an Interval or
    its stored dict form (other keys of the dict are ignored)."""
    mean, lo, hi = (iv["mean"], iv["lo"], iv["hi"]) if isinstance(iv, dict) else (iv.mean, iv.lo, iv.hi)
    return f"{mean:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"
