"""Sigmas and timesteps of a FlowMatchEulerDiscreteScheduler exactly as diffusers' pipelines set them."""
from __future__ import annotations

import copy

import torch


def set_schedule(scheduler, num_inference_steps: int, *, sigmas=None, mu: float | None = None,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scheduler's own set_timesteps(num_inference_steps, device, sigmas=sigmas, mu=mu), run on a copy
    (copy.deepcopy: a shift set with set_shift is kept) so that `scheduler` is left as it was; the arguments are those the pipeline
    passes (see the families in diffkern.flow: SD3, FLUX, Wan).

    Returns (sigmas [K+1], timesteps [K]), float32 on `device`: sigmas from 1 (or shift_terminal's stretch) down
    to the terminal 0 appended by the scheduler, timesteps = sigmas[:K] * num_train_timesteps, the tensors the
    pipeline's denoising loop iterates over."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    fresh = copy.deepcopy(scheduler)
    kwargs = {} if mu is None else {"mu": mu}
    if sigmas is None:
        fresh.set_timesteps(num_inference_steps, device=device, **kwargs)
    else:
        fresh.set_timesteps(sigmas=sigmas, device=device, **kwargs)
    return fresh.sigmas, fresh.timesteps


def dynamic_shift_mu(scheduler_config, image_seq_len: int, max_shift_default: float) -> float:
    """mu of resolution-dependent shifting: the pipelines' calculate_shift(image_seq_len, base_image_seq_len,
    max_image_seq_len, base_shift, max_shift) with the scheduler config's values and the pipeline's defaults
    (max_shift: SD3 1.16, FLUX 1.15)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    return calculate_shift(image_seq_len, scheduler_config.get("base_image_seq_len", 256),
                           scheduler_config.get("max_image_seq_len", 4096), scheduler_config.get("base_shift", 0.5),
                           scheduler_config.get("max_shift", max_shift_default))
