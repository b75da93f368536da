"""The public NoiseTilt ops: argument shaping around torch.ops.diffkern.ntrk_step / twoos_project."""
from __future__ import annotations

import math

import torch

from .. import _checks, _dtypes, _nvtx, _ops
from . import op  # noqa: F401  (registers the backends and fakes)


def _per_sample(name: str, value, mu: torch.Tensor) -> torch.Tensor:
    """A float, a 0-dim or a [B] tensor as the contiguous [B] tensor the op takes (accumulation dtype)."""
    B = mu.shape[0]
    if isinstance(value, torch.Tensor) and value.shape == (B,) and value.dtype in (torch.float32, torch.float64) \
            and value.device == mu.device and value.is_contiguous():
        return value  # already what the op takes: no conversion calls (they cost as much as the op at small B)
    acc = _dtypes.acc(mu.dtype)
    if not isinstance(value, torch.Tensor):
        return torch.full((B,), _checks.number("ntrk_step", name, value), dtype=acc, device=mu.device)
    if value.device != mu.device and (value.device.type == "meta" or mu.device.type == "meta"):
        raise ValueError(f"ntrk_step: {name} is on {value.device} but mu is on {mu.device}")
    if value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"ntrk_step: {name} must be a real tensor, got {_dtypes.name(value.dtype)}")
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] not in (1, B)):
        raise ValueError(f"ntrk_step: {name} must be a float, a 0-dim tensor or a [B] = [{B}] tensor, got shape "
                         f"{list(value.shape)}")
    return value.to(device=mu.device, dtype=acc if value.dtype not in (torch.float32, torch.float64) else value.dtype
                    ).reshape(-1).expand(B).contiguous()


def _philox_state(mu, generator, seed, offset) -> torch.Tensor:
    """The op's int64 [2] (seed, offset) tensor on mu's device; a seed not given is drawn from `generator`
    (torch's default generator of mu's device when None) by a tensor op, never read on the host, so the
    default call stays in one compiled graph and draws fresh noise on every call."""
    if offset < 0:
        raise ValueError(f"ntrk_step: offset must be >= 0, got {offset}")
    if seed is not None:
        # two fills, not torch.tensor([...]): no host-to-device copy, so the call can be graph-captured
        state = torch.full((2,), int(seed), dtype=torch.int64, device=mu.device)
        state[1].fill_(offset)
        return state
    if generator is None:  # no generator=None argument: fake tensors refuse it under dynamic shapes
        drawn = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=mu.device)
    else:
        drawn = torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64, device=generator.device)
    return torch.cat([drawn.to(mu.device), drawn.new_full((1,), offset, device=mu.device)])


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
            stream on every backend: the Philox words and uniforms are bit-identical, the float32 normal
            transform (log, sqrt, polynomial cos) may round differently per backend (FMA contraction,
            the platform's logf): each backend is within the error model of the float64 Box-Muller of
            the same uniforms (tests/test_ntrk_step.py). Measured over 2^20 draws: every backend within
            4.8e-7 of that float64 value (~1 ulp at |eps| ~ 4), ~20% of draws differing from
            reference.philox_randn in their last bits, by at most 7.2e-7.
            seed: given, or drawn on mu's device from `generator` (torch's default one for mu's device if
            None; torch.manual_seed reproduces it). The seed is drawn by a tensor op and passed to the
            kernel in a tensor, so the default call compiles into one graph (torch.compile(fullgraph=True))
            with no host sync and draws fresh noise per call; an explicit `generator` runs eagerly.
    Returns:
        x: mu's shape and dtype. One pass: reads mu, w (and eps when given) once, writes x once.
    Autograd: differentiable in mu, w and a given eps (dw = sigma sqrt(rho) dx, deps = sigma sqrt(1-rho) dx);
        sigma and rho get no gradient. Saved: sigma and rho ([B]). Double backward is supported (the step is
        linear in mu, w and eps, so the second-order terms are zero; gradgradcheck in float64).
    Backends: C++ (CPU tensors), CUDA C++ or Triton (CUDA tensors; CUDA C++ when built with CUDA), reference; see `diffkern.backend`.
    Bad input: TypeError (not a tensor, a float seed or offset) or ValueError (shape, dtype, device, a
        float sigma < 0 or rho outside [0, 1]), naming the argument. Tensor sigma and rho are not read
        back (no host sync).
    NaN/inf policy: propagated like the reference: NaN/inf in mu, w, eps or a sample's sigma make those
        outputs NaN/inf; a tensor rho outside [0, 1] gives that sample NaN.
    """
    mu, w = _checks.tensor("ntrk_step", "mu", mu), _checks.tensor("ntrk_step", "w", w)
    _checks.tensor("ntrk_step", "eps", eps, optional=True)
    if seed is not None:
        seed = _checks.integer("ntrk_step", "seed", seed)
    offset = _checks.integer("ntrk_step", "offset", offset)
    if not isinstance(rho, torch.Tensor) and not 0 <= _checks.number("ntrk_step", "rho", rho) <= 1:
        raise ValueError(f"ntrk_step: rho must be in [0, 1], got {rho}")
    if not isinstance(sigma, torch.Tensor) and not 0 <= _checks.number("ntrk_step", "sigma", sigma) < math.inf:
        raise ValueError(f"ntrk_step: sigma must be finite and >= 0, got {sigma}")
    if mu.dim() < 1:
        raise ValueError("ntrk_step: mu must be [B, ...], got a 0-dim tensor")
    philox = _philox_state(mu, generator, seed, offset) if eps is None else None
    with _nvtx.range("diffkern.ntrk_step"):
        return _ops.ops.ntrk_step(mu, _per_sample("sigma", sigma, mu), w, _per_sample("rho", rho, mu), eps,
                                philox)


def default_tile(n: int, limit: int = 256) -> int:
    """The largest divisor of n that is at most `limit` (n itself when n <= limit)."""
    return next(d for d in range(min(n, limit), 0, -1) if n % d == 0)


def _check_no_nan_bands(lower, upper) -> None:
    """A NaN bound is a ValueError, checked on the host (for CUDA tables one D2H copy of a flag and a wait
    for the current stream). Skipped under CUDA-graph capture and torch.compile tracing
    (_checks.values_readable): a bound is a value, never an index, so a NaN one only gives NaN or unclipped
    entries in its band, never an access out of bounds."""
    if _checks.values_readable(lower) and _checks.values_readable(upper) and \
            bool(torch.isnan(lower).any() | torch.isnan(upper).any()):
        raise ValueError("twoos_project: bands (lower, upper) must not hold NaN")


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
            `twoos_bands(M, D, alpha)`; a NaN bound raises ValueError, checked on the host: one sync for
            CUDA tables; not checked under CUDA-graph capture or torch.compile); passes: the cap on
            clipping passes (>= 0).
    Returns:
        (out, in_set): out like x; in_set [B] (float32, float64 for float64 x), the fraction of out's
        entries inside their bands (1.0 once converged; measured in float32 before rounding to x's dtype).
    Autograd: not differentiable (the outputs never require grad): the projection is piecewise
        constant or the identity per entry, and guidance differentiates before it, not through it.
    Backends: C++ (CPU tensors), Triton (CUDA tensors; D <= 1024), reference; see `diffkern.backend`.
    Memory: the Triton backend keeps ~22 bytes per entry of scratch (sorted values, int16 columns, int64 keys).
    Bad input: TypeError (not a tensor, a float tile or passes) or ValueError (shape, dtype, a tile that
        does not divide a sample, a band table of another shape), naming the argument.
    NaN/inf policy (every backend, as the reference): a NaN entry (either sign) ranks above every number
        (NaNs tie by position), stays NaN in out and counts as outside its band; +-inf entries are clipped
        to their band edges like any other value. A NaN in a user band table is an error (see `bands`).
    """
    from .bands import bands_for

    _checks.tensor("twoos_project", "x", x)
    tile = None if tile is None else _checks.integer("twoos_project", "tile", tile)
    if _checks.integer("twoos_project", "passes", passes) < 0:
        raise ValueError(f"twoos_project: passes must be >= 0, got {passes}")
    if x.dim() < 1:
        raise ValueError("twoos_project: x must be [B, ...], got a 0-dim tensor")
    n = math.prod(x.shape[1:])
    acc = _dtypes.acc(x.dtype)
    if bands is None:
        D = tile if tile is not None else default_tile(max(n, 1))
        if D < 1 or n % D:
            raise ValueError(f"twoos_project: tile must divide the {n} entries of a sample, got tile={tile}")
        alpha = _checks.number("twoos_project", "alpha", alpha)
        lower, upper = bands_for(max(n // D, 1), D, alpha, "normal", None, acc, x.device)
    else:
        if not (isinstance(bands, (list, tuple)) and len(bands) == 2):
            raise TypeError(f"twoos_project: bands must be a (lower, upper) pair of tensors, got "
                            f"{type(bands).__name__}")
        for name, b in zip(("bands[0] (lower)", "bands[1] (upper)"), bands):
            if not _checks.tensor("twoos_project", name, b).is_floating_point():
                raise ValueError(f"twoos_project: {name} must be a real floating tensor, got {_dtypes.name(b.dtype)}")
        _check_no_nan_bands(*bands)
        lower, upper = (b.to(x.device, acc).contiguous() for b in bands)
        if tile is not None and lower.dim() == 2 and lower.shape[1] != tile:
            raise ValueError(f"twoos_project: tile={tile} but the bands are [M, D] = {list(lower.shape)}")
    with _nvtx.range("diffkern.twoos_project"):
        return _ops.ops.twoos_project(x, lower, upper, int(passes))
