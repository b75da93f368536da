"""Argument checks several ops share, in the words of their C++ twins (csrc/cpu/grpo.cpp and ntrk.cpp,
csrc/include/diffkern/rmdm_args.h)."""
import torch

from . import _dtypes

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_contiguous(op: str, name: str, x: torch.Tensor) -> None:
    """x is a contiguous tensor of one of the four float dtypes."""
    if x.dtype not in FLOATS:
        raise ValueError(f"{op}: {name} dtype must be float16, bfloat16, float32 or float64, "
                         f"got {_dtypes.name(x.dtype)}")
    if not x.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous; call .contiguous()")


def check_like(op: str, name: str, t: torch.Tensor, lead: str, x: torch.Tensor) -> None:
    """t has x's dtype and device and is contiguous (callers check the shape first, each in its own words)."""
    if t.dtype != x.dtype:
        raise ValueError(f"{op}: {name} dtype {_dtypes.name(t.dtype)} differs from {lead} dtype "
                         f"{_dtypes.name(x.dtype)}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {lead} is on {x.device}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous; call .contiguous()")
