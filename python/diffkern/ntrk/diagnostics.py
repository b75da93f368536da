"""Is a vector a typical draw of N(0, I)? The check the tests and the demo apply to injected noise."""
from __future__ import annotations

import math

import torch
from scipy import stats


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
