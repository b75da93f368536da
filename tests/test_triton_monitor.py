"""TritonMonitor: exact traffic counts and bounds errors on small interpreted kernels."""
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

from diffkern._triton import interpreting, tensor_table
from diffkern.testing.triton_monitor import OutOfBoundsError, TritonMonitor

pytestmark = pytest.mark.skipif(not interpreting(), reason="the monitor instruments the Triton interpreter")


@triton.jit
def scale_kernel(x_ptr, y_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    scale = tl.load(scale_ptr)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * scale, mask=mask)


@triton.jit
def tile_upcast_kernel(x_ptr, y_ptr, M, N, stride_xm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    mask = (rows < M) & (cols < N)
    x = tl.load(x_ptr + rows * stride_xm + cols, mask=mask)
    tl.store(y_ptr + rows * N + cols, x.to(tl.float32), mask=mask)


@triton.jit
def unmasked_copy_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs))


@triton.jit
def int16_from_bytes_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr.to(tl.pointer_type(tl.int16)) + offs, mask=mask), mask=mask)


@triton.jit
def _load_block(ptr, offs):
    return tl.load(ptr + offs)


@triton.jit
def copy_via_helper_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, _load_block(x_ptr, offs))


@triton.jit
def table_sum_kernel(table_ptr, lengths_ptr, out_ptr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    src = tl.load(table_ptr + i).to(tl.pointer_type(tl.float32))
    offs = tl.arange(0, BLOCK)
    x = tl.load(src + offs, mask=offs < tl.load(lengths_ptr + i), other=0.0)
    tl.store(out_ptr + i, tl.sum(x, axis=0))


@triton.jit
def histogram_kernel(idx_ptr, counts_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.atomic_add(counts_ptr + tl.load(idx_ptr + offs, mask=mask), 1, mask=mask)


@triton.jit
def two_dots_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """c = (a @ b) @ b^T[:N, :N] over one [BLOCK_M, *] row tile per program: a K-loop of dots, then one more;
    programs past M return before any dot."""
    pid = tl.program_id(0)
    if pid * BLOCK_M >= M:
        return
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows * K + ks[None, :], mask=(rows < M) & (ks[None, :] < K), other=0.0)
        b = tl.load(b_ptr + ks[:, None] * N + cols, mask=(ks[:, None] < K) & (cols < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    sq = tl.load(b_ptr + tl.arange(0, BLOCK_N)[:, None] * N + cols,
                 mask=(tl.arange(0, BLOCK_N)[:, None] < N) & (cols < N), other=0.0)
    out = tl.dot(acc, tl.trans(sq), input_precision="ieee")
    tl.store(c_ptr + rows * N + cols, out, mask=(rows < M) & (cols < N))


def test_dots_count_2mnk_at_their_block_shape_in_every_program_that_runs_them():
    """M=20 rows in tiles of 16 (the second tile half masked), a grid of 3 (the third program returns before
    its dots), K=40 in steps of 16 (3 dots of 16x16x16, the last past K), then one 16x16x16 dot: each running
    program counts 4 products of 2 * 16^3 FLOPs, masked rows and columns included."""
    M, N, K = 20, 12, 40
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)
    c = torch.empty(M, N)
    with TritonMonitor() as mon:
        two_dots_kernel[(3,)](a, b, c, M, N, K, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    assert mon.launches[0].flops == 2 * 4 * 2 * 16 ** 3
    assert mon.by_kernel()["two_dots_kernel"]["flops"] == 2 * 4 * 2 * 16 ** 3
    torch.testing.assert_close(c, (a.double() @ b.double() @ b.double()[:N].T).float())
    with TritonMonitor() as mon:
        scale_kernel[(1,)](a, c, torch.ones(1), 4, BLOCK=16)
    assert mon.launches[0].flops == 0


def test_masked_tail_counts_only_active_lanes_and_scalar_loads():
    n, block = 1000, 128
    x, scale = torch.randn(n), torch.tensor([2.0])
    y = torch.empty_like(x)
    with TritonMonitor() as mon:
        scale_kernel[(triton.cdiv(n, block),)](x, y, scale, n, BLOCK=block)
    (launch,) = mon.launches
    assert (launch.kernel, launch.grid, launch.programs) == ("scale_kernel", (8, 1, 1), 8)
    assert launch.bytes_loaded == n * 4 + 8 * 4  # every x once, the scalar once per program
    assert launch.bytes_stored == n * 4
    torch.testing.assert_close(y, 2 * x)


def test_2d_mask_on_a_strided_view_counts_each_dtype_width():
    M, N = 5, 7
    base = torch.randn(M, 16, dtype=torch.float16)
    x = base[:, 3:3 + N]  # rows 16 apart: the view starts inside its storage and has a row gap
    y = torch.empty(M, N)
    with TritonMonitor() as mon:
        tile_upcast_kernel[(2, 2)](x, y, M, N, x.stride(0), BLOCK_M=4, BLOCK_N=4)
    assert mon.launches[0].grid == (2, 2, 1) and mon.launches[0].programs == 4
    assert (mon.bytes_loaded, mon.bytes_stored) == (M * N * 2, M * N * 4)
    torch.testing.assert_close(y, x.float())


def test_loads_through_a_tensor_table_are_allowed_and_counted():
    lengths = [3, 17, 1]
    tensors = [torch.randn(k) for k in lengths]
    out = torch.empty(len(tensors))
    with TritonMonitor() as mon:
        table = tensor_table(tensors, torch.device("cpu"))
        table_sum_kernel[(len(tensors),)](table, torch.tensor(lengths), out, BLOCK=32)
    # per program: one 8-byte table entry, one 8-byte length, the row's active floats
    assert mon.bytes_loaded == 3 * (8 + 8) + 4 * sum(lengths)
    assert mon.bytes_stored == 3 * 4
    torch.testing.assert_close(out, torch.stack([t.sum() for t in tensors]))


def test_overrun_of_a_tensor_table_tensor_raises():
    tensors = [torch.randn(4), torch.randn(8)]
    out = torch.empty(2)
    with TritonMonitor():
        table = tensor_table(tensors, torch.device("cpu"))
        with pytest.raises(OutOfBoundsError, match="table_sum_kernel"):
            table_sum_kernel[(2,)](table, torch.tensor([4, 9]), out, BLOCK=16)


def test_atomic_rmw_counts_as_a_load_and_a_store_per_active_lane():
    idx = torch.tensor([0, 2, 2, 1, 2], dtype=torch.int64)
    counts = torch.zeros(3, dtype=torch.int32)
    with TritonMonitor() as mon:
        histogram_kernel[(1,)](idx, counts, idx.numel(), BLOCK=8)
    assert mon.bytes_loaded == 5 * 8 + 5 * 4
    assert mon.bytes_stored == 5 * 4
    assert counts.tolist() == [1, 1, 3]


def test_unmasked_overrun_raises_out_of_bounds_naming_kernel_access_and_nearest_tensor():
    x, y = torch.randn(100), torch.empty(128)
    with TritonMonitor():
        with pytest.raises(OutOfBoundsError, match=r"'unmasked_copy_kernel'.*load of 4-byte.*argument 'x_ptr'"):
            unmasked_copy_kernel[(1,)](x, y, BLOCK=128)


def test_overrun_inside_a_device_function_still_raises_out_of_bounds():
    x, y = torch.randn(100), torch.empty(128)
    with TritonMonitor():
        with pytest.raises(OutOfBoundsError, match="copy_via_helper_kernel"):
            copy_via_helper_kernel[(1,)](x, y, BLOCK=128)


def test_store_overrun_raises():
    x, y = torch.randn(128), torch.empty(100)
    with TritonMonitor():
        with pytest.raises(OutOfBoundsError, match="store of 4-byte"):
            unmasked_copy_kernel[(1,)](x, y, BLOCK=128)


def test_element_straddling_the_end_of_storage_is_out_of_bounds():
    nine_bytes = torch.zeros(9, dtype=torch.uint8)
    out = torch.empty(5, dtype=torch.int16)
    with TritonMonitor():
        int16_from_bytes_kernel[(1,)](nine_bytes, out, 4, BLOCK=8)  # bytes 0..7
        with pytest.raises(OutOfBoundsError, match=f"load of 2-byte elements at address 0x{nine_bytes.data_ptr() + 8:x}"):
            int16_from_bytes_kernel[(1,)](nine_bytes, out, 5, BLOCK=8)  # element 4 is bytes 8..9


def test_check_bounds_false_counts_without_raising():
    x, y = torch.randn(100), torch.empty(128)
    with TritonMonitor(check_bounds=False) as mon:
        unmasked_copy_kernel[(1,)](x, y, BLOCK=128)
    assert (mon.bytes_loaded, mon.bytes_stored) == (512, 512)


def test_totals_and_by_kernel_sum_over_launches():
    x, y = torch.randn(64), torch.empty(64)
    with TritonMonitor() as mon:
        unmasked_copy_kernel[(2,)](x, y, BLOCK=32)
        unmasked_copy_kernel[(4,)](x, y, BLOCK=16)
        scale_kernel[(1,)](x, y, torch.ones(1), 10, BLOCK=16)
    assert mon.num_launches == 3
    assert mon.by_kernel() == {
        "unmasked_copy_kernel": dict(launches=2, programs=6, bytes_loaded=512, bytes_stored=512, flops=0),
        "scale_kernel": dict(launches=1, programs=1, bytes_loaded=44, bytes_stored=40, flops=0),
    }
    assert (mon.bytes_loaded, mon.bytes_stored) == (556, 552)


def test_nested_monitors_both_count():
    x, y = torch.randn(64), torch.empty(64)
    with TritonMonitor() as outer:
        unmasked_copy_kernel[(1,)](x, y, BLOCK=64)
        with TritonMonitor() as inner:
            unmasked_copy_kernel[(2,)](x, y, BLOCK=32)
    assert (outer.num_launches, inner.num_launches) == (2, 1)
    assert outer.bytes_loaded == 2 * inner.bytes_loaded == 512


def test_interpreter_is_restored_on_exit_and_after_an_error():
    originals = (interpreter.GridExecutor.__call__, interpreter.InterpreterBuilder.create_masked_load)
    x, y = torch.randn(100), torch.empty(128)
    with pytest.raises(OutOfBoundsError):
        with TritonMonitor():
            unmasked_copy_kernel[(1,)](x, y, BLOCK=128)
    assert (interpreter.GridExecutor.__call__, interpreter.InterpreterBuilder.create_masked_load) == originals
    with TritonMonitor() as mon:
        pass
    unmasked_copy_kernel[(1,)](torch.randn(128), y, BLOCK=128)
    assert mon.num_launches == 0


def test_entering_without_the_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        TritonMonitor().__enter__()


def test_launching_a_compiled_kernel_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    compiled = triton.jit(unmasked_copy_kernel.fn)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with TritonMonitor():
        with pytest.raises(RuntimeError, match="not set when it was decorated"):
            compiled[(1,)](torch.randn(8), torch.empty(8), BLOCK=8)
