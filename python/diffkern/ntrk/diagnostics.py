"""Is a vector a typical draw of N(0, I)? The checks the tests and the demo apply to injected noise.

looks_gaussian sees only the marginal distribution of the entries: a correlated Gaussian field (or a
small shift along a smooth direction) passes it. looks_white adds the same check on every sample's
orthonormal DCT coefficients (which are iid N(0, 1) too under N(0, I)): a non-flat spectrum makes them a
scale mixture of normals, hence heavy-tailed. common_direction_p tests the batch for a shared mean.
"""
from __future__ import annotations

import math

import torch
from scipy import fft, stats


def gaussianity(v: torch.Tensor) -> dict:
    """Moments, KS distance to N(0, 1) and lag-1 autocorrelation of v's entries (flattened, float64).

    For n iid N(0, 1) entries: mean ~ 1/sqrt(n), var - 1 ~ sqrt(2/n), skew ~ sqrt(6/n), excess kurtosis
    ~ sqrt(24/n), lag-1 autocorrelation ~ 1/sqrt(n); ks is Kolmogorov-Smirnov's D, with its p-value.
    """
    x = v.detach().reshape(-1).double().cpu()
    n = x.numel()
    mean, var = x.mean().item(), x.var(correction=0).item()
    c = (x - mean) / math.sqrt(var)
    ks = stats.kstest(x.numpy(), "norm")
    return {"n": n, "mean": mean, "var": var, "skew": c.pow(3).mean().item(), "kurt": c.pow(4).mean().item() - 3,
            "ks": float(ks.statistic), "ks_p": float(ks.pvalue), "lag1": (c[1:] * c[:-1]).mean().item()}


def looks_gaussian(v: torch.Tensor, sigmas: float = 5.0, ks_p: float = 1e-3) -> bool:
    """The marginal check: the four moments within `sigmas` standard errors of N(0, 1), KS p-value >= ks_p.

    (lag1 is reported by `gaussianity` but not checked: a whitened gradient keeps some of its spatial
    correlation; that is the guidance it carries.)
    """
    s = gaussianity(v)
    n = s["n"]
    limits = {"mean": 1 / math.sqrt(n), "var": math.sqrt(2 / n), "skew": math.sqrt(6 / n), "kurt": math.sqrt(24 / n)}
    centre = {"var": 1.0}
    return s["ks_p"] >= ks_p and all(abs(s[k] - centre.get(k, 0.0)) <= sigmas * se for k, se in limits.items())


def dct_coefficients(v: torch.Tensor) -> torch.Tensor:
    """Per sample, the orthonormal DCT-II of v [B, ...] over all its non-batch dims (float64, v's shape).

    An orthogonal map: a draw of N(0, I) gives N(0, I) coefficients. NaN policy: a NaN spreads over its sample.
    Bad input: ValueError naming v when it has no non-batch dim.
    """
    if v.dim() < 2:
        raise ValueError(f"dct_coefficients: v must be [B, ...] with at least one non-batch dim, got {list(v.shape)}")
    x = v.detach().double().cpu().numpy()
    return torch.from_numpy(fft.dctn(x, axes=tuple(range(1, x.ndim)), norm="ortho"))


def looks_white(v: torch.Tensor, sigmas: float = 5.0, ks_p: float = 1e-3) -> bool:
    """looks_gaussian (same limits) on v's entries AND on its per-sample DCT coefficients (v: [B, ...]).

    Under N(0, I) both hold; a spatially correlated v (a smooth guidance direction added to the noise)
    concentrates its energy in a few coefficients, whose pooled distribution then fails the moment or KS
    limits even where the entries' marginal passes.
    """
    return looks_gaussian(v, sigmas, ks_p) and looks_gaussian(dct_coefficients(v), sigmas, ks_p)


def common_direction_p(v: torch.Tensor) -> float:
    """p-value of "the samples of v [B, ...] are N(0, I) around mean 0": B |mean_b v_b|^2 ~ chi2(N), N the
    entries of one sample. Small when the batch shares a direction (e.g. one guidance direction for all).
    NaN policy: a NaN in v gives NaN."""
    x = v.detach().reshape(v.shape[0], -1).double().cpu()
    stat = x.shape[0] * x.mean(0).pow(2).sum().item()
    return float(stats.chi2(x.shape[1]).sf(stat))
