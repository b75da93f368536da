"""diffkern._cooperative: grid barriers in the interpreter (programs as threads) and in the GPU compiler."""
import re
import types

import pytest
import torch
import triton
import triton.language as tl

from diffkern import _cooperative
from diffkern._triton import KernelSpec
from diffkern.testing.aot import compile_spec, compiled_ptx
from diffkern.testing.triton_monitor import TritonMonitor

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests (CPU tensors)")


@triton.jit
def ring_kernel(buf, out, sync_ptr, P, ROUNDS: tl.constexpr):
    """Each round every program publishes a value, then reads its right neighbour's (started after it)."""
    p = tl.program_id(0)
    n_sync = 0
    for r in range(ROUNDS):
        tl.store(buf + p, p * 100 + r)
        n_sync = _cooperative.grid_sync(sync_ptr, n_sync, P)
        v = tl.load(buf + (p + 1) % P)
        n_sync = _cooperative.grid_sync(sync_ptr, n_sync, P)
        tl.store(out + r * P + p, v)
    _cooperative.grid_exit(sync_ptr, P)


@triton.jit
def failing_kernel(sync_ptr, P):
    p = tl.program_id(0)
    if p == 1:  # program 1 fails (the interpreter raises on a non-power-of-2 arange) before the barrier
        tl.store(sync_ptr + tl.arange(0, 3), 7)
    _cooperative.grid_sync(sync_ptr, 0, P)
    _cooperative.grid_exit(sync_ptr, P)


@triton.jit
def late_failing_kernel(sync_ptr, P):
    """Program 1 fails once every other program has arrived at the first barrier (the counter is then P - 1)."""
    p = tl.program_id(0)
    if p == 1:
        while tl.atomic_add(sync_ptr, 0) < P - 1:
            pass
        tl.store(sync_ptr + tl.arange(0, 3), 7)
    _cooperative.grid_sync(sync_ptr, 0, P)
    _cooperative.grid_exit(sync_ptr, P)


def _core_max_after(x, flag_ptr, until):
    """Arrives, waits until `until` programs have arrived, then calls a builtin through triton.language.core
    (as triton.language.standard's helpers do)."""
    tl.atomic_add(flag_ptr, 1)
    while tl.atomic_add(flag_ptr, 0) < until:
        pass
    return tl.core.maximum(x, x)


# A helper whose globals hold triton.language.core, which the kernel's own launch does not patch (its
# module does not import it).
core_max_after = triton.jit(types.FunctionType(_core_max_after.__code__, {"tl": tl, "core": tl.core}))


@triton.jit
def overlapping_helpers_kernel(x_ptr, out, flag_ptr, sync_ptr):
    """Program 1 enters the helper while program 0 is inside it, and program 0 returns (its patch scope
    ends) before program 1 reaches the builtin."""
    p = tl.program_id(0)
    if p == 1:
        while tl.atomic_add(flag_ptr, 0) < 1:
            pass
    y = core_max_after(tl.load(x_ptr + p), flag_ptr, 2 + p)
    if p == 0:
        tl.atomic_add(flag_ptr, 1)
    tl.store(out + p, y)
    _cooperative.grid_exit(sync_ptr, 2)


def test_a_helper_returning_leaves_the_language_patched_for_programs_still_in_one():
    """Without it, program 1's builtin is the raw one ("_semantic argument must be provided outside of JIT
    functions")."""
    x, out, flag = torch.tensor([1.5, -2.0]), torch.zeros(2), torch.zeros(1, dtype=torch.int32)
    _cooperative.launch(overlapping_helpers_kernel, (2,), x, out, flag, _cooperative.sync_buffer(x.device))
    assert torch.equal(out, x) and flag.item() == 3


def test_programs_see_each_others_writes_across_barriers():
    P, rounds = 5, 3
    buf, out = torch.zeros(P, dtype=torch.int32), torch.zeros(rounds * P, dtype=torch.int32)
    sync = _cooperative.sync_buffer(buf.device)
    with TritonMonitor() as mon:
        _cooperative.launch(ring_kernel, (P,), buf, out, sync, P, ROUNDS=rounds)
    expected = torch.tensor([[((p + 1) % P) * 100 + r for p in range(P)] for r in range(rounds)], dtype=torch.int32)
    assert torch.equal(out.view(rounds, P), expected)
    assert sync.tolist() == [0, 0]
    assert mon.num_launches == 1 and mon.launches[0].programs == P


def test_a_failing_program_stops_the_launch_instead_of_hanging():
    sync = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(Exception, match="power of 2"):
        _cooperative.launch(failing_kernel, (4,), sync, 4)


def test_a_failed_launch_leaves_the_counter_zeroed_for_the_next_one():
    sync = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(Exception, match="power of 2"):
        _cooperative.launch(late_failing_kernel, (4,), sync, 4)
    assert sync.tolist() == [0, 0]


# An H100's and an A100's properties as torch.cuda.get_device_properties reports them.
H100 = types.SimpleNamespace(multi_processor_count=132, regs_per_multiprocessor=65536, warp_size=32,
                             shared_memory_per_multiprocessor=233472, max_threads_per_multi_processor=2048)
A100 = types.SimpleNamespace(**{**vars(H100), "multi_processor_count": 108, "shared_memory_per_multiprocessor": 167936})


def compiled(n_regs, num_warps, shared=0):
    """What co_resident_programs reads of a loaded Triton kernel."""
    return types.SimpleNamespace(n_regs=n_regs, metadata=types.SimpleNamespace(num_warps=num_warps, shared=shared),
                                 _init_handles=lambda: None)


@pytest.mark.parametrize("kernel,props,expected", [
    (compiled(255, 8, 11328), H100, 132),     # the persistent R-MDM kernel: a full register file per program
    (compiled(255, 8, 11328), A100, 108),
    (compiled(128, 4), H100, 4 * 132),        # 4096 registers per warp: 16 warps
    (compiled(129, 4), H100, 3 * 132),        # 136 per thread after the 256-register rounding per warp: 15 warps
    (compiled(32, 1), H100, 32 * 132),        # the 32-programs-per-SM cap
    (compiled(16, 32), H100, 2 * 132),        # threads: 2048 per SM
    (compiled(40, 4, 100 * 1024), H100, 2 * 132),  # shared memory (+1 KB reserved per program)
    (compiled(40, 4, 100 * 1024), A100, 1 * 108),
], ids=["persistent-h100", "persistent-a100", "regs128", "regs129", "cap", "threads", "smem-h100", "smem-a100"])
def test_co_resident_programs_from_the_compiled_kernel_and_the_device(kernel, props, expected):
    assert _cooperative.co_resident_programs(kernel, props) == expected


class FakeGpuKernel:
    """A compiled kernel on a fake H100: warmup gives its resources, kernel[grid](...) records the launch or
    raises `launch_error` as Triton's launcher raises the driver's."""
    __name__ = "fake_kernel"
    arg_names = ["x", "sync_ptr"]

    def __init__(self, launch_error=None):
        self.launches, self.launch_error = [], launch_error

    def warmup(self, *args, grid, **kwargs):
        assert kwargs["launch_cooperative_grid"]
        return compiled(255, 8, 11328)

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            if self.launch_error:
                args[1].fill_(3)  # as a partial launch would leave it
                raise self.launch_error
            self.launches.append((grid, kwargs))
        return run


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(_cooperative._triton, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: H100)


def test_a_grid_beyond_the_co_resident_programs_is_refused_before_launching(fake_gpu):
    kernel, sync = FakeGpuKernel(), torch.zeros(2, dtype=torch.int32)
    _cooperative.launch(kernel, (132,), None, sync, num_warps=8)
    assert kernel.launches == [((132,), {"launch_cooperative_grid": True, "num_warps": 8})]
    with pytest.raises(_cooperative.LaunchRefused, match="133 programs, the device keeps 132"):
        _cooperative.launch(kernel, (133,), None, sync, num_warps=8)
    assert len(kernel.launches) == 1


def test_the_drivers_refusal_raises_launch_refused_with_the_counter_zeroed(fake_gpu):
    sync = torch.zeros(2, dtype=torch.int32)
    refusal = RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")
    with pytest.raises(_cooperative.LaunchRefused, match="too many blocks"):
        _cooperative.launch(FakeGpuKernel(refusal), (64,), None, sync, num_warps=8)
    assert sync.tolist() == [0, 0]
    with pytest.raises(RuntimeError, match="illegal address") as error:  # other errors pass through as they are
        _cooperative.launch(FakeGpuKernel(RuntimeError("Triton Error [CUDA]: illegal address")), (64,), None, sync)
    assert not isinstance(error.value, _cooperative.LaunchRefused) and sync.tolist() == [0, 0]


def test_the_barrier_compiles_to_one_release_arrival_and_an_acquire_spin_per_program():
    spec = KernelSpec("ring_kernel", ring_kernel, {"buf": "*i32", "out": "*i32", "sync_ptr": "*i32", "P": "i32",
                                                   "ROUNDS": "constexpr"}, {"ROUNDS": 1}, 4)
    res = compile_spec(spec, 90)
    assert (res.spill_stores, res.stack_bytes) == (0, 0)
    ptx = compiled_ptx(spec, 90)
    # thread 0 alone arrives (predicated), with release semantics at GPU scope, and spins with acquire loads
    assert len(re.findall(r"@%p\d+ atom\.global\.gpu\.release\.add", ptx)) == 2
    assert len(re.findall(r"ld\.global\.gpu\.acquire", ptx)) == 2
    assert ptx.count("bar.sync") >= 4
