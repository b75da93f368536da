"""Triton backward of R-MDM's shared-block recursion: the `triton` backend of diffkern::rmdm_recurse_bwd, the
default on CUDA tensors (T <= 256, d <= 512, like the tiled forward; the `cuda` backend, the C++ backward on ATen
and cuBLAS in fp32, stays forceable through diffkern.backend("cuda")).

Same outputs and recompute structure as csrc/cpu/rmdm_recurse_bwd.cpp: iterations are walked backwards; iteration
it is re-run from its saved input (x or states[it-1]) with the tiled forward's launches (triton_kernels.py), each of
its K blocks' activations kept, then the blocks are differentiated in reverse. Memory: one iteration's activations.
Per block evaluation, with G the gradient reaching the block's output and dy = g2 G (adaLN's gate; G itself without):
  recompute, 7 launches (6 for an iteration's last block without adaLN, whose output nobody reads):
      LN1 -> u1, u1 W_qkv^T -> qkv, attention -> ctx and the rows' log-sum-exp lse [B*H, T],
      h_mid = h + g1 a (a = ctx W_o^T + b_o kept with adaLN), LN2 -> u2, g = gelu(z) (z kept),
      h_out = h_mid + g2 y (y kept with adaLN)
  backward, 13 launches:
      recurse_dw_kernel        dW_2 += dy^T g, db_2 += the column sums of dy
      recurse_dx_kernel        dz = (dy W_2) gelu'(z)                        (gelu' fused as the epilogue)
      recurse_dw_kernel        dW_1 += dz^T u2, db_1
      recurse_dx_kernel        du = dz W_1
      recurse_norm_bwd_kernel  LN2 (+adaLN) backward over whole rows: dh_mid = G + LN'(du), dy = g1 dh_mid; the
                               tile's row sums of the LN vectors' and adaLN's gradients (shift2, scale2,
                               gate1 = dh_mid a, gate2 = G y) as partials
      recurse_partials_kernel  the partials summed in order into the fp32 gradient accumulators
      recurse_dw_kernel        dW_o += dy^T ctx, db_o
      recurse_dx_kernel        dctx = dy W_o
      recurse_attention_bwd_kernel  flash-attention's backward, P recomputed from lse: one program per (key tile,
                               sample, head) for dk, dv (over every query tile) and one per (query tile, sample,
                               head) for dq (over every key tile), in one launch          -> dqkv
      recurse_dw_kernel        dW_qkv += dqkv^T u1, db_qkv
      recurse_dx_kernel        du = dqkv W_qkv
      recurse_norm_bwd_kernel  LN1 backward: G <- dh_mid + LN'(du) (+ dstates[it-1] at an iteration's first block),
                               dy = g2 G of the block G flows into next
      recurse_partials_kernel
The LayerNorm backward is not fused into the product before it: an epilogue needs whole rows of du in one program,
so every program would re-read all of W (up to 2 MiB) for its 16 rows, far more L2 traffic than du's round trip
through memory (bench/rmdm_model.py's L2-aware model, bf16 at the Sudoku shape: 1853 us a call fused, 595 for the
du products and the LayerNorm backwards apart).
The gradient at the last state, dstates[L-1] copied into G (and with adaLN gated into dy), is aten ops before the first
launch; dx is G at the end, and the weights' and mod's gradients are rounded from their fp32 accumulators once.

Determinism (the same bits on every run): no atomics. Each element of a weight gradient belongs to one program of
recurse_dw_kernel, which reduces over the B*T rows in a fixed order and adds into its fp32 accumulator; the launches
run in a fixed order over iterations and blocks; the LayerNorm and adaLN partials are summed in a fixed order by
recurse_partials_kernel. Each kernel has one launch configuration per dtype (no autotuning): the accumulating kernels
cannot be launched again and again by a tuner, and the reducing ones would sum in another order under another layout.

Precision: every product goes through diffkern._dot (16-bit operands on tensor cores with fp32 accumulation, tf32x3
for fp32 inputs, fp32 "ieee" under the interpreter, which the tests run). The gradients a product reads or forms (dy,
dz, dctx, dqkv, du) are stored in the operand dtype, as the activations are, and so is the residual gradient G (two
buffers, G and dh_mid): rounded once per LayerNorm backward, 2K times an iteration, where PyTorch's autograd in that
dtype rounds it after every op (tests/test_rmdm_triton_backward.py holds it to the error model's tolerance, whose
term 2 |plain - oracle| is that autograd's error); the weights' and mod's gradients accumulate in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _dot, _triton
from .._autotune import Config
from .._triton import KernelSpec
from . import triton_kernels as tk
from . import triton_tiles
from .reference import N_PARAMS
from .triton_common import gate, gelu_grad, normalized, scores
from .triton_tiles import quarter, quarters, tile

PARTIALS = Config(dict(BLOCK_R=32, BLOCK_D=128), 4)
NORM_ELEMENTS = 4096  # recurse_norm_bwd_kernel's [BLOCK_M, BLOCK_N] tile
N_PARTIALS = 6  # recurse_norm_bwd_kernel's quantities: LN w, LN b, adaLN shift, scale, gate1, gate2


def product_config(dtype: torch.dtype) -> Config:
    """recurse_dx_kernel's and recurse_dw_kernel's configuration: 128 x 128 output tiles in 8 warps, reduced in
    32-deep slices; 64 x 128 for fp32 inputs (tf32x3: three products a dot). The largest tiles that compile without
    spills on sm_80 and sm_90a in every specialisation a launch gets (an integer argument equal to 1, 16-divisible
    sizes or neither), which takes the shared tile loop's 32-bit in-tile offsets and the epilogues' column quarters
    (triton_tiles.py).
    A program reads its tile's rows of A and columns of B over the whole depth, so the L2 traffic per FLOP falls
    with the tile's sides (bench/rmdm_model.py's L2-aware model)."""
    return Config(dict(BLOCK_M=64 if dtype == torch.float32 else 128, BLOCK_N=128, BLOCK_K=32), 8)


def check_tile_strides(dtype: torch.dtype, f: int) -> None:
    """triton_tiles.check_tile_strides for the backward's products and the forward's launches of its recompute: from
    f = 2**23 - 1 (8.4 million) on with 16-bit inputs (the forward's 256-column tiles), 2**24 - 1 with fp32 ones,
    recurse_bwd refuses the call, naming f; diffkern.backend("cuda") runs it."""
    c = product_config(dtype).constexprs
    block = max(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], tk.largest_linear_side(dtype))
    triton_tiles.check_tile_strides(block, f, "diffkern.backend('cuda') runs it")


def attention_config(dtype: torch.dtype) -> Config:
    """recurse_attention_bwd_kernel's configuration: 32 x 32 score tiles, 16 x 16 for fp32 inputs, whose tf32x3
    products (three per dot) spill at 32 x 32 (in 4 or 8 warps) with the dk and dv accumulators live."""
    tile = 16 if dtype == torch.float32 else 32
    return Config(dict(BLOCK_Q=tile, BLOCK_KV=tile), 4)


def norm_config(d: int) -> Config:
    """recurse_norm_bwd_kernel's configuration at width d: whole rows, BLOCK_N = next_power_of_2(d) columns,
    NORM_ELEMENTS // BLOCK_N of them a program."""
    block_n = triton.next_power_of_2(d)
    return Config(dict(BLOCK_M=max(1, NORM_ELEMENTS // block_n), BLOCK_N=block_n), 8)


@triton.jit
def recurse_dx_kernel(dy_ptr, w_ptr, z_ptr, out_ptr, M, N, Kd, GELU_GRAD: tl.constexpr, DOT_F32: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The input gradient of y = x W^T + b for one [BLOCK_M, BLOCK_N] tile: out = dy W (dy [M, Kd], W the forward's
    [Kd, N] weight), times gelu'(z) (z [M, N]) when GELU_GRAD; stored in out's dtype."""
    _, acc, _ = tile(dy_ptr, Kd, w_ptr, N, M, N, Kd, False, False, False, DOT_F32, PRECISION, BLOCK_M, BLOCK_N,
                     BLOCK_K)
    parts = quarters(acc, BLOCK_M, BLOCK_N)
    for q in tl.static_range(4):
        corner, _, _, offs, m = quarter(q, M, N, BLOCK_M, BLOCK_N)
        val = parts[q]
        if GELU_GRAD:
            val *= gelu_grad(tl.load(z_ptr + corner + offs, mask=m, other=0.0).to(tl.float32))
        tl.store(out_ptr + corner + offs, val.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def recurse_dw_kernel(dy_ptr, x_ptr, dw_ptr, db_ptr, R, N, Kd, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The weight gradient of y = x W^T + b over R rows, for one [BLOCK_M, BLOCK_N] tile of W [N, Kd]:
    dw += dy^T x (dy [R, N], x [R, Kd]), the rows summed in BLOCK_K slices in order; the programs of the first
    column tile also add the column sums of dy, which the product's loop forms from the dy tiles it loads, into
    db [N]. dw, db: fp32 accumulators."""
    i, acc, colsum = tile(dy_ptr, N, x_ptr, Kd, N, Kd, R, True, False, True, DOT_F32, PRECISION, BLOCK_M, BLOCK_N,
                          BLOCK_K)
    parts = quarters(acc, BLOCK_M, BLOCK_N)
    for q in tl.static_range(4):
        corner, _, _, offs, m = quarter(q, N, Kd, BLOCK_M, BLOCK_N)
        tl.store(dw_ptr + corner + offs, tl.load(dw_ptr + corner + offs, mask=m, other=0.0) + parts[q], mask=m)
    if tl.program_id(1) == 0:
        tl.store(db_ptr + i, tl.load(db_ptr + i, mask=i < N, other=0.0) + colsum, mask=i < N)


@triton.jit
def _head_tile(ptr, rows, T, ld, col0, DH, BLOCK_DH: tl.constexpr):
    """Rows `rows` of one head's columns col0 ... col0 + DH of a sample's [T, ld] matrix, 0 outside:
    [rows, BLOCK_DH]."""
    dcols = tl.arange(0, BLOCK_DH)
    return tl.load(ptr + rows[:, None] * ld + col0 + dcols[None, :], mask=(rows < T)[:, None] & (dcols < DH)[None, :],
                   other=0.0)


@triton.jit
def _store_head_tile(ptr, rows, T, ld, col0, DH, val, BLOCK_DH: tl.constexpr):
    dcols = tl.arange(0, BLOCK_DH)
    tl.store(ptr + rows[:, None] * ld + col0 + dcols[None, :], val.to(ptr.dtype.element_ty),
             mask=(rows < T)[:, None] & (dcols < DH)[None, :])


@triton.jit
def _query_tile(qkv, ctx, dctx, lse_row, rows, T, D, col0, DH, BLOCK_DH: tl.constexpr):
    """q, dctx, delta = rowsum(dctx * ctx) and lse of a query tile of one head (lse +inf past T: P = 0 there)."""
    q = _head_tile(qkv, rows, T, 3 * D, col0, DH, BLOCK_DH)
    do = _head_tile(dctx, rows, T, D, col0, DH, BLOCK_DH)
    o = _head_tile(ctx, rows, T, D, col0, DH, BLOCK_DH)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    return q, do, delta, tl.load(lse_row + rows, mask=rows < T, other=float("inf"))


@triton.jit
def _dscores(q, do, delta, lse, kk, vv, keys, T, scale, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """(P, dS) of a query tile against a key tile: P = exp(q k^T scale - lse), dS = P (dctx v^T - delta)."""
    p = tl.exp(scores(q, kk, keys, T, scale, DOT_F32, PRECISION) - lse[:, None])
    dp = _dot.dot(do, tl.trans(vv), DOT_F32, PRECISION)
    return p, p * (dp - delta[:, None])


@triton.jit
def recurse_attention_bwd_kernel(qkv_ptr, ctx_ptr, dctx_ptr, lse_ptr, dqkv_ptr, T, D, H, DH, scale,
                                 DOT_F32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr,
                                 BLOCK_KV: tl.constexpr, BLOCK_DH: tl.constexpr):
    """The backward of ctx = softmax(q k^T * scale) v for (sample, head) program_id(1), into dqkv [B*T, 3D] (laid out
    as qkv): programs program_id(0) < cdiv(T, BLOCK_KV) own a key tile and sum dk, dv over every query tile; the
    others own a query tile and sum dq over every key tile. lse [B*H, T]: the forward's log-sum-exp per row."""
    bh = tl.program_id(1)
    col0 = (bh % H) * DH
    sample = (bh // H).to(tl.int64) * T
    qkv, dqkv = qkv_ptr + sample * 3 * D, dqkv_ptr + sample * 3 * D
    ctx, dctx = ctx_ptr + sample * D, dctx_ptr + sample * D
    lse_row = lse_ptr + bh.to(tl.int64) * T
    n_kv = tl.cdiv(T, BLOCK_KV)
    if tl.program_id(0) < n_kv:
        keys = tl.program_id(0) * BLOCK_KV + tl.arange(0, BLOCK_KV)
        kk = _head_tile(qkv, keys, T, 3 * D, D + col0, DH, BLOCK_DH)
        vv = _head_tile(qkv, keys, T, 3 * D, 2 * D + col0, DH, BLOCK_DH)
        dk = tl.zeros((BLOCK_KV, BLOCK_DH), tl.float32)
        dv = tl.zeros((BLOCK_KV, BLOCK_DH), tl.float32)
        for q0 in range(0, T, BLOCK_Q):
            rows = q0 + tl.arange(0, BLOCK_Q)
            q, do, delta, lse = _query_tile(qkv, ctx, dctx, lse_row, rows, T, D, col0, DH, BLOCK_DH)
            p, ds = _dscores(q, do, delta, lse, kk, vv, keys, T, scale, DOT_F32, PRECISION)
            dv += _dot.dot(tl.trans(p), do, DOT_F32, PRECISION)
            dk += _dot.dot(tl.trans(ds), q, DOT_F32, PRECISION)
        _store_head_tile(dqkv, keys, T, 3 * D, D + col0, DH, dk * scale, BLOCK_DH)
        _store_head_tile(dqkv, keys, T, 3 * D, 2 * D + col0, DH, dv, BLOCK_DH)
    else:
        rows = (tl.program_id(0) - n_kv) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q, do, delta, lse = _query_tile(qkv, ctx, dctx, lse_row, rows, T, D, col0, DH, BLOCK_DH)
        dq = tl.zeros((BLOCK_Q, BLOCK_DH), tl.float32)
        for s0 in range(0, T, BLOCK_KV):
            keys = s0 + tl.arange(0, BLOCK_KV)
            kk = _head_tile(qkv, keys, T, 3 * D, D + col0, DH, BLOCK_DH)
            vv = _head_tile(qkv, keys, T, 3 * D, 2 * D + col0, DH, BLOCK_DH)
            p, ds = _dscores(q, do, delta, lse, kk, vv, keys, T, scale, DOT_F32, PRECISION)
            dq += _dot.dot(ds, kk, DOT_F32, PRECISION)
        _store_head_tile(dqkv, rows, T, 3 * D, col0, DH, dq * scale, BLOCK_DH)


@triton.jit
def recurse_norm_bwd_kernel(du_ptr, h_ptr, ln_w_ptr, ln_b_ptr, mod_ptr, res_ptr, dstate_ptr, a_ptr, y_ptr, dh_ptr,
                            dy_ptr, part_ptr, T, D, K, kb, kb_gate, gate_part, eps, add_state, SHIFT: tl.constexpr,
                            HAS_MOD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The backward of u = LN(h) w + b (then adaLN's (1 + scale) and shift, parts SHIFT + 1 and SHIFT of block kb,
    when HAS_MOD) given du [B*T, D], for rows program_id(0) * BLOCK_M ... of the T-row group program_id(1) (a sample
    with adaLN, norm_groups), whole rows (BLOCK_N >= D). h: the fp32 state [B*T, D]; du, res, dh: [B*T, D] in the
    operand dtype;
        dh = res + LN'(du)  (+ dstate when add_state),  and with adaLN  dy = gate * dh  (without, dy is dh)
    with gate adaLN's part gate_part of block kb_gate. The tile's sums over its rows go to
    part [groups, n_tiles, 6, D] (fp32): 0 dLN_w = du (1 + scale) xhat, 1 dLN_b = du (1 + scale), with adaLN
    2 dshift = du, 3 dscale = du LN(h) and, after LN2 (SHIFT 3), 4 dgate1 = dh a and 5 dgate2 = res y (a, y: the
    block's ungated attention and MLP outputs)."""
    tile, s = tl.program_id(0), tl.program_id(1)
    t = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    tm, cm = t < T, cols < D
    rows = s.to(tl.int64) * T + t
    m = tm[:, None] & cm[None, :]
    offs = rows[:, None] * D + cols[None, :]
    du = tl.load(du_ptr + offs, mask=m, other=0.0).to(tl.float32)
    w = tl.load(ln_w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    xhat, rstd = normalized(tl.load(h_ptr + offs, mask=m, other=0.0), cm, D, eps)
    dln = du
    if HAS_MOD:
        dln = du * (1.0 + tl.load(mod_ptr + (s.to(tl.int64) * K + kb) * 6 * D + (SHIFT + 1) * D + cols, mask=cm,
                                  other=0.0).to(tl.float32))[None, :]
    part = part_ptr + (s.to(tl.int64) * tl.num_programs(0) + tile) * 6 * D + cols
    tl.store(part, tl.sum(dln * xhat, 0), mask=cm)
    tl.store(part + D, tl.sum(dln, 0), mask=cm)
    if HAS_MOD:
        lb = tl.load(ln_b_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        tl.store(part + 2 * D, tl.sum(du, 0), mask=cm)
        tl.store(part + 3 * D, tl.sum(tl.where(m, du * (xhat * w[None, :] + lb[None, :]), 0.0), 0), mask=cm)
    dxhat = dln * w[None, :]
    c1 = tl.sum(dxhat * xhat, 1) / D
    c2 = tl.sum(dxhat, 1) / D
    dh_ln = tl.where(m, rstd[:, None] * (dxhat - c2[:, None] - xhat * c1[:, None]), 0.0)
    res = tl.load(res_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_MOD and SHIFT == 3:
        tl.store(part + 5 * D, tl.sum(res * tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32), 0), mask=cm)
    dh = res + dh_ln
    if add_state:
        dh += tl.load(dstate_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=m)
    if HAS_MOD:
        g = gate(mod_ptr + (s.to(tl.int64) * K + kb_gate) * 6 * D + gate_part * D, 0, cols[None, :], m, D, HAS_MOD)
        tl.store(dy_ptr + offs, (g * dh).to(dy_ptr.dtype.element_ty), mask=m)
        if SHIFT == 3:
            tl.store(part + 4 * D, tl.sum(dh * tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32), 0), mask=cm)


@triton.jit
def recurse_partials_kernel(part_ptr, dln_ptr, dmod_ptr, B, NT, D, K, kb, SHIFT: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    """recurse_norm_bwd_kernel's partials part [B, NT, 6, D] (B row groups of NT tiles each) summed BLOCK_R tiles at
    a time in a fixed order, for columns program_id(0) * BLOCK_D ... and quantity q = program_id(1): q 0, 1 (the LN
    vectors) over every (group, tile) into dln [2, D], by the programs of program_id(2) == 0; q >= 2 (adaLN, whose
    row groups are the samples) over the tiles of sample program_id(2) into part SHIFT + q - 2 (q 2, 3), 2 (q 4) or
    5 (q 5) of block kb of dmod [B, K, 6, D]. dln and dmod are fp32 accumulators."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cols < D
    q, s = tl.program_id(1), tl.program_id(2)
    per_sample = q >= 2
    if per_sample | (s == 0):
        first = tl.where(per_sample, s.to(tl.int64) * NT, 0)
        n = tl.where(per_sample, NT, B * NT)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for r0 in range(0, n, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            acc += tl.sum(tl.load(part_ptr + (((first + r) * 6 + q) * D)[:, None] + cols[None, :],
                                  mask=(r < n)[:, None] & cm[None, :], other=0.0), 0)
        if per_sample:
            mod_part = tl.where(q == 4, 2, tl.where(q == 5, 5, SHIFT + q - 2))
            out = dmod_ptr + ((s.to(tl.int64) * K + kb) * 6 + mod_part) * D + cols
        else:
            out = dln_ptr + q * D + cols
        tl.store(out, tl.load(out, mask=cm, other=0.0) + acc, mask=cm)


def _launch_dx(dy, w, out, z=None):
    M, Kd = dy.shape
    N = w.shape[1]
    cfg = product_config(dy.dtype)
    c = cfg.constexprs
    recurse_dx_kernel[(triton.cdiv(M, c["BLOCK_M"]), triton.cdiv(N, c["BLOCK_N"]))](
        dy, w, z if z is not None else out, out, M, N, Kd, GELU_GRAD=z is not None, **_dot.dot_meta(dy.dtype),
        **cfg.meta())


def _launch_dw(dy, x, dw, db):
    R, N = dy.shape
    Kd = x.shape[1]
    cfg = product_config(dy.dtype)
    c = cfg.constexprs
    recurse_dw_kernel[(triton.cdiv(N, c["BLOCK_M"]), triton.cdiv(Kd, c["BLOCK_N"]))](
        dy, x, dw, db, R, N, Kd, **_dot.dot_meta(dy.dtype), **cfg.meta())


def _linear_backward(dy, x, w, dw, db, out, z=None):
    """dW += dy^T x, db += column sums of dy, out = dy W (times gelu'(z))."""
    _launch_dw(dy, x, dw, db)
    _launch_dx(dy, w, out, z)


class _Activations:
    """One block evaluation's kept activations, [B*T, .]: the fp32 input state h and h_mid, the operand-dtype u1,
    qkv, ctx, u2, z, g and (adaLN) a and y, and the attention's lse [B*heads*T] (fp32)."""

    def __init__(self, M, d, f, n_lse, dtype, device, has_mod):
        def new(n, dt=dtype):
            return _triton.empty((M, n), dt, device)
        self.h, self.h_mid = new(d, torch.float32), new(d, torch.float32)
        self.u1, self.ctx, self.u2, self.qkv, self.z, self.g = new(d), new(d), new(d), new(3 * d), new(f), new(f)
        self.a, self.y = (new(d), new(d)) if has_mod else (None, None)
        self.lse = _triton.empty((n_lse,), torch.float32, device)


def _recompute(h_in, acts, weights, mod, B, T, heads, eps):
    """One iteration re-run from its input state h_in [B, T, d] with the tiled forward's launches, each block's
    activations kept in acts[kb]; the output of the last block is not formed (only its y, with adaLN)."""
    K = len(acts)
    acts[0].h.copy_(h_in.reshape(acts[0].h.shape))
    for kb, A in enumerate(acts):
        ln1_w, ln1_b, w_qkv, b_qkv, w_o, b_o, ln2_w, ln2_b, w_1, b_1, w_2, b_2 = weights[kb * N_PARAMS:
                                                                                           (kb + 1) * N_PARAMS]
        res = dict(mod=mod, kb=kb, K=K, T=T)
        tk._launch_norm(A.h, A.u1, ln1_w, ln1_b, mod, kb, K, T, eps, 0)
        tk._launch_linear(A.u1, w_qkv, b_qkv, A.qkv, tk.STORE)
        tk._launch_attention(A.qkv, A.ctx, B, T, heads, lse=A.lse)
        tk._launch_linear(A.ctx, w_o, b_o, A.h_mid, tk.RESIDUAL, h=A.h, part=2, pre=A.a, **res)
        tk._launch_norm(A.h_mid, A.u2, ln2_w, ln2_b, mod, kb, K, T, eps, 3)
        tk._launch_linear(A.u2, w_1, b_1, A.g, tk.GELU, pre=A.z)
        if kb < K - 1:
            tk._launch_linear(A.g, w_2, b_2, acts[kb + 1].h, tk.RESIDUAL, h=A.h_mid, part=5, pre=A.y, **res)
        elif mod is not None:
            tk._launch_linear(A.g, w_2, b_2, A.y, tk.STORE)


class _Grads:
    """fp32 accumulators: every weight's gradient (the LayerNorm vectors of a block as one [2, d] per norm) and
    mod's."""

    def __init__(self, weights, mod):
        K, d = len(weights) // N_PARAMS, weights[0].shape[0]
        self.w, self.ln = [], []
        for kb in range(K):
            ln = [torch.zeros((2, d), dtype=torch.float32, device=weights[0].device) for _ in range(2)]
            rows = {0: ln[0][0], 1: ln[0][1], 6: ln[1][0], 7: ln[1][1]}  # a norm's (w, b) gradients: one [2, d]
            self.w += [rows[i] if i in rows else torch.zeros(w.shape, dtype=torch.float32, device=w.device)
                       for i, w in enumerate(weights[kb * N_PARAMS:(kb + 1) * N_PARAMS])]
            self.ln.append(ln)
        self.mod = torch.zeros(mod.shape, dtype=torch.float32, device=mod.device) if mod is not None else None

    def rounded(self, weights, mod, x):
        return [g.to(w.dtype) for g, w in zip(self.w, weights)], \
            self.mod.to(mod.dtype) if mod is not None else x.new_empty(0)


def norm_groups(B: int, T: int, has_mod: bool) -> tuple[int, int]:
    """recurse_norm_bwd_kernel's row groups (program_id(1)) and rows per group: the samples with adaLN, whose
    gradients are sums over a sample's rows, else all B*T rows as one group (no tile padded at a sample's end)."""
    return (B, T) if has_mod else (1, B * T)


def _launch_norm_bwd(du, h, ln_w, ln_b, mod, res, dh, dy, part, dln, dmod, kb, K, B, T, eps, shift, gate_at,
                     a=None, y=None, dstate=None):
    d = h.shape[1]
    groups, rows = norm_groups(B, T, mod is not None)
    cfg = norm_config(d)
    nt = triton.cdiv(rows, cfg.constexprs["BLOCK_M"])
    recurse_norm_bwd_kernel[(nt, groups)](
        du, h, ln_w, ln_b, mod if mod is not None else dy, res, dstate if dstate is not None else dy,
        a if a is not None else dy, y if y is not None else dy, dh, dy, part, rows, d, K, kb, *gate_at, eps,
        int(dstate is not None), SHIFT=shift, HAS_MOD=mod is not None, **cfg.meta())
    n_q = 2 if mod is None else (N_PARTIALS if shift == 3 else 4)
    recurse_partials_kernel[(triton.cdiv(d, PARTIALS.constexprs["BLOCK_D"]), n_q, groups)](
        part, dln, dmod if dmod is not None else dln, groups, nt, d, K, kb, SHIFT=shift, **PARTIALS.meta())


def _block_backward(A, w, dw, dln, mod, dmod, G, Gm, dy, bufs, kb, K, B, T, heads, eps, gate_next, dstate):
    """Block kb's backward (module docstring): G, dy hold the gradient at its output (and g2 G; without adaLN dy is
    G); on return G holds the gradient at its input (plus dstate) and dy gate_next's gate times it."""
    ln1_w, ln1_b, w_qkv, _, w_o, _, ln2_w, ln2_b, w_1, _, w_2, _ = w
    du, dz, dctx, dqkv, part = bufs
    d = G.shape[1]
    _linear_backward(dy, A.g, w_2, dw[10], dw[11], dz, z=A.z)
    _linear_backward(dz, A.u2, w_1, dw[8], dw[9], du)
    dy_mid = dy if mod is not None else Gm  # without adaLN the gradient itself
    _launch_norm_bwd(du, A.h_mid, ln2_w, ln2_b, mod, G, Gm, dy_mid, part, dln[1], dmod, kb, K, B, T, eps, 3, (kb, 2),
                     a=A.a, y=A.y)
    _linear_backward(dy_mid, A.ctx, w_o, dw[4], dw[5], dctx)
    dh = d // heads
    ac = attention_config(dqkv.dtype)
    recurse_attention_bwd_kernel[(triton.cdiv(T, ac.constexprs["BLOCK_KV"]) + triton.cdiv(T, ac.constexprs["BLOCK_Q"]),
                                  B * heads)](
        A.qkv, A.ctx, dctx, A.lse, dqkv, T, d, heads, dh, dh ** -0.5, **_dot.dot_meta(dqkv.dtype),
        BLOCK_DH=tk.block_dh(dh), **ac.meta())
    _linear_backward(dqkv, A.u1, w_qkv, dw[2], dw[3], du)
    _launch_norm_bwd(du, A.h, ln1_w, ln1_b, mod, Gm, G, dy, part, dln[0], dmod, kb, K, B, T, eps, 0, (gate_next, 5),
                     dstate=dstate)


def recurse_bwd(dstates, x, states, weights, mod, heads, eps):
    """The triton backend of diffkern::rmdm_recurse_bwd: (dx, dweights, dmod) of rmdm_recurse (module docstring).

    dstates, states: [L, B, T, d]; x [B, T, d]; weights: K * 12 tensors; mod None or [B, K, 6, d]; all in x's dtype
    (float16, bfloat16 or float32), T <= 256, d <= 512. dmod is an empty tensor without mod. NaN/inf propagate as in
    the forward (a NaN reaching a sample's attention makes that sample's gradients NaN, and every weight's)."""
    B, T, d = x.shape
    if d > tk.MAX_D or T > tk.MAX_T:
        raise ValueError(f"recurse: the triton backend runs T <= {tk.MAX_T} and d <= {tk.MAX_D}, got T={T}, d={d}")
    _triton.check_float32_math("recurse", x.dtype, "x")
    M, f, K, L = B * T, weights[8].shape[0], len(weights) // N_PARAMS, states.shape[0]
    check_tile_strides(x.dtype, f)
    dt, dev = x.dtype, x.device
    acts = [_Activations(M, d, f, B * heads * T, dt, dev, mod is not None) for _ in range(K)]
    grads = _Grads(weights, mod)
    groups, rows = norm_groups(B, T, mod is not None)
    bufs = (_triton.empty((M, d), dt, dev), _triton.empty((M, f), dt, dev), _triton.empty((M, d), dt, dev),
            _triton.empty((M, 3 * d), dt, dev),
            _triton.empty((groups, triton.cdiv(rows, norm_config(d).constexprs["BLOCK_M"]), N_PARTIALS, d),
                          torch.float32, dev))
    G = dstates[L - 1].reshape(M, d).clone()
    Gm = torch.empty_like(G)
    dy = G if mod is None else (G.view(B, T, d).float() * mod[:, K - 1, 5, None, :].float()).to(dt).reshape(M, d)
    for it in reversed(range(L)):
        _recompute(x if it == 0 else states[it - 1], acts, weights, mod, B, T, heads, eps)
        for kb in reversed(range(K)):
            _block_backward(acts[kb], weights[kb * N_PARAMS:(kb + 1) * N_PARAMS],
                            grads.w[kb * N_PARAMS:(kb + 1) * N_PARAMS], grads.ln[kb], mod, grads.mod, G, Gm, dy, bufs,
                            kb, K, B, T, heads, eps, (kb - 1) % K,
                            dstates[it - 1].reshape(M, d) if kb == 0 and it > 0 else None)
    dweights, dmod = grads.rounded(weights, mod, x)
    return G.view(B, T, d), dweights, dmod


def backward_specs(dtype: torch.dtype, d: int, dh: int, has_mod: bool, divisible: bool = True,
                   fp32_precision: str = "tf32x3") -> list[KernelSpec]:
    """The backward's kernels at width d, head width dh, in `dtype` as a GPU runs them (16-bit operands, or fp32 at
    `fp32_precision`), pointers and widths 16-divisible as at the Sudoku shape (divisible False: nothing assumed, as a
    launch at odd sizes): recurse_dx_kernel's two launches (with the gelu' epilogue and without),
    recurse_dw_kernel, recurse_attention_bwd_kernel and recurse_norm_bwd_kernel after either LayerNorm (with adaLN
    or without: its HAS_MOD branch)."""
    ty = _triton.TRITON_DTYPE[dtype]
    p, f32 = f"*{ty}", "*fp32"
    dot = _dot.gpu_meta(dtype, fp32_precision)
    tags = {"dtype": str(dtype).removeprefix("torch."), "d": d,
            **_dot.precision_tags(dtype, fp32_precision)}
    ints = {n: "i32" for n in ("M", "N", "Kd")}
    specs = []
    for gelu in (True, False):
        sig = {"dy_ptr": p, "w_ptr": p, "z_ptr": p, "out_ptr": p, **ints}
        specs += tk._specs("recurse_dx_kernel", recurse_dx_kernel, sig, {"GELU_GRAD": gelu, **dot},
                           (product_config(dtype),), {**tags, "GELU_GRAD": gelu}, ("N", "Kd") if divisible else None)
    sig = {"dy_ptr": p, "x_ptr": p, "dw_ptr": f32, "db_ptr": f32, "R": "i32", "N": "i32", "Kd": "i32"}
    specs += tk._specs("recurse_dw_kernel", recurse_dw_kernel, sig, dot, (product_config(dtype),), tags,
                       ("N", "Kd") if divisible else None)
    sig = {"qkv_ptr": p, "ctx_ptr": p, "dctx_ptr": p, "lse_ptr": f32, "dqkv_ptr": p,
           **{n: "i32" for n in ("T", "D", "H", "DH")}, "scale": "fp32"}
    specs += tk._specs("recurse_attention_bwd_kernel", recurse_attention_bwd_kernel, sig,
                       {**dot, "BLOCK_DH": tk.block_dh(dh)}, (attention_config(dtype),), {**tags, "dh": dh},
                       ("D", "DH") if divisible else None)
    for shift in (0, 3):
        sig = {"du_ptr": p, "h_ptr": f32, "ln_w_ptr": p, "ln_b_ptr": p, "mod_ptr": p, "res_ptr": p, "dstate_ptr": p,
               "a_ptr": p, "y_ptr": p, "dh_ptr": p, "dy_ptr": p, "part_ptr": f32,
               **{n: "i32" for n in ("T", "D", "K", "kb", "kb_gate", "gate_part")}, "eps": "fp32", "add_state": "i32"}
        specs += tk._specs("recurse_norm_bwd_kernel", recurse_norm_bwd_kernel, sig,
                           {"SHIFT": shift, "HAS_MOD": has_mod}, (norm_config(d),),
                           {**tags, "SHIFT": shift, "HAS_MOD": has_mod}, ("D",) if divisible else None)
    return specs


def partials_specs(d: int) -> list[KernelSpec]:
    """recurse_partials_kernel after either LayerNorm (its code depends neither on the dtype nor on T) at width d."""
    sig = {"part_ptr": "*fp32", "dln_ptr": "*fp32", "dmod_ptr": "*fp32",
           **{n: "i32" for n in ("B", "NT", "D", "K", "kb")}}
    return [s for shift in (0, 3) for s in tk._specs("recurse_partials_kernel", recurse_partials_kernel, sig,
                                                     {"SHIFT": shift}, (PARTIALS,), {"d": d, "SHIFT": shift}, ("D",))]


# (dtype, d, head width, adaLN, divisible, fp32 precision) of the AOT specs: the Sudoku width d = 512 with 8 heads, bf16
# and fp32 with adaLN, fp16 without; fp32 (the most registers: tf32x3; and tf32) at an odd width (d = 40, 2 heads)
# assuming nothing.
BACKWARD_AOT = ((torch.bfloat16, 512, 64, True, True, "tf32x3"), (torch.float32, 512, 64, True, True, "tf32x3"),
                (torch.float16, 512, 64, False, True, "tf32x3"), (torch.float32, 40, 20, True, False, "tf32x3"),
                (torch.float32, 40, 20, True, False, "tf32"))


def aot_specs() -> list[KernelSpec]:
    """BACKWARD_AOT's specs and the partial sums' at the Sudoku width d = 512."""
    return [s for args in BACKWARD_AOT for s in backward_specs(*args)] + partials_specs(512)
