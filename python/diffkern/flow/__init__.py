"""diffkern.flow: diffusers flow-matching models (SD3, FLUX, Wan2.1) as a sampling loop sees them.

  FlowAdapter     sigmas / timesteps as the pipeline sets them, velocity(x, sigma, cond) with the pipeline's
                  exact transformer call and classifier-free guidance, encode, init_noise, decode
  sample          the plain Euler loop on an adapter (the stock pipeline's denoising)
  set_schedule    a FlowMatchEulerDiscreteScheduler's sigmas and timesteps, set the way a pipeline does

Needs diffusers (`pip install 'diffkern[diffusers]'`) only when used.
"""
from .adapter import FlowAdapter
from .sample import euler_step, sample
from .schedule import set_schedule

__all__ = ["FlowAdapter", "euler_step", "sample", "set_schedule"]
