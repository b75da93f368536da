"""NoiseTilt as torch ops: argument checks, fake (meta) implementations, backends.

The schemas live in csrc/diffkern/ops.cpp, the C++ CPU kernels in csrc/cpu/ntrk.cpp and the autograd in
csrc/diffkern/autograd_ntrk.cpp; this file registers everything Python owns for diffkern::ntrk_step and
diffkern::twoos_project. The public functions (with their docstrings) are in ntrk/api.py.
"""
from __future__ import annotations

import torch

from .. import _checks, _dtypes, _lazy, _ops, _registry, _triton
from . import reference
triton_kernels = _lazy.module(__package__ + ".triton_kernels")  # imports triton on first use

STEP_OP, PROJECT_OP = "ntrk_step", "twoos_project"


def _check_per_sample(op, t, name, mu, B, lead="mu"):
    if t.device != mu.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {lead} is on {mu.device}")
    if t.dim() != 1 or t.shape[0] != B:
        raise ValueError(f"{op}: {name} must be [B] = [{B}], got shape {list(t.shape)}")
    if t.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: {name} dtype must be float32 or float64, got {_dtypes.name(t.dtype)}")


def check_step(mu, sigma, w, rho, eps, philox) -> None:
    """The checks csrc/cpu/ntrk.cpp makes, in the same order and words."""
    if mu.dim() < 1:
        raise ValueError(f"{STEP_OP}: mu must be [B, ...], got a 0-dim tensor")
    _checks.check_float_contiguous(STEP_OP, "mu", mu)
    for name, y in (("w", w), ("eps", eps)):
        if y is None:
            continue
        if y.shape != mu.shape:
            raise ValueError(f"{STEP_OP}: {name} has shape {list(y.shape)} but mu has shape {list(mu.shape)}")
        _checks.check_like(STEP_OP, name, y, "mu", mu)
    _check_per_sample(STEP_OP, sigma, "sigma", mu, mu.shape[0])
    _check_per_sample(STEP_OP, rho, "rho", mu, mu.shape[0])
    if philox is None:
        if eps is None:
            raise ValueError(f"{STEP_OP}: philox (the int64 [2] tensor (seed, offset)) is required when eps is None")
        return
    if philox.device != mu.device:
        raise ValueError(f"{STEP_OP}: philox is on {philox.device} but mu is on {mu.device}")
    if philox.dtype != torch.int64 or philox.shape != (2,) or not philox.is_contiguous():
        raise ValueError(f"{STEP_OP}: philox must be a contiguous int64 [2] tensor (seed, offset), got "
                         f"{_dtypes.name(philox.dtype)} of shape {list(philox.shape)}")


def check_step_bwd(dx, sigma, rho, w_grad=True, eps_grad=True) -> None:
    """The checks csrc/cpu/ntrk.cpp makes of ntrk_step_bwd's arguments, in the same order and words (the two
    flags are bools by the schema)."""
    op = STEP_OP + "_bwd"
    if dx.dim() < 1:
        raise ValueError(f"{op}: dx must be [B, ...], got a 0-dim tensor")
    _checks.check_float_contiguous(op, "dx", dx)
    _check_per_sample(op, sigma, "sigma", dx, dx.shape[0], "dx")
    _check_per_sample(op, rho, "rho", dx, dx.shape[0], "dx")


def check_project(x, lower, upper, max_passes) -> None:
    """The checks csrc/cpu/ntrk.cpp makes, in the same order and words."""
    if x.dim() < 1:
        raise ValueError(f"{PROJECT_OP}: x must be [B, ...], got a 0-dim tensor")
    _checks.check_float_contiguous(PROJECT_OP, "x", x)
    if lower.dim() != 2 or upper.shape != lower.shape:
        raise ValueError(f"{PROJECT_OP}: lower and upper must be [M, D] tables of one shape, got "
                         f"{list(lower.shape)} and {list(upper.shape)}")
    acc = _dtypes.acc(x.dtype)
    for name, t in (("lower", lower), ("upper", upper)):
        if t.device != x.device:
            raise ValueError(f"{PROJECT_OP}: {name} is on {t.device} but x is on {x.device}")
        if t.dtype != acc or not t.is_contiguous():
            raise ValueError(f"{PROJECT_OP}: {name} must be a contiguous tensor of dtype {_dtypes.name(acc)} "
                             f"(x's accumulation dtype), got {_dtypes.name(t.dtype)}")
    B, (M, D) = x.shape[0], lower.shape
    if not (M >= 1 and 1 <= D <= 32768 and M < 2**31):
        raise ValueError(f"{PROJECT_OP}: the band table must be [M, D] with M >= 1 and 1 <= D <= 32768, got "
                         f"{list(lower.shape)}")
    n = x.numel() // B if B else 0
    if B and n != M * D:
        raise ValueError(f"{PROJECT_OP}: each sample of x has {n} entries but the band table is [M, D] = "
                         f"{list(lower.shape)} (M * D entries)")
    if max_passes < 0:
        raise ValueError(f"{PROJECT_OP}: max_passes must be >= 0, got {max_passes}")


def _triton_backend(launch, op: str):
    """The Triton backend: `launch`, once the latents (argument 0) are known not to be float64."""
    def run(*args):
        _triton.check_float32_math(op, args[0].dtype, "latents")
        return launch(*args)
    return run


_registry.register(STEP_OP, check_step, triton=_triton_backend(triton_kernels.function("ntrk_step"), STEP_OP),
                   cuda=_ops.ops.ntrk_step_cuda, reference=reference.ntrk_step)
# The fused backward kernel is C++ on CPU only (the autograd calls it for CPU tensors): every other backend is the
# ATen form, so a forced backend on CPU tensors runs the backward the GPUs run.
_registry.register(STEP_OP + "_bwd", check_step_bwd, cuda_twin=STEP_OP,
                   triton=reference.ntrk_step_bwd, cuda=reference.ntrk_step_bwd, reference=reference.ntrk_step_bwd)
_registry.register(PROJECT_OP, check_project,
                   triton=_triton_backend(triton_kernels.function("twoos_project"), PROJECT_OP),
                   reference=reference.twoos_project)


@_registry.register_fake("diffkern::ntrk_step")
def _step_fake(mu, sigma, w, rho, eps, philox):
    check_step(mu, sigma, w, rho, eps, philox)
    return mu.new_empty(mu.shape)


# The internal op of the cuda backend (its kernel lives in csrc/cuda/ntrk_step.cu) shares the public op's fake.
_registry.register_fake("diffkern::ntrk_step_cuda")(_step_fake)


@_registry.register_fake("diffkern::ntrk_step_bwd")
def _step_bwd_fake(dx, sigma, rho, w_grad, eps_grad):
    check_step_bwd(dx, sigma, rho, w_grad, eps_grad)
    return [dx.new_empty(dx.shape) for _ in range(int(w_grad) + int(eps_grad))]


@_registry.register_fake("diffkern::twoos_project")
def _project_fake(x, lower, upper, max_passes):
    check_project(x, lower, upper, max_passes)
    return x.new_empty(x.shape), x.new_empty(x.shape[:1], dtype=_dtypes.acc(x.dtype))
