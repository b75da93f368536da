"""SiT's flow-matching objective and its samplers (Euler ODE, Euler–Maruyama SDE, classifier-free guidance)
for the DiT family of `diffkern.dar.blocks`.

Linear interpolant between noise (t = 0) and data (t = 1), SiT's own convention:
    x_t = (1 - t) * noise + t * x,      target velocity v = x - noise,
    loss = mean || model(x_t, t, y) - v ||^2
The learned v(x, t) = E[x - noise | x_t = x] gives the score of p_t: x_t - t v = E[noise | x_t], so
    s(x, t) = grad log p_t(x) = -E[noise | x_t = x] / (1 - t) = (t v - x) / (1 - t).
Samplers, from noise at t = 0 to data at t = 1 (`sample`):
    "ode": dx = v dt, Euler steps;
    "sde": dx = [v + w(t)/2 s] dt + sqrt(w(t)) dW, Euler–Maruyama, with SiT's default diffusion ("sigma"
           form) w(t) = 2 * diffusion_norm * (1 - t); every such SDE has the ODE's marginals p_t. The drift
           is v + diffusion_norm (t v - x): the 1/(1 - t) of the score cancels.
The network sees TIME_SCALE * t, so its sinusoidal timestep features span the same range as DiT's 1000
discrete steps. A model with a learned-sigma head (`learn_sigma=True`, the default of `dit()` and of SiT's
own code: 2C output channels for C input channels) gives its velocity in the first C channels; the other C
are ignored (no loss, no gradient), as SiT's forward does with `x.chunk(2, dim=1)[0]`.
"""
from __future__ import annotations

import math

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


METHODS = ("ode", "sde")


def null_class_of(model, null_class: int | None) -> int:
    """The label that asks `model` for its unconditional velocity: `null_class` when given, else the class
    that label dropout trains (a `DiT`'s y_embedder.num_classes when class_dropout_prob > 0)."""
    if null_class is not None:
        return int(null_class)
    labels = getattr(model, "y_embedder", None)
    if labels is not None and getattr(labels, "dropout_prob", 0) > 0:
        return int(labels.num_classes)
    raise ValueError("null_class: classifier-free guidance (cfg_scale != 1) needs a null class; the model has none "
                     "(no y_embedder with class_dropout_prob > 0), so pass null_class")


def guided_velocity(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float = 1.0,
                    null_class: int | None = None) -> torch.Tensor:
    """Classifier-free guidance on all C velocity channels: v_u + cfg_scale (v_c - v_u), v_c at labels y and
    v_u at the null class (`null_class_of`), both from one model call on the doubled batch; cfg_scale = 1 is
    one plain call, `velocity(model, x, t, y)`. Shapes as `velocity`."""
    if cfg_scale == 1:
        return velocity(model, x, t, y)
    null = torch.full_like(y, null_class_of(model, null_class))
    both = velocity(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    cond, uncond = both.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def _check(steps, method, cfg_scale, diffusion_norm, last_step_size):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    least = 1 if method == "ode" else 2
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < least:
        raise ValueError(f"steps must be an int >= {least} for method={method!r}, got {steps!r}")
    if not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be finite, got {cfg_scale}")
    if not diffusion_norm >= 0:
        raise ValueError(f"diffusion_norm must be >= 0, got {diffusion_norm}")
    if not 0 <= last_step_size < 1:
        raise ValueError(f"last_step_size must be in [0, 1), got {last_step_size}")


@torch.no_grad()
def sample(model, noise: torch.Tensor, y: torch.Tensor, steps: int = 50, method: str = "ode",
           cfg_scale: float = 1.0, null_class: int | None = None, diffusion_norm: float = 1.0,
           last_step_size: float = 0.04, generator: torch.Generator | None = None) -> torch.Tensor:
    """Samples [B, C, H, W] (the state at t = 1) from noise [B, C, H, W] (t = 0) with labels y [B] int64.

    method="ode": `steps` Euler steps x <- x + v(x, k/steps) / steps, k = 0 .. steps-1.
    method="sde": SiT's SDE sampler (module docstring), `steps` model evaluations in all (SiT's count):
        steps - 1 Euler–Maruyama steps of dt = (1 - h) / (steps - 1) from t = 0 to 1 - h, h = last_step_size,
            x <- x + [v + diffusion_norm (t v - x)] dt + sqrt(2 diffusion_norm (1 - t) dt) z,  z ~ N(0, I),
        then SiT's last step ("Mean"), the drift alone over h: x <- x + [v + diffusion_norm (t v - x)] h at
        t = 1 - h (with h = 0 there is no last step and the Euler–Maruyama steps end at t = 1).
        SiT's defaults: diffusion_norm 1, h = 0.04, 250 steps. diffusion_norm = 0 is the ODE on that grid
        (with h = 1/steps, the ODE sampler's grid). z is drawn with `generator` (on its device), so a seeded
        generator makes the samples reproducible.
    Guidance: v is the guided velocity v_u + cfg_scale (v_c - v_u) (`guided_velocity`) on all C channels, the
    score of the SDE taken from it as SiT does; cfg_scale = 1 is the conditional sampler, 0 the unconditional.
    SiT's and DiT's own forward_with_cfg guide only the first 3 of the 4 latent channels (kept there for exact
    reproduction of their samples); here every channel is guided, as classifier-free guidance is defined.
    null_class: the unconditional label, by default the model's label-dropout class (`null_class_of`).
    A learned-sigma model's first C output channels are the velocity. No NaN handling: a non-finite model
    output propagates. Raises ValueError naming steps, method, cfg_scale, null_class, diffusion_norm or
    last_step_size when invalid.
    """
    _check(steps, method, cfg_scale, diffusion_norm, last_step_size)
    if cfg_scale != 1:
        null_class = null_class_of(model, null_class)  # refused here, before any model call

    def v_at(x: torch.Tensor, t: float) -> torch.Tensor:
        return guided_velocity(model, x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device), y,
                               cfg_scale, null_class)

    def drift(x: torch.Tensor, t: float) -> torch.Tensor:  # the SDE's drift v + w(t)/2 s, w/2 s = norm (t v - x)
        v = v_at(x, t)
        return v + diffusion_norm * (t * v - x)
    x = noise
    if method == "ode":
        for k in range(steps):
            x = x + v_at(x, k / steps) / steps
        return x
    dt = (1 - last_step_size) / (steps - 1)
    device = generator.device if generator is not None else x.device
    for k in range(steps - 1):
        t = k * dt
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
        x = x + drift(x, t) * dt + math.sqrt(2 * diffusion_norm * (1 - t) * dt) * z
    if last_step_size:
        x = x + drift(x, 1 - last_step_size) * last_step_size
    return x
