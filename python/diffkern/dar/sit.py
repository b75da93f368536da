"""SiT's flow-matching objective and ODE sampler for the DiT family of `diffkern.dar.blocks`.

Linear interpolant between noise (t = 0) and data (t = 1):
    x_t = (1 - t) * noise + t * x,      target velocity v = x - noise,
    loss = mean || model(x_t, t, y) - v ||^2
Sampling integrates dx/dt = model(x, t, y) from t = 0 to 1 with Euler steps. The network sees
TIME_SCALE * t, so its sinusoidal timestep features span the same range as DiT's 1000 discrete steps.
A model with a learned-sigma head (`learn_sigma=True`, the default of `dit()` and of SiT's own code:
2C output channels for C input channels) gives its velocity in the first C channels; the other C are
ignored (no loss, no gradient), as SiT's forward does with `x.chunk(2, dim=1)[0]`.
"""
from __future__ import annotations

import torch

TIME_SCALE = 1000.0


def velocity(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The model's velocity at x [B, C, ...], t in [0, 1] [B], labels y [B]: model(x, TIME_SCALE * t, y),
    whose output is [B, C, ...] or, with a learned-sigma head, [B, 2C, ...] (the first C channels kept)."""
    out = model(x, TIME_SCALE * t, y)
    C = x.shape[1]
    if out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:] or out.shape[1] not in (C, 2 * C):
        raise ValueError(f"model output must be [B, C, ...] or [B, 2C, ...] (learned sigma) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(out.shape)}")
    return out[:, :C]


def velocity_loss(model, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The flow-matching loss on clean samples x [B, C, H, W] with labels y [B]; t ~ U(0, 1) per sample.
    A model output of 2C channels (learn_sigma=True) is scored on its first C channels."""
    gen = {} if generator is None else {"generator": generator}  # not generator=None: torch.compile refuses it
    t = torch.rand(x.shape[0], dtype=x.dtype, **gen).to(x.device)
    noise = torch.randn(x.shape, dtype=x.dtype, **gen).to(x.device)
    tb = t.view(-1, *([1] * (x.dim() - 1)))
    x_t = (1 - tb) * noise + tb * x
    return (velocity(model, x_t, t, y) - (x - noise)).pow(2).mean()


@torch.no_grad()
def sample(model, noise: torch.Tensor, y: torch.Tensor, steps: int = 50) -> torch.Tensor:
    """Euler integration of the learned velocity field from noise [B, C, H, W] (t = 0) to data (t = 1);
    a learned-sigma model's first C output channels are the velocity."""
    x = noise
    for k in range(steps):
        t = torch.full((x.shape[0],), k / steps, dtype=x.dtype, device=x.device)
        x = x + velocity(model, x, t, y) / steps
    return x
