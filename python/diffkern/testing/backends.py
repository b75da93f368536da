"""Running one test body against every backend of an op."""
from __future__ import annotations

import contextlib

import torch

import diffkern
from diffkern import _triton
from diffkern._ops import BUILD_INFO

from . import cuda_harness

# Backends that run on CPU tensors in the tests; on a CUDA machine the GPU backends run on CUDA tensors too.
# "cuda" runs in the host-execution harness, once the tests' conftest has loaded it.
CPU_BACKENDS = ("cpu", "triton", *(("cuda",) if cuda_harness.loaded() else ()), "reference")


def device_for(backend: str) -> torch.device:
    """Where a backend's test inputs live: the GPU when there is one (and, for "cuda", the build has its
    kernels), else CPU tensors (Triton in its interpreter, CUDA C++ in the harness)."""
    on_gpu = backend == "triton" or (backend == "cuda" and BUILD_INFO["with_cuda"])
    return torch.device("cuda" if on_gpu and torch.cuda.is_available() else "cpu")


def supports(backend: str, dtype: torch.dtype) -> bool:
    """Whether `backend` computes in `dtype` (the Triton and CUDA kernels accumulate in float32: no float64)."""
    return not (backend in ("triton", "cuda") and dtype == torch.float64)


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
