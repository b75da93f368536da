"""One op, one schema, several backends: which implementation runs for a call, and the switch that forces one.

Default routing (no override):
  * CPU tensors  -> the C++ kernel registered in csrc/cpu/ (the dispatcher calls it directly);
  * CUDA tensors -> the first GPU backend an op provides, in `GPU_PREFERENCE` order (or the op's own,
    `register`'s gpu_preference), counting "cuda" only when diffkern._C was built with CUDA.
A missing backend is an error, never a silent fall back to a slower one.

`backend(name)` forces one backend for every diffkern op inside the block:
  "cpu"        the C++ CPU kernels (CPU tensors only)
  "triton"     the Triton kernels; on CPU tensors they run in the Triton interpreter, which needs
               TRITON_INTERPRET=1 set before triton is first imported (the tests do this)
  "cuda"       the CUDA C++ kernels (where an op has them; the `cuda` backend of op X calls the internal
               op diffkern::X_cuda). On CPU tensors they run in the host-execution harness, which only
               the tests load (diffkern.testing.cuda_harness)
  "reference"  the plain PyTorch reference (any device, float64 included)
The override is process-wide (it swaps the dispatcher's CPU kernels for the block), not per thread.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch

from . import _triton
from ._ops import BUILD_INFO, LOADED

BACKENDS = ("cpu", "triton", "cuda", "reference")
GPU_PREFERENCE = ("cuda", "triton")

_impls: dict[str, dict[str, Callable]] = {}
_checks: dict[str, Callable] = {}
_cuda_twin: dict[str, str] = {}
_gpu_preference: dict[str, tuple[str, ...]] = {}
_forced: list[str] = []
_cuda_lib = torch.library.Library("diffkern", "IMPL")


def register(op: str, check: Callable, cuda_twin: str | None = None, gpu_preference: tuple[str, ...] = GPU_PREFERENCE,
             **backends: Callable) -> None:
    """Registers the Python backends of `torch.ops.diffkern.<op>` and routes its CUDA key through them.

    `check(*args)` validates the op's arguments before any Python backend runs (the C++ kernels check
    the same in C++); a backend adds only its own limits. Check and backend run under the device of the
    first tensor argument (`_triton.device_guard`), so Triton launches reach that device's current stream.
    `cuda_twin`: the op whose diffkern::<twin>_cuda kernel the 'cuda' backend runs (default: `op` itself;
    an op composed of another names it, so a forced 'cuda' on CPU tensors is checked against its harness).
    `gpu_preference`: the order in which its backends are tried on CUDA tensors when none is forced.
    Without the extension (diffkern._ops.LOADED false) there is no op to route: nothing is registered.
    """
    if not LOADED:
        return
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backend(s) {sorted(unknown)} for diffkern::{op}; known: {BACKENDS}")
    _impls[op] = dict(backends)
    _checks[op] = check
    _cuda_twin[op] = cuda_twin or op
    _gpu_preference[op] = gpu_preference
    _cuda_lib.impl(op, functools.partial(_run_cuda, op), "CUDA")


def register_fake(op: str, fn: Callable | None = None):
    """torch.library.register_fake for a diffkern op (qualified name), skipped without the extension."""
    if LOADED:
        return torch.library.register_fake(op, fn)
    return fn if fn is not None else (lambda f: f)


def available(op: str) -> tuple[str, ...]:
    """The backends `op` has, the C++ CPU kernel included."""
    return ("cpu", *_impls[op])


def _implementation(op: str, name: str) -> Callable:
    fn = _impls[op].get(name)
    if fn is None:
        raise NotImplementedError(f"diffkern::{op} has no '{name}' backend; available: {available(op)}")

    def checked(*args):
        with _triton.device_guard(args):
            _checks[op](*args)
            return fn(*args)
    return checked


def _built(name: str) -> bool:
    """Whether this build of diffkern._C has backend `name`'s kernels for CUDA tensors."""
    return name != "cuda" or bool(BUILD_INFO["with_cuda"])


def gpu_backend(op: str) -> str:
    """The backend `op` runs on CUDA tensors when none is forced."""
    name = next((b for b in _gpu_preference[op] if b in _impls[op] and _built(b)), None)
    if name is None:
        raise NotImplementedError(f"diffkern::{op} has no GPU backend in this build; available: {available(op)}")
    return name


def _run_cuda(op: str, *args):
    if not _forced:
        return _implementation(op, gpu_backend(op))(*args)
    name = _forced[-1]
    if name == "cpu":
        raise RuntimeError(f"diffkern::{op}: backend 'cpu' was forced but the inputs are CUDA tensors")
    fn = _implementation(op, name)
    if not _built(name):
        raise RuntimeError(
            f"diffkern::{op}: backend 'cuda' was forced but diffkern._C was built without CUDA "
            f"(build info: {BUILD_INFO}); rebuild with a CUDA toolkit (DIFFKERN_CUDA=1) or force 'triton'")
    return fn(*args)


def _run_forced_on_cpu(op: str, name: str, *args):
    fn = _implementation(op, name)
    if name == "triton" and not _triton.interpreting():
        raise RuntimeError(
            f"diffkern::{op}: backend 'triton' on CPU tensors runs in the Triton interpreter, which needs "
            "TRITON_INTERPRET=1 in the environment before triton is imported")
    if name == "cuda" and harness_missing(op):
        raise RuntimeError(
            f"diffkern::{op}: backend 'cuda' on CPU tensors runs the CUDA kernels in the host-execution "
            "harness, which is not loaded (diffkern.testing.cuda_harness.load() builds and loads it)")
    return fn(*args)


def unchecked(op: str, name: str) -> Callable:
    """Backend `name` of `op` without its argument check, for an op composed of `op` whose own check covers
    op's (looked up when called; it runs under the composed op's device guard)."""
    return lambda *args: _impls[op][name](*args)


def harness_missing(op: str) -> bool:
    """Whether backend 'cuda' cannot run `op` on CPU tensors because the host-execution harness (tests only)
    is not loaded: its CUDA twin (`register`'s cuda_twin) has no CPU kernel."""
    return not torch._C._dispatch_has_kernel_for_dispatch_key(f"diffkern::{_cuda_twin[op]}_cuda", "CPU")


@contextlib.contextmanager
def backend(name: str):
    """Forces backend `name` ("cpu", "triton", "cuda" or "reference") for every diffkern op in the block."""
    if name not in BACKENDS:
        raise ValueError(f"diffkern.backend: unknown backend {name!r}; choose one of {BACKENDS}")
    if name == "cpu" and any(f != "cpu" for f in _forced):
        raise RuntimeError(f"diffkern.backend('cpu') cannot be nested inside diffkern.backend({_forced[-1]!r})")
    override = None
    if name != "cpu":
        override = torch.library.Library("diffkern", "IMPL")
        for op in _impls:
            override.impl(op, functools.partial(_run_forced_on_cpu, op, name), "CPU")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()
        if override is not None:
            override._destroy()
