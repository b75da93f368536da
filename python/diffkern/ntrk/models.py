"""The samplers' view of a model: its schedule, its velocity and how a reward reads its x0 estimate.

Two forms become one interface (sigmas, velocity, score, grad_context), so the samplers in
diffkern.ntrk.sampling are written once:
  VelocityModel  a callable velocity(x, t, **cond) on the samplers' own schedule (flow_sigmas, shift 1)
  FlowModel      a diffkern.flow.FlowAdapter: the pipeline's sigmas, its velocity(x, sigma, cond) with its
                 classifier-free guidance, a reward on latents or on decoded images, optional gradient
                 checkpointing of the VJP
Both follow x_sigma = (1 - sigma) x0 + sigma noise, v = noise - x0, so x0_hat = x - sigma v.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .. import _checks
from ..grpo.reference import flow_sigmas

DEFAULT_STEPS = 25
REWARD_ON = ("latents", "pixels")
ADAPTER_ATTRS = ("sigmas", "velocity", "decode", "transformer", "vae")  # the FlowAdapter attributes FlowModel uses


class VelocityModel:
    """velocity(x, t, **cond) -> v (t: [B]) stepped over flow_sigmas(steps, shift=1.0): t from 0.999 to 0.
    The reward reads x0 as the velocity sees it."""

    def __init__(self, velocity: Callable, steps: int = DEFAULT_STEPS):
        self.fn, self.steps = velocity, steps

    def sigmas(self, device) -> torch.Tensor:
        return flow_sigmas(self.steps, shift=1.0, dtype=torch.float32).to(device)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.fn(x, sigma, **cond)

    def score(self, reward: Callable, x0: torch.Tensor) -> torch.Tensor:
        return reward(x0)

    def grad_context(self):
        return contextlib.nullcontext()


class FlowModel:
    """A diffkern.flow.FlowAdapter as the samplers see it.

    sigmas: adapter.sigmas (the pipeline's schedule: shift, dynamic shifting, terminal sigma; SD3 and FLUX
    start at sigma = 1); velocity: adapter.velocity(x, sigma [B], cond), guided when cond carries negative
    embeddings, so x0_hat and the reward gradient use the guided v the step uses; one velocity call is one
    NFE whatever the number of transformer calls inside it (2 under classifier-free guidance).

    reward_on: "latents": reward(x0 latents in the adapter's layout) -> [B]; "pixels": reward(images) -> [B]
    with images = adapter.decode(x0) in [0, 1] ([B, 3, H, W]; Wan [B, 3, F, H, W]), the VAE on the gradient's
    path. checkpoint: the VJP of the guided samplers runs with the transformer's (and, for a pixel reward,
    the VAE's) per-block gradient checkpointing (diffusers' enable_gradient_checkpointing: torch.utils.checkpoint
    around each block), which keeps one block's activations instead of the whole forward's; switched on for the
    VJP only and restored after (a model that already checkpoints is left as it is). Same gradient to rounding.
    """

    def __init__(self, adapter, reward_on: str = "latents", checkpoint: bool = False):
        if not all(hasattr(adapter, a) for a in ADAPTER_ATTRS):
            raise TypeError(f"FlowModel: adapter must be a diffkern.flow.FlowAdapter, got {type(adapter).__name__}")
        if reward_on not in REWARD_ON:
            raise ValueError(f"FlowModel: reward_on must be one of {REWARD_ON}, got {reward_on!r}")
        if not isinstance(checkpoint, bool):
            raise TypeError(f"FlowModel: checkpoint must be a bool, got {type(checkpoint).__name__}")
        if reward_on == "pixels" and adapter.vae is None:
            raise ValueError("FlowModel: reward_on='pixels' needs the adapter's vae (build it with from_pipe or vae=)")
        self.adapter, self.reward_on, self.checkpoint = adapter, reward_on, checkpoint
        self.steps = len(adapter.sigmas) - 1

    def sigmas(self, device) -> torch.Tensor:
        return self.adapter.sigmas.to(device)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.adapter.velocity(x, sigma, cond)

    def score(self, reward: Callable, x0: torch.Tensor) -> torch.Tensor:
        return reward(self.adapter.decode(x0) if self.reward_on == "pixels" else x0)

    @contextlib.contextmanager
    def grad_context(self):
        """Per-block gradient checkpointing on the modules the VJP goes through, for the duration."""
        modules = [self.adapter.transformer] + ([self.adapter.vae] if self.reward_on == "pixels" else [])
        switched = [m for m in modules if self.checkpoint and getattr(m, "_supports_gradient_checkpointing", False)
                    and not m.is_gradient_checkpointing]
        for m in switched:
            m.enable_gradient_checkpointing()
        try:
            yield
        finally:
            for m in switched:
                m.disable_gradient_checkpointing()


def as_model(model, steps, who: str):
    """The view of `model` (a velocity callable, a FlowAdapter or a FlowModel); steps: the callable's step
    count (default 25), for an adapter None or its own count (the schedule is the pipeline's)."""
    if steps is not None and _checks.integer(who, "steps", steps) < 1:
        raise ValueError(f"{who}: steps must be >= 1, got {steps}")
    if callable(model):
        return VelocityModel(model, DEFAULT_STEPS if steps is None else steps)
    if not isinstance(model, FlowModel):
        if not all(hasattr(model, a) for a in ADAPTER_ATTRS):
            raise TypeError(f"{who}: model must be a velocity callable, a diffkern.flow.FlowAdapter or a FlowModel, "
                            f"got {type(model).__name__}")
        model = FlowModel(model)
    if steps is not None and steps != model.steps:
        raise ValueError(f"{who}: steps={steps} but the adapter's schedule has {model.steps} steps (set "
                         "num_inference_steps on the adapter, leave steps=None)")
    return model
