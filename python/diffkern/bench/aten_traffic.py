"""The memory traffic of plain PyTorch code, as a GPU would run it eagerly: one kernel per aten op.

Model: every aten op that launches a kernel reads each of its tensor inputs once and writes each of
its outputs once. A tensor counts its distinct elements (a broadcast view, stride 0, counts its
storage once); views, allocations and metadata ops move nothing and launch nothing. It runs on
meta tensors too, so full-size shapes cost no memory and no time.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Ops that only allocate or re-describe memory: no kernel, no traffic.
_METADATA = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_", "detach",
             "alias", "_unsafe_view", "lift_fresh", "_reshape_alias", "resize_", "detach_"}
# Ops whose schema may alias (so `is_view`) but which copy when the dtype or device changes.
_MAY_COPY = {"to"}
# In-place ops that overwrite their first argument without reading it.
_OVERWRITE = {"copy_", "fill_", "zero_", "normal_", "uniform_"}


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a view addresses (dims of stride 0 count once)."""
    elems = math.prod(n for n, s in zip(t.shape, t.stride()) if s != 0)
    return elems * t.element_size()


@dataclass
class Traffic:
    """Bytes read and written and kernels launched; `ops` counts kernels per aten op name."""
    bytes_read: int = 0
    bytes_written: int = 0
    kernels: int = 0
    ops: Counter = field(default_factory=Counter)

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    def as_dict(self) -> dict:
        return dict(bytes_read=self.bytes_read, bytes_written=self.bytes_written, bytes=self.bytes,
                    kernels=self.kernels, ops=dict(self.ops))


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    return (a.device.type != "meta" and a.data_ptr() == b.data_ptr() and a.dtype == b.dtype
            and a.shape == b.shape and a.stride() == b.stride())


def _moves_nothing(name: str, args, out) -> bool:
    """A copy onto the very same memory (the Triton interpreter writes each CPU argument back onto
    itself), or an out-of-place op that hands back its input (`x.to(x.dtype)`, a no-op `sum_to_size`)."""
    if name == "copy_":
        return isinstance(args[1], torch.Tensor) and _same_memory(args[0], args[1])
    if name.endswith("_") or not isinstance(out, torch.Tensor):
        return False
    return any(_same_memory(out, t) for t in tree_leaves(args) if isinstance(t, torch.Tensor))


class AtenTraffic(TorchDispatchMode):
    """Counts the traffic of every aten op run inside the block (autograd's backward included).

    Ops of the namespaces in `descend` (e.g. "diffkern") are not counted themselves: the ops their
    implementations run are, so a custom op's host-side glue shows while its kernels (counted
    elsewhere) do not.
    """

    def __init__(self, descend: tuple[str, ...] = ()):
        super().__init__()
        self.descend = descend
        self.traffic = Traffic()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in self.descend:
            # Run the op's backend kernel directly (below this mode's dispatch key, so the op does not
            # come back here) with the mode active, so that the ops inside it are seen.
            device = next(t for t in tree_leaves(args) if isinstance(t, torch.Tensor)).device
            key = getattr(torch._C.DispatchKey, torch._C._dispatch_key_for_device(device.type))
            with self:
                return func._op_dk(key, *args, **kwargs)
        out = func(*args, **kwargs)
        name = func._opname
        if (func.is_view and name not in _MAY_COPY) or name in _METADATA or _moves_nothing(name, args, out):
            return out
        overwritten = args[0] if name in _OVERWRITE else None
        read = (args, {k: v for k, v in kwargs.items() if k != "out"})
        inputs = [t for t in tree_leaves(read) if isinstance(t, torch.Tensor) and t is not overwritten]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.traffic.bytes_read += sum(distinct_bytes(t) for t in inputs)
        self.traffic.bytes_written += sum(distinct_bytes(t) for t in outputs)
        self.traffic.kernels += 1
        self.traffic.ops[name] += 1
        return out
