"""The output-tile loop and column-quarter epilogue helpers that R-MDM's Triton products share: the forward's
recurse_linear_kernel (triton_kernels.py, a W^T) and the backward's recurse_dx_kernel and recurse_dw_kernel
(triton_backward.py, dy W and dy^T x).

Addressing: a tile's operand pointers start at its corner (64-bit pointer arithmetic) and advance one BLOCK_K slice
a step; offsets within a slice or an epilogue quarter are int32, which keeps the registers beside the accumulator
32-bit (the 128-wide tiles spilled with 64-bit offsets). `check_tile_strides` holds every row stride times a block
side below 2**31, the launchers refuse larger shapes.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .. import _dot


def check_tile_strides(block: int, f: int, fallback: str) -> None:
    """The products address within a tile in int32 (tile, quarter): every row stride times a block side, plus a
    block side, must stay below 2**31. The row strides are d, 3d and f with d <= 512, so the bound is
    block * (f + 1) < 2**31 for the largest side `block` of a launch's tiles; past it the call is refused, naming f
    and `fallback` (what runs it instead), rather than wrap."""
    if block * (f + 1) >= 2 ** 31:
        raise ValueError(f"recurse: the triton backend's products address a tile in int32 and need "
                         f"{block} * (f + 1) < 2**31, got f={f} ({fallback})")


@triton.jit
def tile(a_ptr, lda, b_ptr, ldb, M, N, Kd, TRANS_A: tl.constexpr, TRANS_B: tl.constexpr, SUM_A: tl.constexpr,
         DOT_F32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         BLOCK_K: tl.constexpr):
    """Output tile (program_id(0), program_id(1)) of the [M, N] product A B: (its rows, the sum over k < Kd of
    A[rows, k] B[k, cols] and, when SUM_A, of A[rows, k] in fp32, else 0); k in BLOCK_K slices in increasing order,
    the product through diffkern._dot (the row sums cost no load: they are the bias gradient when A is dy^T).
    A: [M, Kd] with row stride lda, or (TRANS_A) stored transposed, [Kd, M]; B: [Kd, N] with row stride ldb, or
    (TRANS_B) stored transposed, [N, Kd] (a weight W [N, Kd] for x W^T). Elements out of range count as 0."""
    row0, col0 = tl.program_id(0) * BLOCK_M, tl.program_id(1) * BLOCK_N
    i, j, k = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    rm, nm = i < M - row0, j < N - col0
    if TRANS_A:
        a_ptr += row0
        a_offs, a_step = k[:, None] * lda + i[None, :], BLOCK_K * lda
    else:
        a_ptr += row0.to(tl.int64) * lda
        a_offs, a_step = i[:, None] * lda + k[None, :], BLOCK_K
    if TRANS_B:
        b_ptr += col0.to(tl.int64) * ldb
        b_offs, b_step = j[:, None] * ldb + k[None, :], BLOCK_K
    else:
        b_ptr += col0
        b_offs, b_step = k[:, None] * ldb + j[None, :], BLOCK_K * ldb
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    a_sum = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, Kd, BLOCK_K):
        km = k < Kd - k0
        if TRANS_A:
            a = tl.trans(tl.load(a_ptr + a_offs, mask=km[:, None] & rm[None, :], other=0.0))
        else:
            a = tl.load(a_ptr + a_offs, mask=rm[:, None] & km[None, :], other=0.0)
        if TRANS_B:
            b = tl.trans(tl.load(b_ptr + b_offs, mask=nm[:, None] & km[None, :], other=0.0))
        else:
            b = tl.load(b_ptr + b_offs, mask=km[:, None] & nm[None, :], other=0.0)
        acc += _dot.dot(a, b, DOT_F32, PRECISION)
        if SUM_A:
            a_sum += tl.sum(a.to(tl.float32), 1)
        a_ptr += a_step
        b_ptr += b_step
    return row0 + i, acc, a_sum


@triton.jit
def _halves(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The left and right column halves of x [ROWS, COLS] (a reshape and split, which keep each element in its
    thread on sm_80 and sm_90a)."""
    return tl.split(tl.permute(tl.reshape(x, (ROWS, 2, COLS // 2)), (0, 2, 1)))


@triton.jit
def quarters(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The accumulator's four [BLOCK_M, BLOCK_N // 4] column quarters, left to right. The epilogues run a quarter at
    a time: a quarter's loads follow the previous quarter's stores, so the compiler cannot hoist all of the tile's
    loads (and their 64-bit addresses) up front, which spilled at 128 x 128 where a row stride is not 16-divisible.
    Each quarter changes layout once (through shared memory) for its loads and stores."""
    left, right = _halves(acc, BLOCK_M, BLOCK_N)
    ll, lr = _halves(left, BLOCK_M, BLOCK_N // 2)
    rl, rr = _halves(right, BLOCK_M, BLOCK_N // 2)
    return ll, lr, rl, rr


@triton.jit
def quarter(q, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Column quarter q of tile (program_id(0), program_id(1)) of an [M, N] matrix with row stride N: (the int64
    offset of its corner, its rows, its columns, its elements' int32 offsets from the corner, their mask)."""
    row0 = tl.program_id(0) * BLOCK_M
    col0 = tl.program_id(1) * BLOCK_N + q * (BLOCK_N // 4)
    i, j = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N // 4)
    return (row0.to(tl.int64) * N + col0, row0 + i, col0 + j, i[:, None] * N + j[None, :],
            (i < M - row0)[:, None] & (j < N - col0)[None, :])
