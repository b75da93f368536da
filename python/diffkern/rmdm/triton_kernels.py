"""Triton forward of R-MDM's shared-block recursion (specs/rmdm.md): the tiled kernel and the backend's launcher.

Two kernels, both one launch per call with every iteration inside; `recurse_fwd` picks one per call:
  * persistent (triton_persistent.py): weight-stationary over K x PB programs with grid barriers; each
    weight is read once per call. Chosen where `triton_persistent.plan` allows: B*T <= 512 tokens, d <= 256,
    and the weight slices fit the programs one cooperative launch can keep resident.
  * tiled (here): program b owns sample b for all n_iter * K block evaluations and walks its T tokens
    in tiles of BLOCK_T rows through four phases, with a CTA barrier between them because each reads
    what other threads wrote:
      A  LN1 (+adaLN) and the QKV projection, written to a per-sample fp32 scratch qkv [T, 3d];
      B  softmax attention per head, flash-style over key tiles (online max/sum), into ctx [T, d];
      C  the output projection and the gated residual into the fp32 state h [T, d];
      D  LN2 (+adaLN), W_1 and exact gelu into a per-sample fp32 scratch g [T, f], then W_2 and the
         gated residual; after the last block of an iteration the state is also written to states[it].
    Every token tile of every block evaluation reads the weights (from L2 on a GPU): at T=81, 16-token
    tiles, that is 6 weight sets per block evaluation per sample, 48 per Sudoku step (K=2, L=4) at B=1.
    It serves large batches (many samples in flight hide the weight reads) and d up to 512.
Biases, norms, gelu and residuals are fused and the state never leaves the kernel between iterations.
Matmuls run in fp32 (`input_precision="ieee"`; inputs are upcast after loading).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _cooperative, _triton
from .._triton import KernelSpec
from . import triton_persistent
from .reference import N_PARAMS
from .triton_common import TL_DTYPE, add_gated, attend, gate, gelu, layer_norm, modulate, param_ptr, param_vec

MAX_D, MAX_T = 512, 256
# Tile sizes: tl.dot needs every dim >= 16. Every GEMM reduces over BLOCK_N-wide slices read from the
# fp32 scratch (an FMA dot over all of d = 256 needs 2 KB of registers per thread and spills) into a
# [BLOCK_T, BLOCK_N] output chunk, so no phase holds a full [BLOCK_T, d] accumulator (which spilled at d = 512).
BLOCK_T, BLOCK_N = 16, 32


def _config(d: int, dh: int) -> dict:
    block_d = max(16, triton.next_power_of_2(d))
    return dict(BLOCK_T=BLOCK_T, BLOCK_D=block_d, BLOCK_N=BLOCK_N,
                BLOCK_DH=max(16, triton.next_power_of_2(dh)), num_warps=4 if block_d <= 128 else 8)


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
def _norm(h, table, i, cols, cmask, D, eps, mod, SHIFT: tl.constexpr, HAS_MOD: tl.constexpr, DT: tl.constexpr,
          ALIGNED: tl.constexpr):
    """LN with weight/bias tensors i, i + 1 of the table, then adaLN's modulation when there is one."""
    u = layer_norm(h, param_vec(table, i, cols, cmask, DT, ALIGNED), param_vec(table, i + 1, cols, cmask, DT, ALIGNED),
                   cmask, D, eps)
    if HAS_MOD:
        u = modulate(u, mod, SHIFT, cols, cmask, D)
    return u


@triton.jit
def _project_residual(h, src, ld, table, i, mod, PART: tl.constexpr, T, D, state, WRITE_STATE,
                      HAS_MOD: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """h += gate * (src W^T + b) for the sample's T rows (src: fp32 [T, ld]; W, b: table tensors i, i + 1),
    in BLOCK_N-column chunks; also writes the new h to state when WRITE_STATE."""
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        rmask = rows < T
        for n0 in range(0, D, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < D
            a = _linear(src, rows, rmask, ld, param_ptr(table, i, DT, ALIGNED), param_ptr(table, i + 1, DT, ALIGNED), n,
                        nmask, ld, BLOCK_T, BLOCK_N)
            add_gated(h, state, rows[:, None] * D + n[None, :], rmask[:, None] & nmask[None, :],
                      gate(mod, PART, n, nmask, D, HAS_MOD)[None, :], a, WRITE_STATE, DT)


@triton.jit
def recurse_tiled_kernel(x_ptr, table, mod_ptr, states_ptr, h_ptr, u_ptr, qkv_ptr, ctx_ptr, g_ptr, T, D, F, K, n_iter,
                         heads, DH, scale, eps, DT: tl.constexpr, HAS_MOD: tl.constexpr, ALIGNED: tl.constexpr,
                         BLOCK_T: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    r0 = tl.arange(0, BLOCK_T)
    h = h_ptr + b * T * D
    ub = u_ptr + b * T * D
    qkv = qkv_ptr + b * T * 3 * D
    ctx = ctx_ptr + b * T * D
    g = g_ptr + b * T * F
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
            state = states_ptr + (it * tl.num_programs(0) + b) * T * D
            for t0 in range(0, T, BLOCK_T):  # A: LN1 and QKV
                rows = t0 + r0
                m = (rows < T)[:, None] & cmask[None, :]
                hh = tl.load(h + rows[:, None] * D + cols[None, :], mask=m, other=0.0)
                u = _norm(hh, table, w0 + 0, cols, cmask, D, eps, mod, 0, HAS_MOD, DT, ALIGNED)
                tl.store(ub + rows[:, None] * D + cols[None, :], u, mask=m)
            tl.debug_barrier()
            for t0 in range(0, T, BLOCK_T):
                rows = t0 + r0
                rmask = rows < T
                for n0 in range(0, 3 * D, BLOCK_N):
                    n = n0 + tl.arange(0, BLOCK_N)
                    nmask = n < 3 * D
                    y = _linear(ub, rows, rmask, D, param_ptr(table, w0 + 2, DT, ALIGNED),
                                param_ptr(table, w0 + 3, DT, ALIGNED), n, nmask, D, BLOCK_T, BLOCK_N)
                    tl.store(qkv + rows[:, None] * 3 * D + n[None, :], y, mask=rmask[:, None] & nmask[None, :])
            tl.debug_barrier()
            for t0 in range(0, T, BLOCK_T):  # B: attention, online softmax over key tiles
                for hd in range(heads):
                    attend(qkv, ctx, t0, hd, T, D, DH, scale, BLOCK_T, BLOCK_DH)
            tl.debug_barrier()
            _project_residual(h, ctx, D, table, w0 + 4, mod, 2, T, D, state, False, HAS_MOD, DT, ALIGNED, BLOCK_T,
                              BLOCK_N)
            tl.debug_barrier()
            for t0 in range(0, T, BLOCK_T):  # D: LN2, W_1 and gelu into g, then W_2 and the gated residual
                rows = t0 + r0
                m = (rows < T)[:, None] & cmask[None, :]
                offs = rows[:, None] * D + cols[None, :]
                hh = tl.load(h + offs, mask=m, other=0.0)
                u = _norm(hh, table, w0 + 6, cols, cmask, D, eps, mod, 3, HAS_MOD, DT, ALIGNED)
                tl.store(ub + offs, u, mask=m)
            tl.debug_barrier()
            for t0 in range(0, T, BLOCK_T):
                rows = t0 + r0
                rmask = rows < T
                for n0 in range(0, F, BLOCK_N):
                    n = n0 + tl.arange(0, BLOCK_N)
                    nmask = n < F
                    z = _linear(ub, rows, rmask, D, param_ptr(table, w0 + 8, DT, ALIGNED),
                                param_ptr(table, w0 + 9, DT, ALIGNED), n, nmask, D, BLOCK_T, BLOCK_N)
                    tl.store(g + rows[:, None] * F + n[None, :], gelu(z), mask=rmask[:, None] & nmask[None, :])
            tl.debug_barrier()
            _project_residual(h, g, F, table, w0 + 10, mod, 5, T, D, state, k == K - 1, HAS_MOD, DT, ALIGNED, BLOCK_T,
                              BLOCK_N)
            tl.debug_barrier()


def recurse_fwd(x, weights, mod, n_iter, heads, eps):
    """The triton backend of diffkern::rmdm_recurse: the persistent kernel where its plan allows and the device
    accepts its cooperative launch, else the tiled one (the same states)."""
    B, T, d = x.shape
    if d > MAX_D or T > MAX_T:
        raise ValueError(f"recurse: the triton backend runs T <= {MAX_T} and d <= {MAX_D}, got T={T}, d={d}")
    _triton.check_float32_math("recurse", x.dtype, "x")
    pb = triton_persistent.plan(B * T, d, weights[8].shape[0], len(weights) // N_PARAMS, x.element_size(),
                                _cooperative.max_programs(x.device))
    if pb is not None:
        try:
            return triton_persistent.recurse_persistent(x, weights, mod, n_iter, heads, eps, pb)
        except _cooperative.LaunchRefused as refused:  # the grid cannot be co-resident here after all
            _cooperative.fall_back(refused, "the tiled kernel")
    return recurse_tiled(x, weights, mod, n_iter, heads, eps)


def recurse_tiled(x, weights, mod, n_iter, heads, eps):
    """Launches recurse_tiled_kernel: one program per sample, every iteration inside. Returns states."""
    B, T, d = x.shape
    cfg = _config(d, d // heads)
    num_warps = cfg.pop("num_warps")
    states = _triton.empty((n_iter, B, T, d), x.dtype, x.device)
    h = _triton.empty((B, T, d), torch.float32, x.device)
    u = _triton.empty((B, T, d), torch.float32, x.device)
    qkv = _triton.empty((B, T, 3 * d), torch.float32, x.device)
    ctx = _triton.empty((B, T, d), torch.float32, x.device)
    g = _triton.empty((B, T, weights[8].shape[0]), torch.float32, x.device)
    table = _triton.tensor_table(weights, x.device)
    mod_arg = mod if mod is not None else x
    recurse_tiled_kernel[(B,)](x, table, mod_arg, states, h, u, qkv, ctx, g, T, d, weights[8].shape[0],
                               len(weights) // N_PARAMS, n_iter, heads, d // heads, (d // heads) ** -0.5, eps,
                               DT=TL_DTYPE[x.dtype], HAS_MOD=mod is not None, ALIGNED=_triton.aligned(weights),
                               num_warps=num_warps,
                               maxnreg=_triton.register_budget(num_warps), **cfg)
    return states


def aot_specs() -> list[KernelSpec]:
    """The tiled kernel at the Sudoku width d = 256 (8 heads of 32) in each storage dtype, with and without
    adaLN, and at d = 512; then the persistent kernel's configurations."""
    specs = []
    for d, dtype, has_mod in ((256, torch.bfloat16, True), (256, torch.float16, False), (256, torch.float32, True),
                              (512, torch.bfloat16, True)):
        ty = _triton.TRITON_DTYPE[dtype]
        cfg = _config(d, d // 8)
        num_warps = cfg.pop("num_warps")
        p = f"*{ty}"
        sig = {"x_ptr": p, "table": "*i64", "mod_ptr": p, "states_ptr": p, "h_ptr": "*fp32", "u_ptr": "*fp32",
               "qkv_ptr": "*fp32", "ctx_ptr": "*fp32", "g_ptr": "*fp32", "T": "i32", "D": "i32", "F": "i32", "K": "i32", "n_iter": "i32",
               "heads": "i32", "DH": "i32", "scale": "fp32", "eps": "fp32"}
        constexprs = {"DT": TL_DTYPE[dtype], "HAS_MOD": has_mod, "ALIGNED": True, **cfg}
        sig.update({k: "constexpr" for k in constexprs})
        specs.append(KernelSpec(f"recurse_tiled_kernel[{ty},HAS_MOD={has_mod},d={d}]", recurse_tiled_kernel, sig,
                                constexprs, num_warps, _triton.register_budget(num_warps),
                                {"dtype": str(dtype).removeprefix("torch.")}))
    return specs + triton_persistent.aot_specs()
