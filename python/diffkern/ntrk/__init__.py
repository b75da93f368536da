"""NoiseTilt: noise-tilted reverse kernels with 2OS whitening (specs/ntrk.md)."""
from .api import ntrk_step, twoos_project

__all__ = ["ntrk_step", "twoos_project"]
