"""Triton kernels for DAR routing and chunked gathering (specs/dar.md) and their launchers.

Layout: one program owns BLOCK_T consecutive tokens of one batch row and the whole feature dim
(BLOCK_D = next power of two >= d), so the per-token reductions over d stay in registers and each
source is read from memory exactly once:
  forward   reads n sources + q + gain, writes h and lse (4 bytes/token): online softmax over sources;
  backward  reads n sources + dh + h + q + gain + lse, writes n dsources + dq, plus one fp32 [d] partial
            per program for the reductions over tokens (dq of a static/timestep q, dgain), summed on the host.
The sources are reached through a table of (data pointer, batch stride, token stride), so a list of
any length and layout is read in place. A pointer or stride read from memory carries no alignment facts, so
the kernels' ALIGNED variant, launched when the host has checked every table tensor (_triton.aligned: 16-byte
aligned, strides whole multiples of 16 bytes), states them with tl.multiple_of and loads (and stores) 16
bytes at a time; the other variant serves misaligned views.
Near the float32 maximum a token's sum of squares (or <q*g, v>, <dh, v>, the weighted sum) overflows
although every input is finite. A tile holding such a token (any sum or output not finite) routes its
tokens again with every row scaled by OVERFLOW_RESCALE * sigma and eps by its square (dar_math.h; sigma
brings the largest source's rms to 1): the scores, weights and dv are unchanged by that scaling and h, u
come back divided by it; only those tokens' outputs are rewritten. A tile without one pays a per-token
finiteness check only.
Chunked gathering (dar_gather) runs the same kernels: the forward also reads k addends, writes their
sum c once (fp32 sum, rounded to the sources' dtype) and routes over the stored c after the sources;
the backward adds c's incoming gradient to the last source's (one more read).
Autotuning (diffkern._autotune) keeps every output bit. The forward reduces over d only, per token, so its
candidates (route_candidates) change BLOCK_T, the tokens of a tile, at the warps of route_config: Triton lays the
d axis out the same way whatever the number of rows, so every sum over d adds in the same order (checked on the
compiled code by tests/test_autotune_candidates.py; more or fewer warps moves some widths' d axis to another
layout). The backward also sums its tile's tokens (the dq/dgain partials), so BLOCK_T is a reduced dimension
there, and more or fewer warps change the layout of the token or the d axis: it keeps the one configuration.
"""
from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from .. import _autotune, _dtypes, _triton
from .._autotune import Config, bucket, candidate_specs
from .._triton import KernelSpec

MAX_D = 4096
# csrc/include/diffkern/dar_math.h kOverflowRescale: a tile holding a token whose float32 sums overflow
# routes again with every row scaled by it (2^-80, exact) and eps by its square.
OVERFLOW_RESCALE = tl.constexpr(2.0**-80)
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)
# Live fp32 tiles are [BLOCK_T, BLOCK_D]. The forward keeps ~3 (acc, q*g, v): 4096-element tiles at
# 16 elements per thread. The backward keeps ~7 (dh, q, q*g, u, v, dv, a product): 1024-element tiles
# at 8 per thread. Chosen by compiling every configuration for sm_80/sm_90a (ptxas -v) with the full
# register budget (_triton.register_budget): larger backward tiles or 16 per thread spill at small d;
# a row wider than MAX_D spills at the 16-warp limit.
TILE_ELEMS = {False: 4096, True: 1024}  # keyed by `backward`
ELEMS_PER_THREAD = {False: 16, True: 8}
MAX_BLOCK_T = 16


def route_config(d: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) of the forward or backward kernel for feature dim d."""
    block_d = max(16, triton.next_power_of_2(d))
    block_t = max(1, min(MAX_BLOCK_T, TILE_ELEMS[backward] // block_d))
    num_warps = max(1, min(16, block_t * block_d // (32 * ELEMS_PER_THREAD[backward])))
    return block_t, block_d, num_warps


def route_candidates(d: int) -> tuple[Config, ...]:
    """The forward's autotune candidates for feature dim d: route_config's BLOCK_T and warps, then, up to
    MAX_BLOCK_T, twice the tokens per tile at the same warps (BLOCK_D, fixed by d, is passed beside them).
    Not beyond MAX_BLOCK_T: 32 tokens spill at d = 64..256 in fp32. Not half: a tile smaller than the warps'
    threads spreads d over fewer elements per thread (bf16 at d = 16), another order of its sums."""
    block_t, _, num_warps = route_config(d, backward=False)
    return tuple(Config({"BLOCK_T": t}, num_warps) for t in (block_t, 2 * block_t) if t <= MAX_BLOCK_T)


@triton.jit
def _table_ptr(table, i, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    """Row i's data pointer in a (pointer, batch stride, token stride) table, 16-byte aligned when ALIGNED."""
    base = tl.load(table + 3 * i).to(tl.pointer_type(dtype))
    if ALIGNED:
        base = tl.multiple_of(base, 16)
    return base


@triton.jit
def _load_source(table, i, b, t, dd, mask, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    """Source i of the (pointer, batch stride, token stride) table as an fp32 [BLOCK_T, BLOCK_D] tile."""
    base = _table_ptr(table, i, dtype, ALIGNED)
    stride_b = tl.load(table + 3 * i + 1)
    stride_t = tl.load(table + 3 * i + 2)
    if ALIGNED:  # whole multiples of 16 bytes
        stride_b = tl.multiple_of(stride_b, 128 // dtype.primitive_bitwidth)
        stride_t = tl.multiple_of(stride_t, 128 // dtype.primitive_bitwidth)
    offs = b * stride_b + t[:, None] * stride_t + dd[None, :]
    return tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _score(v, qg, inv_d, inv_sqrt_d, eps):
    """(s, rstd, p, probe) per token: rstd = (mean(v^2) + eps)^-1/2, p = <q*g, v>, s = rstd p / sqrt(d);
    probe is 0 when both sums are finite, NaN otherwise."""
    ss = tl.sum(v * v, 1)
    rstd = tl.rsqrt(ss * inv_d + eps)
    p = tl.sum(qg * v, 1)
    return rstd * p * inv_sqrt_d, rstd, p, (ss + p) * 0.0


@triton.jit
def _fold(v, qg, m, l, acc, probe, inv_d, inv_sqrt_d, eps):
    """One online-softmax step: folds source tile v into the running max m, sum l and weighted sum acc."""
    s, rstd, p, bad = _score(v, qg, inv_d, inv_sqrt_d, eps)
    m_new = tl.maximum(m, s)
    scale = tl.exp(m - m_new)
    w = tl.exp(s - m_new)
    return m_new, l * scale + w, acc * scale[:, None] + w[:, None] * v, probe + bad


@triton.jit
def _overflow_scale(src_table, n_src, c_ptr, n_add, b, t, dd, mask, row, inv_d, dtype: tl.constexpr,
                    BLOCK_T: tl.constexpr, ALIGNED: tl.constexpr):
    """sigma [BLOCK_T] of the overflow fallback: 1 / sqrt(m), m the largest mean((v * OVERFLOW_RESCALE)^2)
    over each token's sources and stored summary c (when n_add > 0) (dar_math.h overflow_rms_scale); 1
    where m is 0, inf or NaN."""
    m = tl.zeros([BLOCK_T], tl.float32)
    for i in range(n_src):
        v = _load_source(src_table, i, b, t, dd, mask, dtype, ALIGNED) * OVERFLOW_RESCALE
        m = tl.maximum(m, tl.sum(v * v, 1) * inv_d)
    if n_add > 0:
        v = tl.load(c_ptr + row, mask=mask, other=0.0).to(tl.float32) * OVERFLOW_RESCALE
        m = tl.maximum(m, tl.sum(v * v, 1) * inv_d)
    return tl.where((m > 0) & (m <= FLOAT32_MAX), 1.0 / tl.sqrt(m), 1.0)


@triton.jit
def _route_tile(src_table, n_src, c_ptr, n_add, b, t, dd, mask, row, qg, sigma, inv_d, inv_sqrt_d, eps,
                dtype: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr):
    """Routes the tile's rows scaled by OVERFLOW_RESCALE * sigma (the stored summary c after the sources,
    when n_add > 0): (h, lse, probe), probe 0 where every sum is finite."""
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    probe = tl.zeros([BLOCK_T], tl.float32)
    eps_s = eps * (OVERFLOW_RESCALE * sigma) * (OVERFLOW_RESCALE * sigma)
    for i in range(n_src):
        v = _load_source(src_table, i, b, t, dd, mask, dtype, ALIGNED) * OVERFLOW_RESCALE * sigma[:, None]
        m, l, acc, probe = _fold(v, qg, m, l, acc, probe, inv_d, inv_sqrt_d, eps_s)
    if n_add > 0:
        v = tl.load(c_ptr + row, mask=mask, other=0.0).to(tl.float32) * OVERFLOW_RESCALE * sigma[:, None]
        m, l, acc, probe = _fold(v, qg, m, l, acc, probe, inv_d, inv_sqrt_d, eps_s)
    return acc / (l * sigma)[:, None] * (1.0 / OVERFLOW_RESCALE), m + tl.log(l), probe


@triton.jit
def _tile(b, tile, T, d, stride_qb, stride_qt, dd, BLOCK_T: tl.constexpr):
    """Token indices of one tile of batch row b, with 64-bit offsets into h/dh-shaped tensors and into q."""
    t = tile * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    t_ok = t < T
    mask = t_ok[:, None] & (dd < d)[None, :]
    row = (b * T + t)[:, None] * d + dd[None, :]
    q_offs = b * stride_qb + t[:, None] * stride_qt + dd[None, :]
    return t, t_ok, mask, row, q_offs


@triton.jit
def _query_row(q_ptr, b, stride_qb, dd, d):
    """A static or per-batch q as one fp32 [1, BLOCK_D] row, read once per program and broadcast."""
    return tl.load(q_ptr + b * stride_qb + dd, mask=dd < d, other=0.0).to(tl.float32)[None, :]


@triton.jit
def route_fwd_kernel(src_table, add_table, q_ptr, gain_ptr, h_ptr, lse_ptr, c_ptr, n_src, n_add, T, d, n_tiles,
                     stride_qb, stride_qt, inv_d, inv_sqrt_d, eps,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, DYNAMIC_Q: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_tiles).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    t, t_ok, mask, row, q_offs = _tile(b, pid % n_tiles, T, d, stride_qb, stride_qt, dd, BLOCK_T)
    g = tl.load(gain_ptr + dd, mask=dd < d, other=0.0).to(tl.float32)
    if DYNAMIC_Q:
        q = tl.load(q_ptr + q_offs, mask=mask, other=0.0).to(tl.float32)
    else:
        q = _query_row(q_ptr, b, stride_qb, dd, d)
    qg = q * g[None, :]
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    probe = tl.zeros([BLOCK_T], tl.float32)
    for i in range(n_src):
        v = _load_source(src_table, i, b, t, dd, mask, h_ptr.dtype.element_ty, ALIGNED)
        m, l, acc, probe = _fold(v, qg, m, l, acc, probe, inv_d, inv_sqrt_d, eps)
    if n_add > 0:
        c = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        for k in range(n_add):
            c += _load_source(add_table, k, b, t, dd, mask, h_ptr.dtype.element_ty, ALIGNED)
        c = c.to(h_ptr.dtype.element_ty)
        tl.store(c_ptr + row, c, mask=mask)
        m, l, acc, probe = _fold(c.to(tl.float32), qg, m, l, acc, probe, inv_d, inv_sqrt_d, eps)
    h = acc / l[:, None]
    lse = m + tl.log(l)
    tl.store(h_ptr + row, h.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + b * T + t, lse, mask=t_ok)
    redo = t_ok & ((probe + lse * 0.0 + tl.sum(h * 0.0, 1)) != 0.0)
    if tl.max(redo.to(tl.int32), 0) > 0:
        tl.debug_barrier()  # the stored summary c is read back; the rewrites land after the first stores
        sigma = _overflow_scale(src_table, n_src, c_ptr, n_add, b, t, dd, mask, row, inv_d, h_ptr.dtype.element_ty,
                                BLOCK_T, ALIGNED)
        h, lse, _ = _route_tile(src_table, n_src, c_ptr, n_add, b, t, dd, mask, row, qg, sigma, inv_d, inv_sqrt_d,
                                eps, h_ptr.dtype.element_ty, BLOCK_T, BLOCK_D, ALIGNED)
        tl.store(h_ptr + row, h.to(h_ptr.dtype.element_ty), mask=mask & redo[:, None])
        tl.store(lse_ptr + b * T + t, lse, mask=redo)


@triton.jit
def _bwd_tile(src_table, dsrc_table, n_src, h_ptr, dlast_ptr, b, t, dd, mask, row, qg, dh, lse, pre, sigma, inv_d,
              inv_sqrt_d, eps, out_mask, HAS_DLAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
              ALIGNED: tl.constexpr):
    """The tile's gradients with every row scaled by pre * sigma (eps by its square; dv does not change): stores
    each source's dv where out_mask; returns (u = sum_i c_i v_i, probe), probe 0 where every sum, dv and u
    is finite."""
    dtype = h_ptr.dtype.element_ty
    # sum_j alpha_j <dh, v_j> = <dh, h>: reading h once spares a second pass over every source
    delta = tl.sum(dh * (tl.load(h_ptr + row, mask=mask, other=0.0).to(tl.float32) * pre * sigma[:, None]), 1)
    eps_s = eps * (pre * sigma) * (pre * sigma)
    probe = delta * 0.0
    u = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for i in range(n_src):
        v = _load_source(src_table, i, b, t, dd, mask, dtype, ALIGNED) * pre * sigma[:, None]
        s, rstd, p, bad = _score(v, qg, inv_d, inv_sqrt_d, eps_s)
        alpha = tl.exp(s - lse)
        da = tl.sum(dh * v, 1)
        ds = alpha * (da - delta)
        c = ds * rstd * inv_sqrt_d
        dv = alpha[:, None] * dh + c[:, None] * qg - (c * rstd * rstd * p * inv_d)[:, None] * v
        probe += bad + da * 0.0 + tl.sum(dv * 0.0, 1)
        if HAS_DLAST:
            if i == n_src - 1:
                dv += tl.load(dlast_ptr + row, mask=mask, other=0.0).to(tl.float32)
        tl.store(_table_ptr(dsrc_table, i, dtype, ALIGNED) + row, dv.to(dtype), mask=out_mask)
        u += c[:, None] * v
    u = u * (1.0 / sigma)[:, None] * (1.0 / pre)
    return u, probe + tl.sum(u * 0.0, 1)


@triton.jit
def route_bwd_kernel(src_table, dsrc_table, q_ptr, gain_ptr, h_ptr, dh_ptr, lse_ptr, dlast_ptr, dq_ptr, partial_ptr,
                     n_src, T, d, n_chunks, tiles_per_chunk, stride_qb, stride_qt, inv_d, inv_sqrt_d, eps,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, DYNAMIC_Q: tl.constexpr, HAS_DLAST: tl.constexpr,
                     ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_chunks).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    g = tl.load(gain_ptr + dd, mask=dd < d, other=0.0).to(tl.float32)
    # One fp32 [d] partial per program (sum of u, or of q*u for a dynamic q) serves dq and dgain;
    # several tiles per program make that partial traffic small against the sources'.
    partial = tl.zeros([BLOCK_D], tl.float32)
    if not DYNAMIC_Q:
        qg_row = _query_row(q_ptr, b, stride_qb, dd, d) * g[None, :]
    for k in range(tiles_per_chunk):
        tile = (pid % n_chunks) * tiles_per_chunk + k
        t, t_ok, mask, row, q_offs = _tile(b, tile, T, d, stride_qb, stride_qt, dd, BLOCK_T)
        if DYNAMIC_Q:
            q = tl.load(q_ptr + q_offs, mask=mask, other=0.0).to(tl.float32)
            qg = q * g[None, :]
        else:
            qg = qg_row
        dh = tl.load(dh_ptr + row, mask=mask, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + b * T + t, mask=t_ok, other=0.0)
        ones = tl.full([BLOCK_T], 1.0, tl.float32)
        u, probe = _bwd_tile(src_table, dsrc_table, n_src, h_ptr, dlast_ptr, b, t, dd, mask, row, qg, dh, lse, 1.0,
                             ones, inv_d, inv_sqrt_d, eps, mask, HAS_DLAST, BLOCK_T, BLOCK_D, ALIGNED)
        redo = t_ok & (probe != 0.0)
        if DYNAMIC_Q:
            tl.store(dq_ptr + row, (u * g[None, :]).to(dq_ptr.dtype.element_ty), mask=mask)
            partial += tl.sum(tl.where(redo[:, None], 0.0, q * u), 0)
        else:
            partial += tl.sum(tl.where(redo[:, None], 0.0, u), 0)
        if tl.max(redo.to(tl.int32), 0) > 0:
            tl.debug_barrier()  # the rewrites below land after this tile's first dv (and dq) stores
            sigma = _overflow_scale(src_table, n_src, h_ptr, 0, b, t, dd, mask, row, inv_d, h_ptr.dtype.element_ty,
                                    BLOCK_T, ALIGNED)
            redo_rows = mask & redo[:, None]
            u, _ = _bwd_tile(src_table, dsrc_table, n_src, h_ptr, dlast_ptr, b, t, dd, mask, row, qg, dh, lse,
                             OVERFLOW_RESCALE, sigma, inv_d, inv_sqrt_d, eps, redo_rows, HAS_DLAST, BLOCK_T, BLOCK_D,
                             ALIGNED)
            if DYNAMIC_Q:
                tl.store(dq_ptr + row, (u * g[None, :]).to(dq_ptr.dtype.element_ty), mask=redo_rows)
                partial += tl.sum(tl.where(redo[:, None], q * u, 0.0), 0)
            else:
                partial += tl.sum(tl.where(redo[:, None], u, 0.0), 0)
    tl.store(partial_ptr + pid.to(tl.int64) * d + dd, partial, mask=dd < d)


def _q_strides(q: torch.Tensor) -> tuple[int, int]:
    """(batch stride, token stride) of q broadcast to [B, T, d]: zero along the dims q does not have."""
    if q.dim() == 1:
        return 0, 0
    if q.dim() == 2:
        return q.stride(0), 0
    return q.stride(0), q.stride(1)


def _common_args(sources, q, eps, backward):
    """The launch's config, the sources' table, and the scalars both kernels share around their tiling."""
    d = sources[0].shape[-1]
    block_t, block_d, num_warps = route_config(d, backward)
    table = _triton.tensor_table(sources, sources[0].device, stride_dims=(0, 1))
    meta = dict(BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps, maxnreg=_triton.register_budget(num_warps))
    return table, meta, (*_q_strides(q), 1.0 / d, 1.0 / math.sqrt(d), eps)


def route_fwd(sources, q, gain, eps, addends=()):
    """Launches route_fwd_kernel: returns (h [B,T,d] in the sources' dtype, lse [B,T] float32, c), c being
    the summary sum(addends) routed after the sources ([B,T,d]; an empty [0] tensor without addends)."""
    B, T, d = sources[0].shape
    dev = sources[0].device
    h = _triton.empty((B, T, d), sources[0].dtype, dev)
    lse = _triton.empty((B, T), torch.float32, dev)
    c = _triton.empty((B, T, d) if addends else (0,), sources[0].dtype, dev)
    if B * T == 0:
        return h, lse, c
    table, meta, scalars = _common_args(sources, q, eps, backward=False)
    block_d = meta["BLOCK_D"]
    add_table = _triton.tensor_table(addends, dev, stride_dims=(0, 1)) if addends else table
    aligned = _triton.aligned([*sources, *addends], (0, 1))

    def launch(config):
        n_tiles = triton.cdiv(T, config.constexprs["BLOCK_T"])
        return route_fwd_kernel[(B * n_tiles,)](table, add_table, q, gain, h, lse, c if addends else h, len(sources),
                                                len(addends), T, d, n_tiles, *scalars, BLOCK_D=block_d,
                                                DYNAMIC_Q=q.dim() == 3, ALIGNED=aligned, **config.meta())

    key = (_dtypes.name(h.dtype), d, q.dim() == 3, aligned, bool(addends), bucket(B * T))
    launch(_autotune.pick("route_fwd_kernel", key, route_candidates(d), launch, kernel=route_fwd_kernel))
    return h, lse, c


def route_bwd(dh, sources, q, gain, h, lse, eps, dlast=None):
    """Launches route_bwd_kernel, then sums its per-program partials into dq (static/timestep q) and dgain.
    A given dlast [B,T,d] is added to the last source's gradient (dar_gather: the summary's own gradient)."""
    B, T, d = sources[0].shape
    dev = sources[0].device
    dsources = [_triton.empty((B, T, d), sources[0].dtype, dev) for _ in sources]
    if B * T == 0:
        return dsources, torch.zeros_like(q), torch.zeros_like(gain)
    table, meta, scalars = _common_args(sources, q, eps, backward=True)
    dtable = _triton.tensor_table(dsources, dev, stride_dims=(0, 1))
    n_tiles = triton.cdiv(T, meta["BLOCK_T"])
    per_chunk = _triton.tiles_per_chunk(B, n_tiles, dev)
    n_chunks = triton.cdiv(n_tiles, per_chunk)
    dynamic = q.dim() == 3
    dq = _triton.empty(q.shape, q.dtype, dev) if dynamic else None
    partial = _triton.empty((B, n_chunks, d), torch.float32, dev)
    route_bwd_kernel[(B * n_chunks,)](table, dtable, q, gain, h, dh, lse, dh if dlast is None else dlast,
                                      dq if dynamic else partial, partial, len(sources), T, d, n_chunks, per_chunk,
                                      *scalars, DYNAMIC_Q=dynamic, HAS_DLAST=dlast is not None,
                                      ALIGNED=_triton.aligned([*sources, *dsources], (0, 1)), **meta)
    if dynamic:
        return dsources, dq, partial.sum((0, 1)).to(gain.dtype)
    u = partial.sum(1)  # [B, d]: sum over each batch row's tokens
    if q.dim() == 1:
        u = u.sum(0)
    return dsources, (u * gain.float()).to(q.dtype), (q.float() * u).sum_to_size(gain.shape).to(gain.dtype)


def aot_specs() -> list[KernelSpec]:
    """Every launch configuration the launchers can produce (one per power-of-two d), per dtype and q kind:
    the forward with each autotune candidate, the backward with and without a last-source gradient
    (dar_gather's summary, HAS_DLAST)."""
    specs = []
    common = {"n_src": "i32", "T": "i32", "d": "i32", "stride_qb": "i64", "stride_qt": "i64", "inv_d": "fp32",
              "inv_sqrt_d": "fp32", "eps": "fp32", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr",
              "DYNAMIC_Q": "constexpr", "ALIGNED": "constexpr"}
    # ALIGNED (torch's allocations, whole-vector strides) in every dtype and d; the misaligned-view variant in
    # bf16 at the narrowest and widest d (the register extremes), to keep the compile tests' count down.
    all_d = [2**k for k in range(4, MAX_D.bit_length())]
    for dtype, aligned, widths in ((torch.bfloat16, True, all_d), (torch.float16, True, all_d),
                                   (torch.float32, True, all_d), (torch.bfloat16, False, all_d[::len(all_d) - 1])):
        ty = _triton.TRITON_DTYPE[dtype]
        params = {"q_ptr": f"*{ty}", "gain_ptr": f"*{ty}", "h_ptr": f"*{ty}", "lse_ptr": "*fp32"}
        for d, dynamic in itertools.product(widths, (False, True)):
            tags = {"dtype": _dtypes.name(dtype), "block_d": d, "dynamic_q": dynamic, "aligned": aligned}
            fwd = {"src_table": "*i64", "add_table": "*i64", **params, "c_ptr": f"*{ty}", "n_add": "i32",
                   "n_tiles": "i32"}
            bwd = {"src_table": "*i64", "dsrc_table": "*i64", **params, "dh_ptr": f"*{ty}", "dlast_ptr": f"*{ty}",
                   "dq_ptr": f"*{ty}" if dynamic else "*fp32", "partial_ptr": "*fp32", "n_chunks": "i32",
                   "tiles_per_chunk": "i32", "HAS_DLAST": "constexpr"}
            fixed = {"BLOCK_D": d, "DYNAMIC_Q": dynamic, "ALIGNED": aligned}
            specs += candidate_specs(
                f"route_fwd_kernel[{ty},BLOCK_D={d},DYNAMIC_Q={dynamic}{'' if aligned else ',ALIGNED=False'}]",
                route_fwd_kernel, {**fwd, **common}, fixed, route_candidates(d), tags)
            block_t, block_d, num_warps = route_config(d, backward=True)
            for has_dlast in (False, True):
                constexprs = {"BLOCK_T": block_t, "BLOCK_D": block_d, "DYNAMIC_Q": dynamic, "HAS_DLAST": has_dlast,
                              "ALIGNED": aligned}
                name = (f"route_bwd_kernel[{ty},BLOCK_T={block_t},BLOCK_D={block_d},DYNAMIC_Q={dynamic},"
                        f"HAS_DLAST={has_dlast}{'' if aligned else ',ALIGNED=False'}]")
                specs.append(KernelSpec(name, route_bwd_kernel, {**bwd, **common}, constexprs, num_warps,
                                        _triton.register_budget(num_warps), {**tags, "HAS_DLAST": has_dlast}))
    return specs
