"""W: the composition of 2OS projections that makes a guidance gradient a typical N(0, I) draw (specs/ntrk.md).

Per sample, on the flattened entries (N = M * D, tiles of D). The gradient is first scaled to unit
root-mean-square (not centred: a shift of every entry survives in part, as clipping to the upper
band edges); then each domain, in the order given, maps a statistic that is exactly
distributed under N(0, I) onto its 2OS confidence set and puts the change back:

  "value"        the N entries, ~N(0, 1) each                  bands twoos_bands(M, D)
  "tile_mean"    sqrt(D) * mean of each tile, M values ~N(0, 1)  bands twoos_bands(M', D'), M = M' D'
                 (tile shifted by the change of its mean)
  "tile_energy"  sum of squares of each tile, M values ~chi2(D)  bands twoos_bands(M', D', dist="chi2", dof=D)
                 (tile rescaled by sqrt(new / old energy))
  "fourier"      the three projections above applied to the orthonormal discrete Hartley transform of
                 the entries (Re - Im of the unitary DFT: orthogonal and its own inverse, so N(0, I) maps
                 to N(0, I)), then transformed back: catches correlations (a non-flat spectrum) the
                 value domain cannot see
D' is the largest divisor of M at most 256. A draw of N(0, I) passes every domain almost unchanged.
Domains apply in the order given; the default puts "fourier" first so the value-domain statistics
have the last word (the other order leaves the transform's clipping visible in the marginals: measured
excess kurtosis ~17 on a smooth field).
"""
from __future__ import annotations

import math

import torch

from .. import _checks, _dtypes
from .api import default_tile, twoos_project
from .bands import bands_for

DOMAINS = ("fourier", "value", "tile_mean", "tile_energy")
VALUE_DOMAINS = DOMAINS[1:]
# Bands at the 30% level: each order statistic is pulled into its central 70% interval. A draw of
# N(0, I) still passes with cosine 0.99996 (65,536 entries), while structured or heavy-tailed gradients
# come out with N(0, 1) moments and KS distance; at the spec's 99.99% (alpha = 1e-4) they stay at the
# band edges (measured excess kurtosis +0.2 to +0.4, KS p < 1e-3), failing the Gaussianity check.
WHITEN_ALPHA = 0.3


def _hartley(z: torch.Tensor) -> torch.Tensor:
    """Orthonormal DHT along the last dim, in float32/float64 (torch.fft has no half-precision CPU path)."""
    f = torch.fft.fft(z, norm="ortho")
    return f.real - f.imag


def _project_tiles(stat: torch.Tensor, alpha: float, passes: int, dist: str = "normal", dof=None) -> torch.Tensor:
    """2OS projection of the per-tile statistics [B, M] (tiles of the statistic: the largest divisor <= 256)."""
    M = stat.shape[1]
    d = default_tile(M)
    bands = bands_for(M // d, d, alpha, dist, dof, stat.dtype, stat.device)
    return twoos_project(stat.contiguous(), bands=bands, passes=passes)[0]


def _value_domains(z: torch.Tensor, domains, M: int, D: int, alpha: float, passes: int) -> torch.Tensor:
    """The "value", "tile_mean" and "tile_energy" projections of z [B, N], in the order given."""
    B, N = z.shape
    for domain in domains:
        if domain == "value":
            bands = bands_for(M, D, alpha, "normal", None, z.dtype, z.device)
            z = twoos_project(z.contiguous(), bands=bands, passes=passes)[0]
        elif domain == "tile_mean":
            t = z.view(B, M, D).mean(2) * math.sqrt(D)
            z = (z.view(B, M, D) + ((_project_tiles(t, alpha, passes) - t) / math.sqrt(D))[:, :, None]).view(B, N)
        else:
            e = z.view(B, M, D).pow(2).sum(2)
            e_new = _project_tiles(e, alpha, passes, "chi2", float(D))
            z = (z.view(B, M, D) * torch.sqrt(e_new / e.clamp_min(torch.finfo(z.dtype).tiny))[:, :, None]).view(B, N)
    return z


def whiten(g: torch.Tensor, domains=DOMAINS, tile: int | None = None, alpha: float = WHITEN_ALPHA, passes: int = 8):
    """Whitens a guidance gradient per sample into a typical draw of N(0, I): W(g) (specs/ntrk.md).

    w = P_k(... P_1(g / rms g)) for the domains P_1..P_k in `domains` (module docstring: each domain's
    statistic and band). A sample whose g is constant (all zero included) gives w = 0: 2OS would rank its
    equal entries by position, which is no guidance at all. Scale-invariant down to the smallest normal
    number: g is divided by its max-abs before the rms is formed (bitwise so for power-of-two scales).

    Args:
        g: [B, ...] float16/bfloat16/float32/float64, any latent shape; tile: D (default the largest
            divisor of the per-sample size at most 256); alpha: band level (default 0.3, see
            WHITEN_ALPHA; the spec's 1e-4 is 99.99%); passes: the cap on clipping passes of each projection.
    Returns: w, g's shape and dtype (math in float32, float64 for float64 g).
    Autograd: none (built on twoos_project, which is non-differentiable).
    Backends: each projection runs on the current backend of twoos_project; the rest is PyTorch.
    Bad input: TypeError (g not a tensor, a float tile or passes) or ValueError (g not a float dtype, an
        unknown domain, a tile that does not divide a sample, alpha outside (0, 1)), naming the argument.
    NaN/inf policy: like the reference (the same code): a NaN or inf in a sample makes that sample's w NaN;
        other samples are unaffected.
    """
    _checks.tensor("whiten", "g", g)
    if g.dtype not in _checks.FLOATS:
        raise ValueError(f"whiten: g dtype must be float16, bfloat16, float32 or float64, got {_dtypes.name(g.dtype)}")
    if isinstance(domains, str):
        domains = (domains,)
    tile = None if tile is None else _checks.integer("whiten", "tile", tile)
    if _checks.integer("whiten", "passes", passes) < 0:
        raise ValueError(f"whiten: passes must be >= 0, got {passes}")
    alpha = _checks.number("whiten", "alpha", alpha)
    if not 0 < alpha < 1:
        raise ValueError(f"whiten: alpha must be in (0, 1), got {alpha}")
    unknown = set(domains) - set(DOMAINS)
    if unknown:
        raise ValueError(f"whiten: unknown domain(s) {sorted(unknown)}; choose from {DOMAINS}")
    if g.dim() < 1:
        raise ValueError("whiten: g must be [B, ...], got a 0-dim tensor")
    B, N = g.shape[0], math.prod(g.shape[1:])
    if B == 0 or N == 0:
        return g.detach().clone()
    D = tile if tile is not None else default_tile(N)
    if D < 1 or N % D:
        raise ValueError(f"whiten: tile must divide the {N} entries of a sample, got tile={tile}")
    M = N // D
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    z = g.detach().reshape(B, N).to(acc)
    # max-abs first: the squares of a gradient below ~1e-19 (fp32) would underflow in the rms
    amax = z.abs().amax(1, keepdim=True)
    z = z / torch.where(amax > 0, amax, 1)
    live = z.std(1, keepdim=True, correction=0) != 0  # NaN: live, so the NaN propagates
    z = z / torch.where(live, z.pow(2).mean(1, keepdim=True).sqrt(), 1)
    for domain in domains:
        if domain == "fourier":
            z = _hartley(_value_domains(_hartley(z), VALUE_DOMAINS, M, D, alpha, passes))
        else:
            z = _value_domains(z, (domain,), M, D, alpha, passes)
    return torch.where(live, z, 0).reshape(g.shape).to(g.dtype)
