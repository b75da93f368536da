"""Running one test body against every backend of an op."""
from __future__ import annotations

import contextlib

import torch

import diffkern
from diffkern import _triton

# Backends that run on CPU tensors in the tests; on a CUDA machine the GPU backends run on CUDA tensors too.
CPU_BACKENDS = ("cpu", "triton", "reference")


def device_for(backend: str) -> torch.device:
    """Where a backend's test inputs live: Triton runs on the GPU when there is one, else in the interpreter."""
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def supports(backend: str, dtype: torch.dtype) -> bool:
    """Whether `backend` computes in `dtype` (Triton kernels accumulate in float32: no float64)."""
    return not (backend == "triton" and dtype == torch.float64)


@contextlib.contextmanager
def forced(backend: str):
    """Forces `backend`; Triton launches under the interpreter are bounds-checked as well."""
    with diffkern.backend(backend):
        if backend == "triton" and _triton.interpreting():
            from .triton_monitor import TritonMonitor
            with TritonMonitor(check_bounds=True):
                yield
        else:
            yield
