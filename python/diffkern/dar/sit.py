"""SiT's flow-matching objective and ODE sampler for the DiT family of `diffkern.dar.blocks`.

Linear interpolant between noise (t = 0) and data (t = 1):
    x_t = (1 - t) * noise + t * x,      target velocity v = x - noise,
    loss = mean || model(x_t, t, y) - v ||^2
Sampling integrates dx/dt = model(x, t, y) from t = 0 to 1 with Euler steps. The network sees
TIME_SCALE * t, so its sinusoidal timestep features span the same range as DiT's 1000 discrete steps.
"""
from __future__ import annotations

import torch

TIME_SCALE = 1000.0


def velocity_loss(model, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The flow-matching loss on clean samples x [B, C, H, W] with labels y [B]; t ~ U(0, 1) per sample."""
    gen = {} if generator is None else {"generator": generator}  # not generator=None: torch.compile refuses it
    t = torch.rand(x.shape[0], dtype=x.dtype, **gen).to(x.device)
    noise = torch.randn(x.shape, dtype=x.dtype, **gen).to(x.device)
    tb = t.view(-1, *([1] * (x.dim() - 1)))
    x_t = (1 - tb) * noise + tb * x
    return (model(x_t, TIME_SCALE * t, y) - (x - noise)).pow(2).mean()


@torch.no_grad()
def sample(model, noise: torch.Tensor, y: torch.Tensor, steps: int = 50) -> torch.Tensor:
    """Euler integration of the learned velocity field from noise [B, C, H, W] (t = 0) to data (t = 1)."""
    x = noise
    for k in range(steps):
        t = torch.full((x.shape[0],), k / steps, dtype=x.dtype, device=x.device)
        x = x + model(x, TIME_SCALE * t, y) / steps
    return x
