"""Bounds checker and memory-traffic counter for Triton kernels run by the CPU interpreter.

The interpreter (TRITON_INTERPRET=1) executes every load and store on raw host addresses and never
checks them: an unmasked out-of-bounds access reads or writes garbage silently. `TritonMonitor`
patches the interpreter for the duration of a `with` block and, for every launch:

- checks that each address touched by an active (unmasked) lane, with its element's full width,
  lies inside the storage of a tensor argument of that launch, or of a tensor put in a pointer
  table (`diffkern._triton.tensor_table` tells `pointer_table_observers`) while the monitor is
  active; a violation raises `OutOfBoundsError` out of the launch, not the interpreter's
  `InterpreterError` wrapper;
- records each launch's grid and keyword arguments (constexprs, num_warps, maxnreg), and counts programs
  (product of the grid) and bytes loaded / stored: active lanes x element size,
  for plain, masked, tensor-descriptor and atomic accesses; and the FLOPs of every `tl.dot` a program
  runs, 2 m n k at the product's block shape (rows and columns of a block that lie past the data count:
  the tensor cores compute them too); with `by_tensor=True` also the bytes
  loaded from and stored to each tensor (`LaunchRecord.loaded_by` / `stored_by`, keyed by the names
  bounds errors use);
- records the devices of the launch's tensor arguments and the device guard it ran under
  (`diffkern._triton.device_guard`, None outside every guard): `LaunchRecord.devices` / `guard`.

Launches whose programs run in threads (diffkern._cooperative) are counted the same way.

The counts are the benchmark's traffic model, so their limits are the model's:
- every active lane counts, even when several lanes (or programs) read the same address, so a
  broadcast or re-read is counted as often as it is issued; caches are not modelled;
- an atomic read-modify-write counts its active lanes once as loaded and once as stored;
- storage bounds are checked, not logical tensor bounds or pointer provenance (the interpreter
  sees bare addresses): reading the padding between rows of a strided view passes, and so does an
  overrun that lands inside another allowed tensor's storage.

The interpreter must be on before kernels are decorated: otherwise `@triton.jit` returns compiled
JITFunctions, and entering the monitor or launching one inside it raises RuntimeError.
"""
from __future__ import annotations

import functools
import inspect
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import triton
from triton.runtime import interpreter
from triton.runtime.errors import InterpreterError
from triton.runtime.jit import JITFunction

from diffkern import _triton


class OutOfBoundsError(AssertionError):
    """An active lane of a Triton load, store or atomic touched memory outside every allowed tensor."""


@dataclass
class LaunchRecord:
    """One kernel launch: its grid, its keyword arguments (`meta`: constexprs and launch options such as
    num_warps and maxnreg, absent where Triton's default applies), its tensors' devices, the device guard
    it ran under, the bytes its active lanes moved and the FLOPs of its programs' dots."""
    kernel: str
    grid: tuple[int, int, int]
    programs: int
    meta: dict = field(default_factory=dict)
    devices: frozenset = frozenset()
    guard: torch.device | None = None
    bytes_loaded: int = 0
    bytes_stored: int = 0
    flops: int = 0
    loaded_by: dict[str, int] = field(default_factory=dict)
    stored_by: dict[str, int] = field(default_factory=dict)


class _Ranges:
    """Disjoint, sorted byte ranges [start, end) with the names of the tensors that own them."""

    def __init__(self, spans: list[tuple[int, int, str]]):
        merged: list[list] = []
        for start, end, name in sorted(s for s in spans if s[1] > s[0]):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
                if name not in merged[-1][2]:
                    merged[-1][2].append(name)
            else:
                merged.append([start, end, [name]])
        self.starts = np.array([m[0] for m in merged], dtype=np.uint64)
        self.ends = np.array([m[1] for m in merged], dtype=np.uint64)
        self.names = [", ".join(m[2]) for m in merged]

    def first_outside(self, addresses: np.ndarray, itemsize: int) -> int | None:
        """The first address whose [address, address + itemsize) is not inside one range, or None."""
        if addresses.size == 0:
            return None
        lo, hi = addresses.min(), addresses.max()
        i = int(np.searchsorted(self.starts, lo, side="right")) - 1
        if i >= 0 and hi + np.uint64(itemsize) <= self.ends[i]:
            return None  # the common case: one contiguous block inside one tensor
        idx = np.searchsorted(self.starts, addresses, side="right").astype(np.int64) - 1
        ends = np.where(idx >= 0, self.ends[np.maximum(idx, 0)], 0)
        bad = (idx < 0) | (addresses + np.uint64(itemsize) > ends)
        return int(addresses[np.argmax(bad)]) if bad.any() else None

    def bytes_by_owner(self, addresses: np.ndarray, itemsize: int) -> dict[str, int]:
        """Bytes of the accesses at `addresses` per owning range name (addresses outside every range skipped)."""
        idx = np.searchsorted(self.starts, addresses, side="right").astype(np.int64) - 1
        counts = np.bincount(idx[idx >= 0], minlength=len(self.names))
        return {self.names[i]: int(c) * itemsize for i, c in enumerate(counts) if c}

    def describe_nearest(self, address: int) -> str:
        if not self.names:
            return "the launch has no tensor arguments"
        gaps = [max(int(s) - address, address - int(e) + 1, 0) for s, e in zip(self.starts, self.ends)]
        i = int(np.argmin(gaps))
        start, end = int(self.starts[i]), int(self.ends[i])
        where = f"{start - address} bytes before it" if address < start else f"{address - end} bytes past its end"
        return f"nearest allowed range is {self.names[i]} [0x{start:x}, 0x{end:x}), {where}"


def _storage_span(tensor: torch.Tensor, name: str) -> tuple[int, int, str]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes(), name


def _tensors(value, name: str) -> list[tuple[torch.Tensor, str]]:
    """The tensors of a launch argument (a tensor, a tuple of them, or a tensor descriptor) with their names."""
    if isinstance(value, tuple):
        return [named for i, v in enumerate(value) for named in _tensors(v, f"{name}[{i}]")]
    base = getattr(value, "base", value)  # triton TensorWrapper and TensorDescriptor keep the tensor in .base
    return [(base, name)] if isinstance(base, torch.Tensor) else []


def _itemsize(ptrs) -> int:
    # The interpreter reads and writes the numpy type of the pointee, so this is the width it touches.
    return np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize


def _active(ptrs, mask) -> np.ndarray:
    addresses = ptrs.data
    if mask is None:
        return addresses.ravel()
    # A mask combined from an int1 comparison and a scalar (`cols < D & (j == 0)`) can arrive as 0/1 integers,
    # which would index rather than select.
    return addresses[np.broadcast_to(mask.data.astype(bool), addresses.shape)]


def _dot_flops(out_shape: tuple[int, ...], k: int) -> int:
    """2 m n k of a product whose [..., m, n] result sums over k (a 3-D dot: times its batch)."""
    return 2 * int(np.prod(out_shape)) * int(k)


def _underlying(error: BaseException, kind: type) -> BaseException | None:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class TritonMonitor:
    """Context manager: bounds-check and count the memory traffic of interpreted Triton launches.

    >>> with TritonMonitor() as mon:
    ...     kernel[grid](x, y, n, BLOCK=128)
    >>> mon.launches[0].bytes_loaded, mon.by_kernel()

    Monitors nest (an inner one sees the launches too); they must exit in reverse order of entry.
    """

    def __init__(self, check_bounds: bool = True, by_tensor: bool = False):
        self.check_bounds, self.by_tensor = check_bounds, by_tensor
        self._lock = threading.Lock()
        self.launches: list[LaunchRecord] = []
        self._table_tensors: list[torch.Tensor] = []
        self._kernel: str | None = None
        self._guard: torch.device | None = None
        self._devices: frozenset = frozenset()
        self._arg_names: list[str] = []
        self._ranges: _Ranges | None = None
        self._record: LaunchRecord | None = None
        self._meta: dict = {}
        self._restore: list[tuple[object, str, object]] = []

    # -- totals ------------------------------------------------------------------------------
    @property
    def bytes_loaded(self) -> int:
        return sum(r.bytes_loaded for r in self.launches)

    @property
    def bytes_stored(self) -> int:
        return sum(r.bytes_stored for r in self.launches)

    @property
    def num_launches(self) -> int:
        return len(self.launches)

    def by_kernel(self) -> dict[str, dict]:
        """Per kernel name: launches, programs, bytes_loaded, bytes_stored, flops summed over its launches."""
        out: dict[str, dict] = {}
        for r in self.launches:
            k = out.setdefault(r.kernel, dict(launches=0, programs=0, bytes_loaded=0, bytes_stored=0, flops=0))
            k["launches"] += 1
            k["programs"] += r.programs
            k["bytes_loaded"] += r.bytes_loaded
            k["bytes_stored"] += r.bytes_stored
            k["flops"] += r.flops
        return out

    # -- context -----------------------------------------------------------------------------
    def __enter__(self) -> "TritonMonitor":
        if not triton.knobs.runtime.interpret:
            raise RuntimeError("TritonMonitor needs the Triton interpreter: set TRITON_INTERPRET=1 before "
                               "any kernel module is imported (kernels decorated without it are compiled "
                               "JITFunctions that need a GPU).")
        executor, builder = interpreter.GridExecutor, interpreter.InterpreterBuilder
        self._patch(executor, "__call__", self._wrap_launch)
        self._patch(executor, "_init_args_hst", self._wrap_args)
        self._patch(builder, "set_grid_dim", self._wrap_grid)
        self._patch(builder, "create_masked_load", self._wrap_access("load", "ptrs", "mask", loads=True))
        self._patch(builder, "create_masked_store", self._wrap_access("store", "ptrs", "mask", stores=True))
        self._patch(builder, "create_atomic_rmw", self._wrap_access("atomic", "ptr", "mask", loads=True, stores=True))
        self._patch(builder, "create_atomic_cas", self._wrap_access("atomic", "ptr", None, loads=True, stores=True))
        self._patch(builder, "create_dot", self._wrap_dot)
        self._patch(JITFunction, "run", self._refuse_compiled)
        _triton.pointer_table_observers.append(self._table_tensors.extend)
        return self

    def __exit__(self, *exc) -> None:
        _triton.pointer_table_observers.remove(self._table_tensors.extend)
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        self._restore.clear()

    def _patch(self, owner, name: str, make: Callable) -> None:
        original = owner.__dict__[name]
        self._restore.append((owner, name, original))
        setattr(owner, name, make(original))

    # -- hooks -------------------------------------------------------------------------------
    def _wrap_launch(self, original):
        monitor = self

        @functools.wraps(original)
        def launch(executor, *args, **kwargs):
            monitor._kernel, monitor._arg_names = executor.fn.__name__, list(executor.arg_names)
            monitor._meta = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
            monitor._guard = _triton.guarded_device()
            try:
                return original(executor, *args, **kwargs)
            except InterpreterError as error:
                oob = _underlying(error, OutOfBoundsError)
                if oob is None:
                    raise
                raise oob.with_traceback(oob.__traceback__) from None
            finally:
                monitor._kernel = monitor._ranges = monitor._record = None
        return launch

    def _wrap_args(self, original):
        monitor = self

        @functools.wraps(original)
        def init_args(executor, args_dev, kwargs):
            args_hst, kwargs_hst = original(executor, args_dev, kwargs)
            monitor._devices = frozenset(t.device for i, a in enumerate([*args_dev, *kwargs.values()])
                                         for t, _ in _tensors(a, str(i)))
            named = list(zip(monitor._arg_names, args_hst)) + list(kwargs_hst.items())
            spans = [_storage_span(t, n) for name, value in named for t, n in _tensors(value, f"argument '{name}'")]
            spans += [_storage_span(t, f"tensor_table tensor #{i}") for i, t in enumerate(monitor._table_tensors)]
            monitor._ranges = _Ranges(spans)
            return args_hst, kwargs_hst
        return init_args

    def _wrap_grid(self, original):
        monitor = self

        @functools.wraps(original)
        def set_grid_dim(builder, nx, ny, nz):
            original(builder, nx, ny, nz)
            if monitor._kernel is not None:
                monitor._record = LaunchRecord(monitor._kernel, (nx, ny, nz), nx * ny * nz, dict(monitor._meta),
                                               monitor._devices, monitor._guard)
                monitor.launches.append(monitor._record)
        return set_grid_dim

    def _wrap_access(self, kind: str, ptr_arg: str, mask_arg: str | None, loads=False, stores=False):
        """A hook for a builder method that takes its pointer handle as `ptr_arg`, its mask as `mask_arg`."""
        monitor = self

        def make(original):
            params = list(inspect.signature(original).parameters)[1:]
            ptr_pos = params.index(ptr_arg)
            mask_pos = params.index(mask_arg) if mask_arg else None

            @functools.wraps(original)
            def access(builder, *args, **kwargs):
                if monitor._record is not None:
                    ptrs = args[ptr_pos] if ptr_pos < len(args) else kwargs[ptr_arg]
                    mask = None
                    if mask_arg:
                        mask = args[mask_pos] if mask_pos < len(args) else kwargs.get(mask_arg)
                    monitor._account(kind, ptrs, mask, loads, stores, builder)
                return original(builder, *args, **kwargs)
            return access
        return make

    def _wrap_dot(self, original):
        """A hook for a builder's dot: adds 2 m n k (times any batch dimensions) of its result to the launch."""
        monitor = self

        @functools.wraps(original)
        def dot(builder, a, b, *args, **kwargs):
            out = original(builder, a, b, *args, **kwargs)
            if monitor._record is not None:
                with monitor._lock:
                    monitor._record.flops += _dot_flops(out.data.shape, a.data.shape[-1])
            return out
        return dot

    def _account(self, kind, ptrs, mask, loads, stores, builder) -> None:
        addresses = _active(ptrs, mask)
        itemsize = _itemsize(ptrs)
        nbytes = addresses.size * itemsize
        with self._lock:
            self._record.bytes_loaded += nbytes if loads else 0
            self._record.bytes_stored += nbytes if stores else 0
            if self.by_tensor and addresses.size:
                owners = self._ranges.bytes_by_owner(addresses, itemsize)
                for by, counted in ((self._record.loaded_by, loads), (self._record.stored_by, stores)):
                    for name, n in owners.items() if counted else ():
                        by[name] = by.get(name, 0) + n
        if not self.check_bounds:
            return
        bad = self._ranges.first_outside(addresses, itemsize)
        if bad is not None:
            raise OutOfBoundsError(
                f"kernel '{self._kernel}', program {builder.grid_idx}: {kind} of {itemsize}-byte elements at "
                f"address 0x{bad:x} lies outside every tensor of the launch; {self._ranges.describe_nearest(bad)}")

    def _refuse_compiled(self, original):
        @functools.wraps(original)
        def run(jit_fn, *args, **kwargs):
            raise RuntimeError(f"kernel '{jit_fn.__name__}' is a compiled JITFunction: TRITON_INTERPRET=1 was not "
                               "set when it was decorated, so TritonMonitor cannot see its memory accesses.")
        return run
