"""Cooperative Triton launches: kernels whose programs wait for each other at grid barriers.

A grid barrier (`grid_sync`) only works when every program of the launch is resident at once:
  * on a GPU the launch is cooperative (`launch_cooperative_grid=True`): the driver refuses a grid that
    cannot be co-resident instead of deadlocking, so launchers keep the grid within `max_programs`;
  * in the Triton interpreter, whose programs normally run one after another (a barrier would wait
    forever), `launch` runs every program in its own thread. Each thread sees its own program id, the
    interpreter's atomics yield the GIL so spinning programs let the others progress, and a program
    that fails (or a launch that passes `TIMEOUT_S`) stops the others at their next atomic.

The barrier counter `sync` (int32 [2], from `sync_buffer`) starts at zero; `grid_exit` resets it when the
last program leaves, so one buffer per device and stream serves every launch on that stream.
"""
from __future__ import annotations

import inspect
import threading
import time

import torch
import triton
import triton.language as tl

from . import _triton

TIMEOUT_S = 1800.0
_sync_buffers: dict[tuple, torch.Tensor] = {}


@triton.jit
def grid_sync(sync_ptr, n_passed, n_programs):
    """Grid barrier: returns, as n_passed + 1, once all n_programs programs have arrived at their barrier
    number n_passed + 1 (n_passed: the barriers this program has passed, 0 at the start).

    The CTA barrier before the release makes every thread's stores part of what the arriving atomic
    publishes; the acquire spin and the CTA barrier after it make them visible to all of this program.
    """
    n_sync = n_passed + 1
    tl.debug_barrier()
    tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")
    while tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu") < n_sync * n_programs:
        pass
    tl.debug_barrier()
    return n_sync


@triton.jit
def grid_exit(sync_ptr, n_programs):
    """Called by every program after its last grid_sync: the last one out zeroes the counters for the next launch."""
    if tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel", scope="gpu") == n_programs - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed", scope="gpu")


def sync_buffer(device: torch.device) -> torch.Tensor:
    """The zeroed int32 [2] barrier counter of `device`'s current stream (kernels leave it zeroed)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    if key not in _sync_buffers:
        _sync_buffers[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return _sync_buffers[key]


def max_programs(device: torch.device) -> int:
    """Programs a cooperative launch may have: one per SM (MODEL_SMS, an H100's, off a GPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _triton.MODEL_SMS


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) with all programs resident at once (see the module docstring)."""
    if not _triton.interpreting():
        kernel[grid](*args, launch_cooperative_grid=True, **kwargs)
        return
    from triton.runtime import interpreter

    n = 1
    for g in grid:
        n *= g
    programs = _ConcurrentPrograms(kernel.rewrite(), n)
    builder = interpreter.interpreter_builder
    plain = type(builder)
    builder.__class__ = _threaded_builder(plain, programs)
    try:
        interpreter.GridExecutor(programs, kernel.arg_names, grid, kernel.pre_run_hooks)(*args, **kwargs)
    finally:
        builder.__class__ = plain


class _Stopped(RuntimeError):
    pass


class _ConcurrentPrograms:
    """Stands in for a kernel's function in the interpreter's grid loop: each call (one per program) starts
    the program in a thread; the last call waits for all of them and re-raises the first failure."""

    def __init__(self, fn, n: int):
        self.fn, self.n = fn, n
        self.__name__, self.__globals__, self.__annotations__ = fn.__name__, fn.__globals__, fn.__annotations__
        self.__signature__ = inspect.signature(fn)
        self.local = threading.local()
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self.stop = False

    def __call__(self, **args):
        idx = self.local.grid_idx
        thread = threading.Thread(target=self._run, args=(idx, args), daemon=True)
        self.threads.append(thread)
        thread.start()
        if len(self.threads) == self.n:
            self._join()

    def _run(self, idx, args) -> None:
        self.local.grid_idx = idx
        try:
            self.fn(**args)
        except BaseException as error:  # noqa: BLE001 - handed to the launching thread
            self.errors.append(error)
            self.stop = True

    def _join(self) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                self.stop = True
                self.errors.append(TimeoutError(f"cooperative launch of '{self.__name__}': programs still running "
                                                f"after {TIMEOUT_S:.0f} s (a grid barrier some program never reached?)"))
                thread.join()
        real = [e for e in self.errors if not isinstance(e, _Stopped)]
        if real:
            raise real[0]


def _threaded_builder(plain: type, programs: _ConcurrentPrograms) -> type:
    """The interpreter builder's class with a per-thread program id and atomics that yield (and obey stop)."""

    def atomic(name):
        original = getattr(plain, name)

        def call(self, *args, **kwargs):
            if programs.stop:
                raise _Stopped("stopped: another program of the launch failed")
            out = original(self, *args, **kwargs)
            time.sleep(0)
            return out
        return call

    return type(plain.__name__, (plain,), {
        "grid_idx": property(lambda self: getattr(programs.local, "grid_idx", None),
                             lambda self, value: setattr(programs.local, "grid_idx", value)),
        "create_atomic_rmw": atomic("create_atomic_rmw"),
        "create_atomic_cas": atomic("create_atomic_cas"),
    })
