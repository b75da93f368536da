"""Running one test body against every backend of an op."""
from __future__ import annotations

import contextlib

import torch

import diffkern
from diffkern import _registry, _triton
from diffkern._ops import BUILD_INFO

from . import cuda_harness

def backends_under_test(op: str) -> tuple[str, ...]:
    """The backends of torch.ops.diffkern.<op> that the tests run: all it has, where "cuda" needs either
    a CUDA build on a GPU machine or the host-execution harness (loaded by the tests' conftest)."""
    cuda_runs = cuda_harness.loaded() or (BUILD_INFO["with_cuda"] and torch.cuda.is_available())
    return tuple(b for b in ("cpu", "triton", "cuda", "reference")
                 if b in _registry.available(op) and (b != "cuda" or cuda_runs))


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
