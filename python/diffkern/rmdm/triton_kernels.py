"""Triton forward of R-MDM's shared-block recursion (specs/rmdm.md) and its launcher.

One launch per call: program b owns sample b for all n_iter * K block evaluations (the regime the
issue targets, T <= 256 and d <= 512: a sample's activations fit in L2 and its programs need no grid
sync). Per block the program walks its T tokens in tiles of BLOCK_T rows through four phases, with a
CTA barrier between them because each reads what others threads wrote:
  A  LN1 (+adaLN) and the QKV projection, written to a per-sample fp32 scratch qkv [T, 3d];
  B  softmax attention per head, flash-style over key tiles (online max/sum), into ctx [T, d];
  C  the output projection and the gated residual into the fp32 state h [T, d];
  D  LN2 (+adaLN), W_1 in BLOCK_F column chunks, exact gelu, W_2 accumulated in registers, gated
     residual; after the last block of an iteration the state is also written to states[it].
Weights are read from global memory by every token tile of every block evaluation (the interpreter's
count at T=81, d=64, K=2, L=4: 41 weight sets loaded per call, one launch); on a GPU they stay
L2-resident, but the issue's persistent regime (each weight read once per call, activations on chip)
is not reached yet. Biases, norms, gelu and residuals are fused and the state never leaves the
kernel between iterations. Matmuls run in fp32 (`input_precision="ieee"`; inputs are upcast after loading).
Traffic per call: x read, n_iter states written, the weights read K * n_iter times, plus scratch
(qkv, ctx, h: 5 d floats per token per block evaluation, L2-resident).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _triton
from .._triton import KernelSpec
from .reference import N_PARAMS

MAX_D, MAX_T = 512, 256
TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
# Tile sizes: tl.dot needs every dim >= 16. Every GEMM reduces over BLOCK_N-wide slices read from the
# fp32 scratch (an FMA dot over all of d = 256 needs 2 KB of registers per thread and spills). Phase D
# holds the [BLOCK_T, BLOCK_D] MLP output in registers and a [BLOCK_D, BLOCK_F] W_2 slice per step:
# BLOCK_F = 32 spills 116 bytes at d = 256 on sm_90a, 16 compiles to 228 registers with no spill
# (8 warps; 16 warps cap registers at 128 and spill more).
BLOCK_T, BLOCK_N, BLOCK_F = 16, 32, 16


def _config(d: int, dh: int) -> dict:
    block_d = max(16, triton.next_power_of_2(d))
    return dict(BLOCK_T=BLOCK_T, BLOCK_D=block_d, BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F,
                BLOCK_DH=max(16, triton.next_power_of_2(dh)), num_warps=4 if block_d <= 128 else 8)


@triton.jit
def _ptr(table, i, DT: tl.constexpr):
    return tl.load(table + i).to(tl.pointer_type(DT))


@triton.jit
def _norm(h, w_ptr, b_ptr, cols, cmask, D, eps, mod_ptr, SHIFT: tl.constexpr, HAS_MOD: tl.constexpr):
    """LN over the valid columns of an fp32 [BLOCK_T, BLOCK_D] tile, then (1 + scale) and shift."""
    mean = tl.sum(tl.where(cmask[None, :], h, 0.0), 1) / D
    xc = tl.where(cmask[None, :], h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    u = xc * rstd[:, None] * w[None, :] + b[None, :]
    if HAS_MOD:
        shift = tl.load(mod_ptr + SHIFT * D + cols, mask=cmask, other=0.0).to(tl.float32)
        scale = tl.load(mod_ptr + (SHIFT + 1) * D + cols, mask=cmask, other=0.0).to(tl.float32)
        u = u * (1.0 + scale[None, :]) + shift[None, :]
    return u


@triton.jit
def _linear(src, rows, rmask, ld, w_ptr, b_ptr, n, nmask, Kd, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """src[rows, :Kd] (fp32 scratch, row stride ld) times rows n of W [N, Kd] transposed, plus bias.

    The reduction walks Kd in BLOCK_K slices loaded from memory, so no thread holds a whole row of the
    operands (an fp32 FMA dot over the full d = 256 would need 2 KB of registers per thread)."""
    acc = tl.zeros((BLOCK_T, n.shape[0]), tl.float32)
    for k0 in range(0, Kd, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < Kd
        a = tl.load(src + rows[:, None] * ld + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * Kd + kk[None, :], mask=nmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.dot(a, tl.trans(w), input_precision="ieee")
    bias = tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    return acc + bias[None, :]


@triton.jit
def _gate(mod_ptr, PART: tl.constexpr, n, nmask, D, HAS_MOD: tl.constexpr):
    if HAS_MOD:
        return tl.load(mod_ptr + PART * D + n, mask=nmask, other=0.0).to(tl.float32)
    return (n * 0 + 1).to(tl.float32)


@triton.jit
def recurse_fwd_kernel(x_ptr, table, mod_ptr, states_ptr, h_ptr, u_ptr, qkv_ptr, ctx_ptr, T, D, F, K, n_iter, heads,
                       DH, scale, eps, DT: tl.constexpr, HAS_MOD: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DH: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    r0 = tl.arange(0, BLOCK_T)
    dcols = tl.arange(0, BLOCK_DH)
    dmask = dcols < DH
    h = h_ptr + b * T * D
    ub = u_ptr + b * T * D
    qkv = qkv_ptr + b * T * 3 * D
    ctx = ctx_ptr + b * T * D
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + r0
        m = (rows < T)[:, None] & cmask[None, :]
        offs = rows[:, None] * D + cols[None, :]
        tl.store(h + offs, tl.load(x_ptr + b * T * D + offs, mask=m, other=0.0).to(tl.float32), mask=m)
    tl.debug_barrier()
    for it in range(n_iter):
        for k in range(K):
            w0 = k * 12
            mod = mod_ptr + (b * K + k) * 6 * D
            for t0 in range(0, T, BLOCK_T):  # A: LN1 and QKV
                rows = t0 + r0
                rmask = rows < T
                m = rmask[:, None] & cmask[None, :]
                hh = tl.load(h + rows[:, None] * D + cols[None, :], mask=m, other=0.0)
                u = _norm(hh, _ptr(table, w0 + 0, DT), _ptr(table, w0 + 1, DT), cols, cmask, D, eps, mod, 0, HAS_MOD)
                tl.store(ub + rows[:, None] * D + cols[None, :], u, mask=m)
            tl.debug_barrier()
            for t0 in range(0, T, BLOCK_T):
                rows = t0 + r0
                rmask = rows < T
                for n0 in range(0, 3 * D, BLOCK_N):
                    n = n0 + tl.arange(0, BLOCK_N)
                    nmask = n < 3 * D
                    y = _linear(ub, rows, rmask, D, _ptr(table, w0 + 2, DT), _ptr(table, w0 + 3, DT), n, nmask, D,
                                BLOCK_T, BLOCK_N)
                    tl.store(qkv + rows[:, None] * 3 * D + n[None, :], y, mask=rmask[:, None] & nmask[None, :])
            tl.debug_barrier()
            for t0 in range(0, T, BLOCK_T):  # B: attention, online softmax over key tiles
                rows = t0 + r0
                rmask = rows < T
                for hd in range(heads):
                    qm = rmask[:, None] & dmask[None, :]
                    q = tl.load(qkv + rows[:, None] * 3 * D + hd * DH + dcols[None, :], mask=qm, other=0.0)
                    m_i = tl.full((BLOCK_T,), float("-inf"), tl.float32)
                    l_i = tl.zeros((BLOCK_T,), tl.float32)
                    acc = tl.zeros((BLOCK_T, BLOCK_DH), tl.float32)
                    for s0 in range(0, T, BLOCK_T):
                        keys = s0 + r0
                        km = (keys < T)[:, None] & dmask[None, :]
                        kk = tl.load(qkv + keys[:, None] * 3 * D + D + hd * DH + dcols[None, :], mask=km, other=0.0)
                        vv = tl.load(qkv + keys[:, None] * 3 * D + 2 * D + hd * DH + dcols[None, :], mask=km,
                                     other=0.0)
                        s = tl.dot(q, tl.trans(kk), input_precision="ieee") * scale
                        s = tl.where((keys < T)[None, :], s, float("-inf"))
                        m_new = tl.maximum(m_i, tl.max(s, 1))
                        p = tl.exp(s - m_new[:, None])
                        alpha = tl.exp(m_i - m_new)
                        l_i = l_i * alpha + tl.sum(p, 1)
                        acc = acc * alpha[:, None] + tl.dot(p, vv, input_precision="ieee")
                        m_i = m_new
                    tl.store(ctx + rows[:, None] * D + hd * DH + dcols[None, :], acc / l_i[:, None], mask=qm)
            tl.debug_barrier()
            for t0 in range(0, T, BLOCK_T):  # C: output projection and gated residual
                rows = t0 + r0
                rmask = rows < T
                for n0 in range(0, D, BLOCK_N):
                    n = n0 + tl.arange(0, BLOCK_N)
                    nmask = n < D
                    a = _linear(ctx, rows, rmask, D, _ptr(table, w0 + 4, DT), _ptr(table, w0 + 5, DT), n, nmask, D,
                                BLOCK_T, BLOCK_N)
                    om = rmask[:, None] & nmask[None, :]
                    offs = rows[:, None] * D + n[None, :]
                    old = tl.load(h + offs, mask=om, other=0.0)
                    tl.store(h + offs, old + _gate(mod, 2, n, nmask, D, HAS_MOD)[None, :] * a, mask=om)
            tl.debug_barrier()
            for t0 in range(0, T, BLOCK_T):  # D: LN2, MLP, gated residual
                rows = t0 + r0
                rmask = rows < T
                m = rmask[:, None] & cmask[None, :]
                offs = rows[:, None] * D + cols[None, :]
                hh = tl.load(h + offs, mask=m, other=0.0)
                u = _norm(hh, _ptr(table, w0 + 6, DT), _ptr(table, w0 + 7, DT), cols, cmask, D, eps, mod, 3, HAS_MOD)
                tl.store(ub + offs, u, mask=m)
            tl.debug_barrier()
            for t0 in range(0, T, BLOCK_T):
                rows = t0 + r0
                rmask = rows < T
                m = rmask[:, None] & cmask[None, :]
                offs = rows[:, None] * D + cols[None, :]
                w2 = _ptr(table, w0 + 10, DT)
                y = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
                for f0 in range(0, F, BLOCK_F):
                    fc = f0 + tl.arange(0, BLOCK_F)
                    fmask = fc < F
                    z = _linear(ub, rows, rmask, D, _ptr(table, w0 + 8, DT), _ptr(table, w0 + 9, DT), fc, fmask, D,
                                BLOCK_T, BLOCK_N)
                    g = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
                    w2c = tl.load(w2 + cols[:, None].to(tl.int64) * F + fc[None, :],
                                  mask=cmask[:, None] & fmask[None, :], other=0.0).to(tl.float32)
                    y += tl.dot(g, tl.trans(w2c), input_precision="ieee")
                b2 = tl.load(_ptr(table, w0 + 11, DT) + cols, mask=cmask, other=0.0).to(tl.float32)
                gate = _gate(mod, 5, cols, cmask, D, HAS_MOD)
                hh = tl.load(h + offs, mask=m, other=0.0) + gate[None, :] * (y + b2[None, :])
                tl.store(h + offs, hh, mask=m)
                if k == K - 1:
                    tl.store(states_ptr + (it * tl.num_programs(0) + b) * T * D + offs, hh.to(DT), mask=m)
            tl.debug_barrier()


def recurse_fwd(x, weights, mod, n_iter, heads, eps):
    """Launches recurse_fwd_kernel: one program per sample, every iteration inside. Returns states."""
    B, T, d = x.shape
    if d > MAX_D or T > MAX_T:
        raise ValueError(f"recurse: the triton backend runs T <= {MAX_T} and d <= {MAX_D} (one program per sample), "
                         f"got T={T}, d={d}")
    _triton.check_float32_math("recurse", x.dtype, "x")
    cfg = _config(d, d // heads)
    num_warps = cfg.pop("num_warps")
    states = _triton.empty((n_iter, B, T, d), x.dtype, x.device)
    h = _triton.empty((B, T, d), torch.float32, x.device)
    u = _triton.empty((B, T, d), torch.float32, x.device)
    qkv = _triton.empty((B, T, 3 * d), torch.float32, x.device)
    ctx = _triton.empty((B, T, d), torch.float32, x.device)
    table = _triton.tensor_table(weights, x.device)
    mod_arg = mod if mod is not None else x
    recurse_fwd_kernel[(B,)](x, table, mod_arg, states, h, u, qkv, ctx, T, d, weights[8].shape[0],
                             len(weights) // N_PARAMS, n_iter, heads, d // heads, (d // heads) ** -0.5, eps,
                             DT=TL_DTYPE[x.dtype], HAS_MOD=mod is not None, num_warps=num_warps, **cfg)
    return states


def aot_specs() -> list[KernelSpec]:
    """The Sudoku width d = 256 (8 heads of 32) in each storage dtype, with and without adaLN."""
    specs = []
    for dtype, has_mod in ((torch.bfloat16, True), (torch.float16, False), (torch.float32, True)):
        ty = _triton.TRITON_DTYPE[dtype]
        cfg = _config(256, 32)
        num_warps = cfg.pop("num_warps")
        p = f"*{ty}"
        sig = {"x_ptr": p, "table": "*i64", "mod_ptr": p, "states_ptr": p, "h_ptr": "*fp32", "u_ptr": "*fp32",
               "qkv_ptr": "*fp32", "ctx_ptr": "*fp32", "T": "i32", "D": "i32", "F": "i32", "K": "i32", "n_iter": "i32",
               "heads": "i32", "DH": "i32", "scale": "fp32", "eps": "fp32"}
        constexprs = {"DT": TL_DTYPE[dtype], "HAS_MOD": has_mod, **cfg}
        sig.update({k: "constexpr" for k in constexprs})
        specs.append(KernelSpec(f"recurse_fwd_kernel[{ty},HAS_MOD={has_mod},d=256]", recurse_fwd_kernel, sig,
                                constexprs, num_warps, _triton.register_budget(num_warps),
                                {"dtype": str(dtype).removeprefix("torch.")}))
    return specs
