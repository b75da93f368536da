"""NVTX ranges around the public wrappers, for Nsight timelines; off unless DIFFKERN_NVTX=1."""
import contextlib
import os

import torch

from . import _optional

ENABLED = os.environ.get("DIFFKERN_NVTX", "0") == "1"


def range(name: str):
    """An NVTX range named `name` (domain "diffkern") when enabled and not tracing for torch.compile."""
    if not ENABLED or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    nvtx = _optional.require("nvtx", "nvtx")
    return nvtx.annotate(name, domain="diffkern")
