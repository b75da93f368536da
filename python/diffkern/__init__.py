"""diffkern: fused kernels for 2026 diffusion-transformer techniques, as torch custom ops.

Public API: the ops below (each also reachable as torch.ops.diffkern.*), `backend` to force an
implementation, `build_info` to see how the extension was built, and `empty_cache` / `cached_bytes` for the
CPU output cache (diffkern._cache). Everything imports without the compiled extension (the references,
models and modules run); a compiled op then raises ExtensionError.
"""
from ._cache import cached_bytes, empty_cache
from ._ops import ExtensionError, build_info
from ._version import __version__
from ._registry import backend
from .dar import dar_route
from .grpo import flow_sde_step, grpo_iso_loss
from .ntrk import ntrk_step, twoos_bands, twoos_project, whiten
from .rmdm import recurse
from .sinks import sink_attention, sink_attention_given, sink_mass

__all__ = ["ExtensionError", "backend", "build_info", "cached_bytes", "dar_route", "empty_cache", "flow_sde_step",
           "grpo_iso_loss", "ntrk_step", "recurse", "sink_attention", "sink_attention_given", "sink_mass",
           "twoos_bands", "twoos_project", "whiten", "__version__"]
