"""NoiseTilt in plain PyTorch: the readable definition, the test oracle (float64) and the "reference" backend.

    ntrk_step:      x = mu + sigma_i (sqrt(rho_i) w + sqrt(1 - rho_i) eps)       per sample i
    twoos_project:  Y = x_i as [M, D]; Z = sort over tiles of (sort within tiles of Y);
                    Z <- clip(Z, lower, upper); undo both sorts          (specs/ntrk.md, "2OS")
Sorts order by (value, position), like the kernels, so every backend ranks ties the same way.
"""
from __future__ import annotations

import torch

from .. import _dtypes

# Philox4x32-10 (Triton's tl.randint4x stream) and the normal transform of csrc/include/diffkern/philox.h.
_KEY_A, _KEY_B, _ROUND_A, _ROUND_B = 0x9E3779B9, 0xBB67AE85, 0xD2511F53, 0xCD9E8D57
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b for uint32 values held in int64 (16-bit halves stay exact)."""
    p_hi, p_lo = (a >> 16) * b, (a & 0xFFFF) * b
    return (p_hi + (p_lo >> 16)) >> 16, (a * b) & _MASK32


def philox_randint4x(seed, offset: torch.Tensor, high: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The four uint32 words (in int64 tensors) of Philox4x32-10 at the 128-bit counter (offset, high),
    high = 0 unless given (int64 tensors, broadcast), key seed (an int or a 0-dim int64 tensor: read by
    tensor ops, never on the host)."""
    hi = torch.zeros_like(offset) if high is None else high
    c = [offset & _MASK32, (offset >> 32) & _MASK32, hi & _MASK32, (hi >> 32) & _MASK32]
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(c[2], _ROUND_B)
        hi_a, lo_a = _mulhilo(c[0], _ROUND_A)
        c = [hi_b ^ c[1] ^ k0, lo_b, hi_a ^ c[3] ^ k1, lo_a]
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c


def philox_uniform(r: torch.Tensor) -> torch.Tensor:
    """uint32 -> float32 in [0, 1): the int32 reading folded onto [0, 2^31) and scaled just below 1."""
    i = torch.where(r >= 2**31, 2**32 - 1 - r, r)
    return i.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


_COS = (1.0, -0.5, 4.1666666666666664e-2, -1.3888888888888889e-3, 2.4801587301587302e-5)
_SIN = (1.0, -0.16666666666666666, 8.3333333333333332e-3, -1.9841269841269841e-4, 2.7557319223985893e-6)


def _horner(coefs, f2):
    acc = torch.full_like(f2, coefs[-1])
    for c in reversed(coefs[:-1]):
        acc = c + f2 * acc
    return acc


def cos_2pi(u: torch.Tensor) -> torch.Tensor:
    """cos(2 pi u) for float32 u in [0, 1), as philox.h computes it (quadrant reduction + polynomials)."""
    q = 4.0 * u
    k = torch.floor(q + 0.5)
    f = (q - k) * torch.tensor(1.5707963267948966, dtype=torch.float32)
    f2 = f * f
    c, s = _horner(_COS, f2), f * _horner(_SIN, f2)
    quadrant = k.to(torch.int64) & 3
    return torch.where(quadrant == 0, c, torch.where(quadrant == 1, -s, torch.where(quadrant == 2, -c, s)))


def philox_randn(seed, offset: torch.Tensor) -> torch.Tensor:
    """float32 N(0, 1) draws at int64 `offset`s of stream `seed` (csrc/include/diffkern/philox.h)."""
    r = philox_randint4x(seed, offset.to(torch.int64))
    u1 = torch.clamp_min(philox_uniform(r[0]), 1e-7)
    return torch.sqrt(-2.0 * torch.log(u1)) * cos_2pi(philox_uniform(r[1]))


def _per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def ntrk_step(mu, sigma, w, rho, eps, philox):
    """Reference backend of diffkern::ntrk_step: x in mu's dtype, math in its accumulation dtype.

    eps None: drawn at philox = (seed, offset), an int64 [2] tensor on mu's device.
    """
    acc = _dtypes.acc(mu.dtype)
    if eps is None:
        flat = philox[1] + torch.arange(mu.numel(), dtype=torch.int64, device=mu.device)
        eps = philox_randn(philox[0], flat).reshape(mu.shape)
    s, r = _per_sample(sigma.to(acc), mu), _per_sample(rho.to(acc), mu)
    x = mu.to(acc) + s * torch.sqrt(r) * w.to(acc) + s * torch.sqrt(1 - r) * eps.to(acc)
    return x.to(mu.dtype)


def ntrk_step_bwd(dx, sigma, rho, w_grad: bool, eps_grad: bool) -> list:
    """Reference backend of diffkern::ntrk_step_bwd: [dw if w_grad] + [deps if eps_grad], dw = sigma sqrt(rho) dx and
    deps = sigma sqrt(1 - rho) dx, each per-sample factor formed in dx's accumulation dtype and rounded to dx's
    dtype before the one multiply: the ATen ops of ntrk_step's backward on GPUs (csrc/diffkern/autograd_ntrk.cpp)."""
    acc = _dtypes.acc(dx.dtype)
    s, r = _per_sample(sigma.detach().to(acc), dx), _per_sample(rho.detach().to(acc), dx)
    factors = ([s * r.sqrt()] if w_grad else []) + ([s * (1 - r).sqrt()] if eps_grad else [])
    return [dx * f.to(dx.dtype) for f in factors]


def _sort_by_value_then_position(v: torch.Tensor, dim: int):
    """torch.sort with ties in position order; -0.0 and +0.0 compare equal, as in the kernels."""
    return torch.sort(v, dim=dim, stable=True)


def project_pass(y: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, clip: bool):
    """One 2OS pass over y [B, M, D]: (y after the clip, or unchanged; in-band count per sample)."""
    S, P = _sort_by_value_then_position(y, 2)
    Z, Q = _sort_by_value_then_position(S, 1)
    inside = ((Z >= lower) & (Z <= upper)).flatten(1).sum(1)
    if clip:
        Z = torch.minimum(torch.maximum(Z, lower), upper)
    S = torch.empty_like(S).scatter_(1, Q, Z)
    return torch.empty_like(y).scatter_(2, P, S), inside


def twoos_project(x, lower, upper, max_passes):
    """Reference backend of diffkern::twoos_project: (out in x's dtype, in_set [B] in the accumulation dtype).

    At most max_passes clipping passes, stopping once every entry of every sample is in its band; then
    in_set is the fraction of the result's entries inside their bands.
    """
    acc = _dtypes.acc(x.dtype)
    B, (M, D) = x.shape[0], lower.shape
    y = x.to(acc).reshape(B, M, D)
    lo, hi = lower.to(acc), upper.to(acc)
    for p in range(max_passes + 1):
        y, inside = project_pass(y, lo, hi, clip=p < max_passes)
        if bool((inside == M * D).all()) or p == max_passes:
            break
    return y.reshape(x.shape).to(x.dtype), inside.to(acc) / (M * D)
