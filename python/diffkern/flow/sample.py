"""The plain Euler ODE loop over a FlowAdapter's schedule: the reference loop the samplers perturb."""
from __future__ import annotations

import torch


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """x + (sigma_next - sigma) v in float32, returned in v's dtype: FlowMatchEulerDiscreteScheduler.step's
    arithmetic (sigma, sigma_next 0-dim float32)."""
    return (x.to(torch.float32) + (sigma_next - sigma) * v).to(v.dtype)


def sample(adapter, x: torch.Tensor, cond: dict) -> torch.Tensor:
    """Integrates dx/dsigma = v(x, sigma, cond) from sigmas[0] to sigmas[K] = 0 with Euler steps: x the
    initial noise (adapter.init_noise), cond from adapter.encode. Returns the final latents, the stock pipeline's
    output_type="latent" result on the same noise (same calls, same arithmetic)."""
    sigmas = adapter.sigmas
    for k in range(len(sigmas) - 1):
        v = adapter.velocity(x, sigmas[k].expand(x.shape[0]), cond)
        x = euler_step(x, v, sigmas[k], sigmas[k + 1])
    return x
