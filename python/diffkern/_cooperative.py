"""Cooperative Triton launches: kernels whose programs wait for each other at grid barriers.

A grid barrier (`grid_sync`) only works when every program of the launch is resident at once:
  * on a GPU the launch is cooperative (`launch_cooperative_grid=True`). `launch` first compiles the
    kernel and checks the grid against the programs its resources let the device keep resident
    (`co_resident_programs`: registers, shared memory and threads per program against the SM's); a grid
    beyond that, or one the driver refuses all the same (MPS, green contexts and other SM limits the
    properties do not show: "too many blocks in cooperative launch"), raises `LaunchRefused`, and the
    caller runs its non-cooperative kernel instead (`fall_back` warns once per kernel). `max_programs`
    is only the cheap upper bound launchers plan with;
  * in the Triton interpreter, whose programs normally run one after another (a barrier would wait
    forever), `launch` runs every program in its own thread. Each thread sees its own program id, the
    interpreter's atomics yield the GIL so spinning programs let the others progress, and a program
    that fails (or a launch that passes `TIMEOUT_S`) stops the others at their next atomic.

The barrier counter (int32 [2], from `sync_buffer`, passed as the kernel's argument `sync_ptr`) starts at
zero; `grid_exit` resets it when the last program leaves, so one buffer per device and stream serves every
launch on that stream. A launch that fails or is refused (no program reaches `grid_exit`) has `launch`
zero the counter before the error propagates.
"""
from __future__ import annotations

import contextlib
import inspect
import re
import threading
import time
import warnings

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
    """The most programs a cooperative launch may plan for: one per SM (MODEL_SMS, an H100's, off a GPU).

    An upper bound for launchers that hold an SM's worth of registers per program; `launch` checks the
    compiled kernel's real co-residency and refuses what does not fit."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _triton.MODEL_SMS


# Occupancy rules of sm_80 / sm_90 (CUDA occupancy calculator): registers are allocated per warp in
# units of 256, the driver reserves 1 KB of shared memory per program, and an SM runs at most 32 programs.
REG_ALLOC_UNIT, SHARED_RESERVED, MAX_PROGRAMS_PER_SM = 256, 1024, 32


def co_resident_programs(compiled, props) -> int:
    """Programs of `compiled` that `props`' device keeps resident at once: SMs x programs per SM.

    compiled: a loaded Triton kernel (`n_regs` per thread, `metadata.num_warps`, `metadata.shared` bytes);
    props: torch.cuda.get_device_properties (multi_processor_count, regs_per_multiprocessor,
    shared_memory_per_multiprocessor, max_threads_per_multi_processor, warp_size). Programs per SM are
    the fewest that registers, shared memory, threads and MAX_PROGRAMS_PER_SM allow.
    """
    warps = compiled.metadata.num_warps
    regs_per_warp = -(-max(1, compiled.n_regs) * props.warp_size // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_registers = props.regs_per_multiprocessor // regs_per_warp // warps
    by_threads = props.max_threads_per_multi_processor // (warps * props.warp_size)
    by_shared = props.shared_memory_per_multiprocessor // (compiled.metadata.shared + SHARED_RESERVED)
    return min(by_registers, by_threads, by_shared, MAX_PROGRAMS_PER_SM) * props.multi_processor_count


class LaunchRefused(RuntimeError):
    """The grid of a cooperative launch cannot be co-resident on the device; nothing ran."""

    def __init__(self, kernel_name: str, reason: str):
        super().__init__(f"cooperative launch of '{kernel_name}' refused: {reason}")
        self.kernel_name = kernel_name


# cuGetErrorString of CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE, which Triton's launcher raises as RuntimeError.
_DRIVER_REFUSAL = re.compile("too many blocks in cooperative launch", re.IGNORECASE)
_warned: set[str] = set()


def fall_back(refused: LaunchRefused, instead: str) -> None:
    """Warns (once per kernel) that a refused cooperative launch runs `instead`."""
    if refused.kernel_name not in _warned:
        _warned.add(refused.kernel_name)
        warnings.warn(f"{refused}; running {instead} instead (the same result, slower)", RuntimeWarning, stacklevel=3)


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) with all programs resident at once (see the module docstring).

    The kernel's barrier counter is its argument `sync_ptr`. Raises LaunchRefused when the grid cannot be
    co-resident; after any failed launch the counter is zeroed again.
    """
    sync = _sync_argument(kernel, args, kwargs)
    try:
        (_launch_interpreted if _triton.interpreting() else _launch_on_gpu)(kernel, grid, args, kwargs)
    except BaseException as error:
        with contextlib.suppress(Exception):  # a device already in error keeps its first error, raised below
            sync.zero_()
        if isinstance(error, RuntimeError) and _DRIVER_REFUSAL.search(str(error)):
            raise LaunchRefused(kernel.__name__, str(error)) from error
        raise


def _sync_argument(kernel, args, kwargs) -> torch.Tensor:
    return {**dict(zip(kernel.arg_names, args)), **kwargs}["sync_ptr"]


def _launch_on_gpu(kernel, grid, args, kwargs) -> None:
    compiled = kernel.warmup(*args, grid=grid, launch_cooperative_grid=True, **kwargs)
    compiled._init_handles()  # loads the module: n_regs
    n = _programs(grid)
    device = _sync_argument(kernel, args, kwargs).device
    fits = co_resident_programs(compiled, torch.cuda.get_device_properties(device))
    if n > fits:
        raise LaunchRefused(kernel.__name__, f"{n} programs, the device keeps {fits} of them resident "
                                             f"({compiled.n_regs} registers, {compiled.metadata.shared} B shared)")
    kernel[grid](*args, launch_cooperative_grid=True, **kwargs)


def _programs(grid) -> int:
    n = 1
    for g in grid:
        n *= g
    return n


def _launch_interpreted(kernel, grid, args, kwargs) -> None:
    from triton.runtime import interpreter

    programs = _ConcurrentPrograms(kernel.rewrite(), _programs(grid))
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
