"""The public NoiseTilt ops: argument shaping around torch.ops.diffkern.ntrk_step / twoos_project."""
from __future__ import annotations

import math

import torch

from .. import _dtypes, _nvtx
from . import op  # noqa: F401  (registers the backends and fakes)


def _per_sample(name: str, value, mu: torch.Tensor) -> torch.Tensor:
    """A float, a 0-dim or a [B] tensor as the contiguous [B] tensor the op takes (accumulation dtype)."""
    B = mu.shape[0]
    if isinstance(value, torch.Tensor) and value.shape == (B,) and value.dtype in (torch.float32, torch.float64) \
            and value.device == mu.device and value.is_contiguous():
        return value  # already what the op takes: no conversion calls (they cost as much as the op at small B)
    acc = _dtypes.acc(mu.dtype)
    if not isinstance(value, torch.Tensor):
        return torch.full((B,), float(value), dtype=acc, device=mu.device)
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] not in (1, B)):
        raise ValueError(f"ntrk_step: {name} must be a float, a 0-dim tensor or a [B] = [{B}] tensor, got shape "
                         f"{list(value.shape)}")
    return value.to(device=mu.device, dtype=acc if value.dtype not in (torch.float32, torch.float64) else value.dtype
                    ).reshape(-1).expand(B).contiguous()


def ntrk_step(mu, sigma, w, rho, eps=None, generator: torch.Generator | None = None, seed: int | None = None,
              offset: int = 0):
    """The noise-tilted reverse step: the model's mean and sigma, the whitened guidance in the noise.

        x = mu + sigma_i (sqrt(rho_i) w + sqrt(1 - rho_i) eps)          per sample i

    Args:
        mu: [B, ...] the model's reverse mean; w: same shape and dtype, the whitened guidance (see
            `whiten`); eps: optional, same shape and dtype; all contiguous, float16/bfloat16/float32
            (float64 on the cpu/reference backends).
        sigma, rho: floats, 0-dim or [B] tensors; rho in [0, 1] (outside gives NaN for that sample).
        eps = None draws eps in the kernel: eps[n] = the Philox4x32-10 normal at (seed, offset + n) for
            the flat element index n (csrc/include/diffkern/philox.h; tl.randint4x's words), the same
            numbers on every backend. seed: given, or drawn from `generator` (torch's default one if None).
    Returns:
        x: mu's shape and dtype. One pass: reads mu, w (and eps when given) once, writes x once.
    Autograd: differentiable in mu, w and a given eps (dw = sigma sqrt(rho) dx, deps = sigma sqrt(1-rho) dx);
        sigma and rho get no gradient. Saved: sigma and rho ([B]). Double backward is supported (the step is
        linear in mu, w and eps, so the second-order terms are zero; gradgradcheck in float64).
    Backends: C++ (CPU tensors), CUDA C++ or Triton (CUDA tensors; CUDA C++ when built with CUDA), reference; see `diffkern.backend`.
    """
    if not isinstance(rho, torch.Tensor) and not 0 <= rho <= 1:
        raise ValueError(f"ntrk_step: rho must be in [0, 1], got {rho}")
    if not isinstance(sigma, torch.Tensor) and not 0 <= sigma < math.inf:
        raise ValueError(f"ntrk_step: sigma must be finite and >= 0, got {sigma}")
    if mu.dim() < 1:
        raise ValueError("ntrk_step: mu must be [B, ...], got a 0-dim tensor")
    if eps is None and seed is None:
        device = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())
    with _nvtx.range("diffkern.ntrk_step"):
        return torch.ops.diffkern.ntrk_step(mu, _per_sample("sigma", sigma, mu), w, _per_sample("rho", rho, mu), eps,
                                            0 if seed is None else int(seed), int(offset))


def default_tile(n: int, limit: int = 256) -> int:
    """The largest divisor of n that is at most `limit` (n itself when n <= limit)."""
    return next(d for d in range(min(n, limit), 0, -1) if n % d == 0)


def twoos_project(x, tile: int | None = None, bands=None, passes: int = 8, alpha: float = 1e-4):
    """Projects each sample onto the 2OS Gaussian confidence set (specs/ntrk.md).

    Per sample (x flattened to N = M * D entries, Y = [M, D] tiles): Z = sort over tiles of (sort within
    tiles of Y); clip Z[r, j] to [lower[r, j], upper[r, j]]; undo both sorts. Re-sorting the clipped
    values can re-pair ranks, so the pass repeats until every entry is in its band or `passes` clips
    were made. Ranks order by (value, position), so results are deterministic.

    Args:
        x: [B, ...] contiguous float16/bfloat16/float32 (float64 on cpu/reference); any latent shape.
        tile: D; default the largest divisor of N at most 256 (FLUX 16x128x128: 256; Wan 16x21x60x104:
            256 with M = 8190). bands: optional (lower, upper) [M, D] tables (default
            `twoos_bands(M, D, alpha)`); passes: the cap on clipping passes (>= 0).
    Returns:
        (out, in_set): out like x; in_set [B] (float32, float64 for float64 x), the fraction of out's
        entries inside their bands (1.0 once converged; measured in float32 before rounding to x's dtype).
    Autograd: not differentiable (the outputs never require grad): the projection is piecewise
        constant or the identity per entry, and guidance differentiates before it, not through it.
    Backends: C++ (CPU tensors), Triton (CUDA tensors; D <= 1024), reference; see `diffkern.backend`.
    Memory: the Triton backend keeps ~22 bytes per entry of scratch (sorted values, int16 columns, int64 keys).
    """
    from .bands import bands_on

    if x.dim() < 1:
        raise ValueError("twoos_project: x must be [B, ...], got a 0-dim tensor")
    n = math.prod(x.shape[1:])
    acc = _dtypes.acc(x.dtype)
    if bands is None:
        D = tile if tile is not None else default_tile(max(n, 1))
        if D < 1 or n % D:
            raise ValueError(f"twoos_project: tile must divide the {n} entries of a sample, got tile={tile}")
        lower, upper = bands_on(max(n // D, 1), D, float(alpha), "normal", None, acc, x.device)
    else:
        lower, upper = (b.to(x.device, acc).contiguous() for b in bands)
        if tile is not None and lower.dim() == 2 and lower.shape[1] != tile:
            raise ValueError(f"twoos_project: tile={tile} but the bands are [M, D] = {list(lower.shape)}")
    with _nvtx.range("diffkern.twoos_project"):
        return torch.ops.diffkern.twoos_project(x, lower, upper, int(passes))
