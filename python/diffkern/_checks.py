"""Argument checks several ops share, in the words of their C++ twins (csrc/cpu/grpo.cpp and ntrk.cpp,
csrc/include/diffkern/rmdm_args.h)."""
import operator

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


def _kind(value) -> str:
    """The type's name as the user would write it: "float", "NoneType", "numpy.ndarray"."""
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def tensor(op: str, name: str, value, optional: bool = False):
    """value is a torch.Tensor (or None when optional): anything else (a numpy array, a list, None) is a
    TypeError naming the argument, before any code reads it as a tensor."""
    if isinstance(value, torch.Tensor) or (optional and value is None):
        return value
    need = "a torch.Tensor or None" if optional else "a torch.Tensor"
    raise TypeError(f"{op}: {name} must be {need}, got {_kind(value)}")


def integer(op: str, name: str, value) -> int:
    """value as an int: a Python int, a SymInt or anything with __index__ (numpy integers); a float (2.7),
    a bool or None is a TypeError naming the argument, never truncated."""
    if isinstance(value, torch.SymInt):
        return value
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{op}: {name} must be an int, got {_kind(value)} {value!r}")


def number(op: str, name: str, value) -> float:
    """value as a real number (int, float, SymFloat/SymInt, numpy scalar); anything else is a TypeError
    naming the argument."""
    if isinstance(value, (torch.SymFloat, torch.SymInt)):
        return value
    if not isinstance(value, (bool, complex, str)) and value is not None:
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"{op}: {name} must be a real number, got {_kind(value)} {value!r}")


def tensor_list(op: str, name: str, value) -> list:
    """value (a list or tuple of tensors) as a list; a bare tensor, a numpy array or a non-tensor entry is a
    TypeError naming the argument (or the entry)."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list or tuple of tensors, got {_kind(value)}")
    if not all(isinstance(t, torch.Tensor) for t in value):  # one pass on the common path; names the entry below
        for i, t in enumerate(value):
            tensor(op, f"{name}[{i}]", t)
    return list(value)


def host_value_check(device: torch.device, capturing: bool, compiling: bool) -> bool:
    """Whether a check of a tensor's values, which reads them on the host, may run: the decision alone.

    Always on CPU outside torch.compile tracing. On CUDA only outside stream capture (a host read of a
    captured stream is illegal, and a graph replays without the host) and outside tracing (the values do
    not exist yet). Where it may not run, the check is skipped rather than made a device-side assert (which
    would end the process's use of the GPU), so an op that skips it must stay memory-safe on any value.
    """
    return not compiling and not (device.type == "cuda" and capturing)


def values_readable(t: torch.Tensor) -> bool:
    """`host_value_check` for tensor t now. Reading the values of a CUDA tensor then costs one small
    device-to-host copy that waits for the current stream (~10-20 us on an idle GPU, plus the queued work)."""
    compiling = torch.compiler.is_compiling()
    capturing = not compiling and t.is_cuda and torch.cuda.is_current_stream_capturing()
    return host_value_check(t.device, capturing, compiling)
