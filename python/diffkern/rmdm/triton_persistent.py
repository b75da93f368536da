"""Persistent Triton forward of R-MDM's shared-block recursion: every weight read once per call.

Weight-stationary and grid-synchronised, in one cooperative launch (diffkern._cooperative):
  * the grid is K x PB programs. Program (k, j) loads slice j of block k's weights once and holds it in
    registers for all n_iter iterations: rows j*RD ... j*RD + RD - 1 of W_q, W_k, W_v and W_o with their
    biases and b_2, rows j*RF ... of W_1 with b_1, and the same columns of W_2, and block k's LayerNorm
    vectors. The slices are disjoint and cover every weight, so the weights cross the memory bus once per
    call (the LayerNorm vectors once per program);
  * the activations of all N = B*T tokens live in fp32 scratch small enough to stay in L2: h [N, d],
    qkv [N, 3d], ctx [N, d], and the MLP's partial sums [PB, N, d];
  * a block evaluation is five stages, each ended by a grid barrier:
        q, k, v: each program its RD columns of each, of LN1(h) (+adaLN), which it normalises itself as it
        reads the rows  ->  attention, the (sample, head, 16-query tile) items spread over all K*PB
        programs  ->  W_o: RD columns of the gated residual  ->  the MLP over the program's RF hidden
        units, gelu(LN2(h) W_1[rf]^T + b_1) W_2[:, rf]^T, a partial sum over all d columns  ->  the PB
        partials added in program order (deterministic), b_2 and the gated residual on RD columns, and
        the state after the last block.
    A LayerNorm needs no stage of its own: every program of the block normalises the rows it multiplies
    (the PB programs each redo that small work) instead of one program writing them for all behind two
    more barriers.
The matmuls against register-held slices are broadcast products reduced over the input width, walked over
BT-row tiles sized to hold <= PRODUCT elements; they run in fp32 like every other kernel here.

Regime (`plan`, used by triton_kernels.recurse_fwd): persistent when N <= MAX_ROWS (every program walks
all N rows per stage, so large batches belong to the tiled kernels, which spread rows over programs),
d <= MAX_D, and some PB lets each program hold <= WEIGHT_BUDGET bytes of weights with K*PB <= one program
per SM (a cooperative launch must be co-resident) and the partial sums within PARTIALS_BUDGET. At the Sudoku shape (d=256, f=1024, K=2) in bf16/fp16
that is PB=32 (64 programs); in fp32 PB=64 (128 programs, which an H100 has and an A100 does not). At
d=512 the slices fit the budget only on 128 programs per block and ptxas then spills (16 warps too), so
d=512 runs tiled.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _cooperative, _triton
from .._cooperative import grid_exit, grid_sync
from .._triton import KernelSpec
from .reference import N_PARAMS
from .triton_common import (TL_DTYPE, add_gated, attend, gate, gelu, layer_norm, modulate, param_ptr, param_vec,
                            sample_mod_rows)

MAX_ROWS, MAX_D = 512, 256
PARTIALS_BUDGET = 16 << 20  # bytes of the MLP's partial sums [PB, N, d] fp32, to stay well inside L2
WEIGHT_BUDGET = 48 * 1024  # bytes of weights one program holds in registers
PRODUCT = 8192  # elements of one broadcast-product tile [BT, slice rows, input width]
LN_TILE = 2048  # elements of one row tile [BT_LN, BLOCK_D] of the h = x copy
BLOCK_T = 16


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def _held_bytes(d: int, f: int, pb: int, itemsize: int) -> int:
    rd, rf = _pow2(-(-d // pb)), _pow2(-(-f // pb))
    return (4 * rd * _pow2(d) + 2 * rf * _pow2(d)) * itemsize


def plan(n_rows: int, d: int, f: int, K: int, itemsize: int, max_programs: int) -> int | None:
    """Programs per block for the persistent regime, or None when the call belongs to the tiled kernels."""
    if n_rows > MAX_ROWS or d > MAX_D:
        return None
    pb = 1
    while _held_bytes(d, f, pb, itemsize) > WEIGHT_BUDGET and pb < d:
        pb *= 2
    ok = (_held_bytes(d, f, pb, itemsize) <= WEIGHT_BUDGET and K * pb <= max_programs
          and pb * n_rows * d * 4 <= PARTIALS_BUDGET)
    return pb if ok else None


def config(d: int, f: int, dh: int, pb: int) -> dict:
    """Constexprs and num_warps of a launch with pb programs per block."""
    rd, rf, block_d = _pow2(-(-d // pb)), _pow2(-(-f // pb)), _pow2(d)

    def rows(budget, width):  # the power of two in [1, 16] nearest below budget / width
        return max(1, min(16, 2 ** ((budget // width).bit_length() - 1) if budget >= width else 1))
    return dict(RD=rd, RF=rf, BLOCK_D=block_d, BLOCK_DH=max(16, _pow2(dh)), BLOCK_T=BLOCK_T,
                BT_D=rows(PRODUCT, rd * block_d), BT_F=rows(PRODUCT, rf * block_d),
                BT_LN=rows(LN_TILE, block_d), num_warps=8)


@triton.jit
def _load_rows(ptr, rows, rmask, ld, cols, cmask):
    return tl.load(ptr + rows[:, None].to(tl.int64) * ld + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                   other=0.0)


@triton.jit
def _times(a, w):
    """a [BT, C] (fp32) times w [R, C]^T -> [BT, R]: a broadcast product reduced over C."""
    return tl.sum(a[:, None, :] * w[None, :, :].to(tl.float32), 2)


@triton.jit
def _norm_rows(h_ptr, rows, rm, cols, cm, w, b, mod_ptr, kb, K, T, D, eps, SHIFT: tl.constexpr,
               HAS_MOD: tl.constexpr):
    """LN(h) w + b (then adaLN's modulation) of the fp32 state's rows `rows`: [BT, BLOCK_D] fp32."""
    u = layer_norm(_load_rows(h_ptr, rows, rm, D, cols, cm), w, b, cm, D, eps)
    if HAS_MOD:
        u = modulate(u, sample_mod_rows(mod_ptr, rows, kb, K, T, D), SHIFT, cols[None, :],
                     rm[:, None] & cm[None, :], D)
    return u


@triton.jit
def _add_gated(h_ptr, y, rows, rm, rd, rdm, mod_ptr, kb, K, T, D, state_ptr, WRITE_STATE, PART: tl.constexpr,
               HAS_MOD: tl.constexpr, DT: tl.constexpr):
    """add_gated on a row tile's RD columns, with each row's own sample's gate (y: [BT, RD] fp32)."""
    om = rm[:, None] & rdm[None, :]
    g = gate(sample_mod_rows(mod_ptr, rows, kb, K, T, D), PART, rd[None, :], om, D, HAS_MOD)
    add_gated(h_ptr, state_ptr, rows[:, None].to(tl.int64) * D + rd[None, :], om, g, y, WRITE_STATE, DT)


@triton.jit
def recurse_persistent_kernel(x_ptr, table, mod_ptr, states_ptr, h_ptr, qkv_ptr, ctx_ptr, part_ptr, sync_ptr,
                              N, T, D, F, K, n_iter, heads, DH, scale, eps, PB, DT: tl.constexpr,
                              HAS_MOD: tl.constexpr, ALIGNED: tl.constexpr, RD: tl.constexpr, RF: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_T: tl.constexpr,
                              BT_D: tl.constexpr, BT_F: tl.constexpr, BT_LN: tl.constexpr):
    p = tl.program_id(0)
    P = tl.num_programs(0)
    blk = p // PB
    j = p % PB
    cols = tl.arange(0, BLOCK_D)
    cm = cols < D
    rd = j * RD + tl.arange(0, RD)
    rdm = rd < D
    rf = j * RF + tl.arange(0, RF)
    rfm = rf < F
    # This program's slice of block blk's weights, read once and held for the whole call.
    w0 = blk * 12
    w_qkv = param_ptr(table, w0 + 2, DT, ALIGNED)
    wq = _load_rows(w_qkv, rd, rdm, D, cols, cm)
    wk = _load_rows(w_qkv, D + rd, rdm, D, cols, cm)
    wv = _load_rows(w_qkv, 2 * D + rd, rdm, D, cols, cm)
    bq = param_vec(table, w0 + 3, rd, rdm, DT, ALIGNED)
    bk = param_vec(table, w0 + 3, D + rd, rdm, DT, ALIGNED)
    bv = param_vec(table, w0 + 3, 2 * D + rd, rdm, DT, ALIGNED)
    wo = _load_rows(param_ptr(table, w0 + 4, DT, ALIGNED), rd, rdm, D, cols, cm)
    bo = param_vec(table, w0 + 5, rd, rdm, DT, ALIGNED)
    w1 = _load_rows(param_ptr(table, w0 + 8, DT, ALIGNED), rf, rfm, D, cols, cm)
    b1 = param_vec(table, w0 + 9, rf, rfm, DT, ALIGNED)
    w2 = _load_rows(param_ptr(table, w0 + 10, DT, ALIGNED), cols, cm, F, rf, rfm)  # columns rf of W_2: [BLOCK_D, RF]
    b2 = param_vec(table, w0 + 11, rd, rdm, DT, ALIGNED)
    ln1_w = param_vec(table, w0 + 0, cols, cm, DT, ALIGNED)
    ln1_b = param_vec(table, w0 + 1, cols, cm, DT, ALIGNED)
    ln2_w = param_vec(table, w0 + 6, cols, cm, DT, ALIGNED)
    ln2_b = param_vec(table, w0 + 7, cols, cm, DT, ALIGNED)

    for r0 in range(p * BT_LN, N, P * BT_LN):  # h = x, rows spread over all programs
        rows = r0 + tl.arange(0, BT_LN)
        m = (rows < N)[:, None] & cm[None, :]
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        tl.store(h_ptr + offs, tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32), mask=m)
    n_sync = grid_sync(sync_ptr, 0, P)
    n_qt = tl.cdiv(T, BLOCK_T)
    n_items = (N // T) * heads * n_qt
    for it in range(n_iter):
        state = states_ptr + (it * N).to(tl.int64) * D
        for kb in range(K):
            mine = blk == kb
            if mine:
                for r0 in range(0, N, BT_D):
                    rows = r0 + tl.arange(0, BT_D)
                    rm = rows < N
                    a = _norm_rows(h_ptr, rows, rm, cols, cm, ln1_w, ln1_b, mod_ptr, kb, K, T, D, eps, 0, HAS_MOD)
                    out = qkv_ptr + rows[:, None].to(tl.int64) * 3 * D + rd[None, :]
                    om = rm[:, None] & rdm[None, :]
                    tl.store(out, _times(a, wq) + bq[None, :], mask=om)
                    tl.store(out + D, _times(a, wk) + bk[None, :], mask=om)
                    tl.store(out + 2 * D, _times(a, wv) + bv[None, :], mask=om)
            n_sync = grid_sync(sync_ptr, n_sync, P)
            for item in range(p, n_items, P):
                b = (item // (n_qt * heads)).to(tl.int64)
                attend(qkv_ptr + b * T * 3 * D, ctx_ptr + b * T * D, (item % n_qt) * BLOCK_T, (item // n_qt) % heads,
                       T, D, DH, scale, True, "ieee", BLOCK_T, BLOCK_T, BLOCK_DH)
            n_sync = grid_sync(sync_ptr, n_sync, P)
            if mine:
                for r0 in range(0, N, BT_D):
                    rows = r0 + tl.arange(0, BT_D)
                    rm = rows < N
                    y = _times(_load_rows(ctx_ptr, rows, rm, D, cols, cm), wo) + bo[None, :]
                    _add_gated(h_ptr, y, rows, rm, rd, rdm, mod_ptr, kb, K, T, D, state, False, 2, HAS_MOD, DT)
            n_sync = grid_sync(sync_ptr, n_sync, P)
            if mine:  # the MLP split over f: gelu(u W_1[rf]^T + b_1[rf]) W_2[:, rf]^T, one partial sum per program
                part = part_ptr + (j * N).to(tl.int64) * D
                for r0 in range(0, N, BT_F):
                    rows = r0 + tl.arange(0, BT_F)
                    rm = rows < N
                    u = _norm_rows(h_ptr, rows, rm, cols, cm, ln2_w, ln2_b, mod_ptr, kb, K, T, D, eps, 3, HAS_MOD)
                    z = _times(u, w1) + b1[None, :]
                    tl.store(part + rows[:, None].to(tl.int64) * D + cols[None, :], _times(gelu(z), w2),
                             mask=rm[:, None] & cm[None, :])
            n_sync = grid_sync(sync_ptr, n_sync, P)
            if mine:  # the partial sums added in program order, b_2 and the gated residual on columns rd
                for r0 in range(0, N, BT_D):
                    rows = r0 + tl.arange(0, BT_D)
                    rm = rows < N
                    y = tl.zeros((BT_D, RD), tl.float32) + b2[None, :]
                    for q in range(PB):
                        y += _load_rows(part_ptr + (q * N).to(tl.int64) * D, rows, rm, D, rd, rdm)
                    _add_gated(h_ptr, y, rows, rm, rd, rdm, mod_ptr, kb, K, T, D, state, kb == K - 1, 5, HAS_MOD, DT)
            n_sync = grid_sync(sync_ptr, n_sync, P)
    grid_exit(sync_ptr, P)


def syncs_per_call(K: int, n_iter: int) -> int:
    """Grid barriers one call passes: one after h = x, five per block evaluation."""
    return 1 + 5 * K * n_iter


def recurse_persistent(x, weights, mod, n_iter, heads, eps, programs_per_block: int):
    """Launches recurse_persistent_kernel on K * programs_per_block programs. Returns states [n_iter, B, T, d]."""
    B, T, d = x.shape
    f, K, N = weights[8].shape[0], len(weights) // N_PARAMS, B * T
    cfg = config(d, f, d // heads, programs_per_block)
    num_warps = cfg.pop("num_warps")
    states = _triton.empty((n_iter, B, T, d), x.dtype, x.device)
    h, ctx = (_triton.empty((N, d), torch.float32, x.device) for _ in range(2))
    qkv = _triton.empty((N, 3 * d), torch.float32, x.device)
    part = _triton.empty((programs_per_block, N, d), torch.float32, x.device)
    table = _triton.tensor_table(weights, x.device)
    _cooperative.launch(recurse_persistent_kernel, (K * programs_per_block,), x, table,
                        mod if mod is not None else x, states, h, qkv, ctx, part, _cooperative.sync_buffer(x.device),
                        N, T, d, f, K, n_iter, heads, d // heads, (d // heads) ** -0.5, eps, programs_per_block,
                        DT=TL_DTYPE[x.dtype], HAS_MOD=mod is not None, ALIGNED=_triton.aligned(weights),
                        num_warps=num_warps,
                        maxnreg=_triton.register_budget(num_warps), **cfg)
    return states


# (d, heads, K, dtype, adaLN): the Sudoku shape in each storage dtype, and both ends of the persistent range.
AOT_SHAPES = ((256, 8, 2, torch.bfloat16, True), (256, 8, 2, torch.float16, False), (256, 8, 2, torch.float32, True),
              (128, 4, 4, torch.bfloat16, False), (256, 8, 4, torch.bfloat16, True))


def aot_specs() -> list[KernelSpec]:
    """AOT_SHAPES (f = 4d, 81 tokens) at the programs per block `plan` picks for them on an H100."""
    specs = []
    for d, heads, K, dtype, has_mod in AOT_SHAPES:
        ty = _triton.TRITON_DTYPE[dtype]
        pb = plan(81, d, 4 * d, K, dtype.itemsize, _triton.MODEL_SMS)
        cfg = config(d, 4 * d, d // heads, pb)
        num_warps = cfg.pop("num_warps")
        p = f"*{ty}"
        sig = {"x_ptr": p, "table": "*i64", "mod_ptr": p, "states_ptr": p, **{n: "*fp32" for n in (
            "h_ptr", "qkv_ptr", "ctx_ptr", "part_ptr")}, "sync_ptr": "*i32",
            **{n: "i32" for n in ("N", "T", "D", "F", "K", "n_iter", "heads", "DH")}, "scale": "fp32", "eps": "fp32",
            "PB": "i32"}
        constexprs = {"DT": TL_DTYPE[dtype], "HAS_MOD": has_mod, "ALIGNED": True, **cfg}
        sig.update({k: "constexpr" for k in constexprs})
        specs.append(KernelSpec(f"recurse_persistent_kernel[{ty},HAS_MOD={has_mod},d={d},K={K},PB={pb}]",
                                recurse_persistent_kernel, sig, constexprs, num_warps,
                                _triton.register_budget(num_warps), {"dtype": str(dtype).removeprefix("torch.")}))
    return specs
