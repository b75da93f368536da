"""What every Triton launcher shares: output allocation, pointer tables, and the launch-config record.

Nothing here is technique-specific; the kernels themselves live in `<technique>/triton_kernels.py`.
"""
from __future__ import annotations

import os
import threading
import types
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import _tables

# DIFFKERN_DEBUG_FILL=nan makes every output and scratch buffer a launcher allocates start as NaN,
# so an element a kernel forgets to write fails a test loudly (the C++ kernels read the same variable).
_DEBUG_FILL = os.environ.get("DIFFKERN_DEBUG_FILL", "") == "nan"

# Observers of pointer tables: the test-time bounds checker registers one so that tensors a kernel
# reaches through a table (not as arguments) still count as memory it may touch.
pointer_table_observers: list[Callable[[Sequence[torch.Tensor]], None]] = []


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Kernels whose programs each reduce a run of tiles into one partial sum (the DAR backward's token
# tiles, the GRPO reductions' element tiles) size that run to keep PROGRAMS_PER_SM programs per SM in
# flight (about what fits at ~160 registers x 64-256 threads). Off a GPU (the interpreter) the SM
# count is MODEL_SMS, an H100's, so the benchmark's traffic counts model that card.
PROGRAMS_PER_SM, MAX_TILES_PER_CHUNK, MODEL_SMS = 4, 16, 132


def tiles_per_chunk(rows: int, tiles_per_row: int, device: torch.device) -> int:
    """Tiles each program walks when `rows` rows of `tiles_per_row` tiles are split into chunks."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else MODEL_SMS
    return max(1, min(MAX_TILES_PER_CHUNK, rows * tiles_per_row // (PROGRAMS_PER_SM * sms)))


_helper_calls_restored = False


def restore_after_device_calls() -> None:
    """Makes the interpreter undo the language patches of @triton.jit helper calls, safely under threads; once
    per process. Done at import when TRITON_INTERPRET=1; a program that sets it later (the GPU check's CPU dry
    run) calls this itself before any kernel runs.

    Triton 3.8's interpreter patches triton.language for a helper function called from a kernel and
    never restores it, so after any interpreted launch that calls a helper, compiling a kernel for a
    GPU in the same process fails (the AOT compile tests run after the interpreted ones). The patch is
    therefore restored, but only when the last helper call in flight returns: programs running in
    threads (diffkern._cooperative) call helpers concurrently, and a call that restored its own patch
    while another thread was still inside a helper put raw builtins back under that thread (a helper
    such as tl.max reaches triton.language.core, which the kernel's own launch does not patch). The
    one patch covers triton.language and triton.language.core, whatever the helper's globals name, so
    every helper runs patched; a lock serialises it and a helper's first-call source rewrite.
    """
    global _helper_calls_restored
    if _helper_calls_restored:
        return
    _helper_calls_restored = True
    from triton import language
    from triton.runtime import interpreter

    lock = threading.Lock()
    both_langs = types.SimpleNamespace(__globals__={"tl": language, "core": language.core})
    state = types.SimpleNamespace(calls_in_flight=0, scope=None)

    def call(self, *args, **kwargs):
        with lock:
            if state.calls_in_flight == 0:
                state.scope = interpreter._patch_lang(both_langs)
            state.calls_in_flight += 1
            fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e
        finally:
            with lock:
                state.calls_in_flight -= 1
                if state.calls_in_flight == 0:
                    state.scope.restore()

    interpreter.InterpretedFunction.__call__ = call


if interpreting():
    restore_after_device_calls()


_guards = threading.local()


def _first_tensor(args) -> torch.Tensor | None:
    for a in args:
        t = _first_tensor(a) if isinstance(a, (list, tuple)) else a
        if isinstance(t, torch.Tensor):
            return t
    return None


class device_guard:  # noqa: N801 - used as a context manager, like torch.cuda.device
    """Runs the block on the device of the first tensor in `args` (lists and tuples searched in order).

    Triton launches on the current CUDA device's current stream, whatever device their tensors are on, so
    every op entry (diffkern._registry) runs its backend under this guard: tensors on cuda:1 while the
    current device is 0 launch on cuda:1's current stream. For CPU tensors (the interpreter, the host
    harness) it changes nothing; in both cases `guarded_device()` reports the device inside the block.
    """

    def __init__(self, args):
        t = _first_tensor(args)
        self.device = None if t is None else t.device
        self._cuda = torch.cuda.device(self.device) if t is not None and t.is_cuda else None

    def __enter__(self):
        _guards.__dict__.setdefault("devices", []).append(self.device)
        if self._cuda is not None:
            self._cuda.__enter__()

    def __exit__(self, *exc):
        try:
            if self._cuda is not None:
                self._cuda.__exit__(*exc)
        finally:
            _guards.devices.pop()


def guarded_device() -> torch.device | None:
    """The device of this thread's innermost `device_guard` (None outside every guard, or for no tensors)."""
    stack = getattr(_guards, "devices", None)
    return stack[-1] if stack else None


def check_float32_math(op: str, dtype: torch.dtype, what: str) -> None:
    """Triton kernels accumulate in float32, so float64 inputs are refused rather than silently rounded."""
    if dtype == torch.float64:
        raise ValueError(f"{op}: the triton backend computes in float32 and takes float16, bfloat16 or float32 "
                         f"{what}, got float64; use the cpu or reference backend")


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a NaN-filled tensor under DIFFKERN_DEBUG_FILL=nan."""
    if _DEBUG_FILL and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def tensor_table(tensors: Sequence[torch.Tensor], device: torch.device, stride_dims: Sequence[int] = ()) -> torch.Tensor:
    """An int64 [n, 1 + len(stride_dims)] table: each tensor's data pointer, then its strides along `stride_dims`.

    Kernels that take a list of tensors cast column 0 back to a typed pointer
    (`tl.load(table + i * cols).to(tl.pointer_type(...))`) and read the strides beside it, so a list of
    any length and layout is read in place: no stack/cat copy. On CUDA the table comes from the
    content-keyed cache of diffkern._tables (no copy on a hit; CUDA-graph capturable); on CPU (the
    interpreter) it is a plain host tensor.
    """
    for observe in pointer_table_observers:
        observe(tensors)
    rows = tuple((t.data_ptr(), *(t.stride(k) for k in stride_dims)) for t in tensors)
    return torch.tensor(rows, dtype=torch.int64) if device.type == "cpu" else _tables.device_table(rows, device)


def aligned(tensors: Sequence[torch.Tensor], stride_dims: Sequence[int] = ()) -> bool:
    """Whether every tensor starts 16-byte aligned and its strides along `stride_dims` are whole multiples
    of 16 bytes: what a kernel may then state (tl.multiple_of) about the pointers and strides it reads from
    a tensor_table, which carry no alignment facts of their own, to load 16 bytes at a time."""
    return all(t.data_ptr() % 16 == 0 and all(t.stride(k) * t.element_size() % 16 == 0 for k in stride_dims)
               for t in tensors)


@dataclass(frozen=True)
class KernelSpec:
    """One launch configuration of a Triton kernel, enough to compile it ahead of time for a GPU.

    `signature` maps every non-constexpr argument to a Triton type string ("*bf16", "i32", "fp32", ...);
    `constexprs` gives every constexpr argument its value; `attrs` maps an argument to the attributes a
    launch infers for it (`[["tt.divisibility", 16]]`), none unless given.
    """
    name: str
    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int
    maxnreg: int | None = None
    tags: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    num_stages: int = 3  # Triton's default on NVIDIA GPUs


def register_budget(num_warps: int) -> int:
    """The `maxnreg` every launch passes: all the registers a thread can have at this block size.

    Left to itself, ptxas caps kernels lower (at 96/128/168) and spills a few bytes in several of the
    routing kernels' configurations; with the full budget none spills (tests/test_kernels_compile.py).
    """
    return min(255, 65536 // (32 * num_warps))


TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
