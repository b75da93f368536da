"""NoiseTilt: noise-tilted reverse kernels with 2OS whitening (specs/ntrk.md)."""
from .api import ntrk_step, twoos_project
from .bands import twoos_bands
from .whiten import whiten

__all__ = ["ntrk_step", "twoos_bands", "twoos_project", "whiten"]
