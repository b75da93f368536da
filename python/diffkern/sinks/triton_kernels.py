"""Triton kernels for attention sinks (specs/sinks.md) and their launchers. Nothing here forms N_q x N_k.

  attn_fwd_kernel   flash forward, one program per (BLOCK_M queries, b, h): online softmax over key tiles;
                    writes lse (and, with V, the fp32 unmasked output o and the row entropy; with ROW_TOP
                    = r > 0, each row's r largest probabilities: a running top-r of the logits merged per
                    key tile, r max-and-count reductions over the tile; r = 1 is the running max).
                    Reads q once and k (and v) once per query tile; 4 N_q N_k d FLOPs with V, 2 without.
                    With HAS_BIAS (sink_attention_given) it adds a per-key bias row to the logits of rows
                    < n_rows and writes only the output, once, in q's dtype (its own tiles, GIVEN_TILES).
  col_mass_kernel   column pass, one program per (BLOCK_N keys, b, h): walks the image query tiles and
                    sums exp(s - lse) down each key's column (flash backward's dK loop structure, no V).
                    Deterministic: no atomics. 2 n_query N_k d FLOPs.
  topk_kernel       one program per score row: keeps the best K_PAD packed (score, index) keys in a
                    scratch row and merges each new chunk of BLOCK - K_PAD scores into it with tl.sort.
  suppress_kernel   one program per (BLOCK_M queries, b, h), the pass that writes the output, each row once,
                    in q's dtype: gathers the K selected keys and values and corrects the unmasked o by their
                    terms (4 N_q K d FLOPs); a row whose correction factor is at most recompute_below(dtype)
                    (the suppressed keys hold most of its mass) is written instead as the masked softmax, by a
                    flash loop over every key in the same program (4 BLOCK_M N_k d FLOPs, only in tiles
                    holding such a row); o is not read for those rows.

Launch configurations: attn_fwd, col_mass and suppress go through diffkern._autotune.pick with the
candidates of fwd_configs / col_mass_configs / suppress_configs (configs[0] is what the CPU tests run; every
candidate is in aot_specs and compiles with 0 spills, tests/test_kernels_compile.py). The key loops are plain
`for` loops over tiles with the loads at the top, which Triton software-pipelines num_stages deep. The
candidates differ only in num_stages: a taller or wider tile changes the order of a row's or a column's sums
(tests/test_autotune_candidates.py) or spills.

Pass structure (FLOPs 2 m n k per product; bytes: HBM, each distinct byte once; predicted H100 time
max(bytes / 3.35 TB/s, FLOPs / 990 TFLOP/s); numbers at SD3, B=2, H=24, N_q = N_k = 4429, n = 4096 image
queries, d = 64, bf16, from diffkern.bench.sinks.modeled_rows; one flash forward: 4 N_q N_k d = 247 GFLOP,
110 MB, 249 us):
  * selection in the call (per_head, head_union, bottom, anti_sink; measure and any mode with statistics,
    which need the mass): forward (o fp32, lse, entropy, top-5) + column pass + top-k + suppress:
    4 N_q N_k d + 2 n N_k d + 4 n K d = 1.46x one flash forward's FLOPs (K = 1 or 5; 1.48x at head-union
    K = 120), 305 MB, predicted 364 us = 1.46x. The minimum for this path: the mass needs each image row's
    final lse, known only after that row's whole key sweep, so its terms exp(s_ij - lse_i) need the scores
    a second time (2 n N_k d) or kept (the bf16 score matrix, 1.9 GB written and read, 1.1 ms against 123 us
    of recomputing it). Writing the output only after the selection (an lse-only forward, the column pass,
    then a masked flash forward writing q's dtype once) costs 2 N_q N_k d + 2 n N_k d + 4 N_q N_k d = 1.96x,
    +123 us, to save the fp32 o's write and read (8 N_q d bytes per (b, h), 109 MB, 32 us): so o stays fp32
    and the correction is the pass that writes the output. This is the path the diffusers processors run
    at every denoising step (statistics on). By the roofline it cannot meet "<= 1.3x SDPA flash" (1.46x at
    equal efficiency; it needs these kernels to reach 1.12x SDPA flash's achieved FLOP rate, which only a GPU
    run can show). The roofline also omits the exponentials: one per score in both passes, and an H100 does
    ~3.9e12 per second (16 per SM per clock), so the forward's 9.4e8 take ~0.24 ms (as long as its products)
    and the column pass's 8.7e8 take ~0.22 ms (twice its products): counting them, 1.7x (exponentials and
    products serialised) to 1.9x (overlapped). Nor does it count the statistics' running top-5 (row_top = 5,
    which the processors request at every call). Rebuilt from every key tile by R max-and-count passes, it
    would take ~30 fp32 operations per score (against ~8 for the online softmax and entropy): ~0.85 ms for the
    forward's 9.4e8 scores at an H100's ~3.3e13 non-tensor fp32 operations per second, 3.4x a flash forward.
    Instead a key tile costs a per-row check unless some row holds a logit above its 5th largest so far, and
    then ~4 + 6 s operations per score for the s distinct values taken (s <= 5, the most any row of the tile
    takes): with i.i.d. logits a row's top-5 changes ~5/t times in its t-th tile, so s is ~1-3 after the first
    tiles; with concentrated rows (sinks, local attention) most tiles are skipped. A GPU run at SD3 must tell.
  * selection independent of the mass (keys known before the call: given indices, or mode "random" without
    statistics, the processors' statistics=False): sink_attention_given, one attn_fwd_kernel launch with the
    selected keys' bias row in the logits (HAS_BIAS) writing the output once in q's dtype: 4 N_q N_k d FLOPs =
    1.00x, 116 MB (the flash forward's bytes less its lse, plus the fp32 bias row and the launcher's ATen passes
    over it), predicted 249 us = 1.00x (diffkern.bench.sinks.modeled_given_rows), which meets 1.3x at equal
    efficiency. sink_attention's mode "random" with statistics still runs the three passes (1.46x).
  * nothing suppressed (measure, k_sink = 0) without statistics: the minimum is one flash forward, 1.0x;
    today 1.46x plus the cast of the fp32 o to q's dtype, for the same reason.
"""
from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from .. import _autotune, _dot, _dtypes, _triton
from .._autotune import Config
from .._dot import dot
from .._triton import KernelSpec
from .reference import recompute_below, suppression_weights

MAX_D = 256
# Largest K the top-k kernel keeps (head-union at k = 50 x 24 heads is 1200 keys).
MAX_TOPK = 2048
# (BLOCK_M, BLOCK_N, num_warps) per padded head_dim: flash-attention's tiles for 16-bit inputs; fp32
# inputs (tf32x3 dots hold three operand splits) take half-height tiles. Chosen by compiling every
# configuration for sm_80/sm_90a (ptxas -v) with the full register budget: none spills.
TILES = {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 4), 128: (64, 32, 8), 256: (32, 32, 8)}
TILES_F32 = {16: (32, 32, 8), 32: (32, 32, 8), 64: (32, 32, 8), 128: (32, 32, 8), 256: (16, 32, 8)}
# The same with the key bias (HAS_BIAS, sink_attention_given): there the tiles above spill on sm_80/sm_90a (16-bit
# head_dim 64 and 128, fp32 128; the bias row's load and the -inf guard tip them over), these compile with 0 spills
# at 3 and 2 stages (ptxas -v; 256, as for the forward, is not compiled ahead of time).
GIVEN_TILES = {16: (64, 64, 8), 32: (64, 64, 8), 64: (64, 64, 8), 128: (32, 64, 8), 256: (16, 32, 8)}
GIVEN_TILES_F32 = {16: (32, 32, 8), 32: (32, 32, 8), 64: (32, 32, 8), 128: (16, 32, 8), 256: (16, 32, 8)}


def tiles(d: int, dtype: torch.dtype) -> tuple[int, int, int]:
    return (TILES_F32 if dtype == torch.float32 else TILES)[block_d(d)]


def suppress_tiles(d: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of suppress_kernel: at most half the flash tile's height and 32 keys wide, since a
    tile holding a flagged row runs the masked online softmax, which also carries the bias row and the tracked
    key's probability (the flash tiles spill there on sm_80/sm_90a)."""
    bm, bn, _ = tiles(d, dtype)
    return max(16, bm // 2), min(bn, 32)


def fwd_configs(d: int, dtype: torch.dtype) -> list[Config]:
    """attn_fwd_kernel's candidates: configs[0] the flash tile above (what the CPU tests run), then the same with
    one more and one fewer pipeline stage. Only the stages vary: a taller tile spills at 4 warps and on 8 warps
    lays the row sums out differently (another order of the additions, tests/test_autotune_candidates.py), so
    every candidate gives the same bits."""
    bm, bn, warps = tiles(d, dtype)
    return [Config({"BLOCK_M": bm, "BLOCK_N": bn}, warps, stages) for stages in (3, 4, 2)]


def col_mass_configs(d: int, dtype: torch.dtype) -> list[Config]:
    """col_mass_kernel's candidates: the tile above at 3, 4 and 2 pipeline stages (a wider key tile changes the
    layout of the column sums, at 4 warps or 8, and so the order of their additions)."""
    bm, bn, warps = tiles(d, dtype)
    return [Config({"BLOCK_M": bm, "BLOCK_N": bn}, warps, stages) for stages in (3, 4, 2)]


def suppress_configs(d: int, dtype: torch.dtype) -> list[Config]:
    """suppress_kernel's candidates: its tile (suppress_tiles) with 2 or 3 pipeline stages for the flagged
    tiles' key loop."""
    bm, bn = suppress_tiles(d, dtype)
    return [Config({"BLOCK_M": bm, "BLOCK_N": bn}, tiles(d, dtype)[2], stages) for stages in (3, 2)]


SEL_BLOCK = 16  # selected keys per correction step (tl.dot's minimum width)
# Products run as diffkern._dot says (16-bit tensor cores, tf32x3 or tf32 for fp32, fp32 "ieee" under the
# interpreter): an "ieee" fp32 tl.dot of these tiles needs over 255 registers and spills on sm_80/sm_90a.


def block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


@triton.jit
def _load_rows(base, rows, n, stride_n, dd, d):
    """Rows `rows` (< n) of a [n, d] matrix with row stride stride_n, as a [len(rows), BLOCK_D] tile."""
    return tl.load(base + rows[:, None].to(tl.int64) * stride_n + dd[None, :],
                   mask=(rows < n)[:, None] & (dd < d)[None, :], other=0.0)


@triton.jit
def _load_cols(base, cols, n, stride_n, dd, d):
    """Rows `cols` (< n) of a [n, d] matrix as a transposed [BLOCK_D, len(cols)] tile (k^T for q k^T)."""
    return tl.load(base + cols[None, :].to(tl.int64) * stride_n + dd[:, None],
                   mask=(cols < n)[None, :] & (dd < d)[:, None], other=0.0)


@triton.jit
def _merge_top(top, s, R: tl.constexpr, R_PAD: tl.constexpr):
    """The R largest of each row of the running top [BLOCK_M, R_PAD] (descending in slots < R, -inf in the
    rest) and s [BLOCK_M, n] (a tile's candidates, from _tile_top), descending, ties counted separately: R
    steps, each taking the largest value below the last one taken and filling as many slots as it occurs."""
    slots = tl.arange(0, R_PAD)[None, :]
    new = tl.full(top.shape, float("-inf"), tl.float32)
    prev = tl.full([top.shape[0]], float("inf"), tl.float32)
    filled = tl.zeros([top.shape[0]], tl.int32)
    for _ in tl.static_range(R):
        mx = tl.maximum(tl.max(tl.where(s < prev[:, None], s, float("-inf")), 1),
                        tl.max(tl.where(top < prev[:, None], top, float("-inf")), 1))
        count = tl.sum((s == mx[:, None]).to(tl.int32), 1) + tl.sum((top == mx[:, None]).to(tl.int32), 1)
        new = tl.where((slots >= filled[:, None]) & (slots < (filled + count)[:, None]) & (slots < R), mx[:, None], new)
        filled += count
        prev = mx
    return new


@triton.jit
def _tile_top(s, kth, R: tl.constexpr, R_PAD: tl.constexpr):
    """[BLOCK_M, R_PAD]: the R largest values above kth [BLOCK_M] of each row of the tile s [BLOCK_M, BLOCK_N],
    descending, ties counted separately, -inf past them. One max-and-count step per distinct value taken, run
    only while some row of the tile has a value left to take (in most tiles one or none)."""
    slots = tl.arange(0, R_PAD)[None, :]
    c = tl.where(s > kth[:, None], s, float("-inf"))
    left = tl.minimum(tl.sum((c > float("-inf")).to(tl.int32), 1), R)
    new = tl.full([s.shape[0], R_PAD], float("-inf"), tl.float32)
    prev = tl.full([s.shape[0]], float("inf"), tl.float32)
    filled = tl.zeros([s.shape[0]], tl.int32)
    for _ in tl.static_range(R):
        if tl.max(left - filled, 0) > 0:
            mx = tl.max(tl.where(c < prev[:, None], c, float("-inf")), 1)
            count = tl.where(mx > float("-inf"), tl.sum((c == mx[:, None]).to(tl.int32), 1), 0)
            new = tl.where((slots >= filled[:, None]) & (slots < (filled + count)[:, None]) & (slots < R),
                           mx[:, None], new)
            filled += count
            prev = mx
    return new


@triton.jit
def attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, ent_ptr, top_ptr, bias_ptr, H, N_q, N_k, n_rows, d,
                    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sb_b, sb_h, scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    HAS_V: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                    ROW_TOP: tl.constexpr, R_PAD: tl.constexpr, HAS_BIAS: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr + b * sq_b + h * sq_h, rows, N_q, sq_n, dd, d)
    k_base = k_ptr + b * sk_b + h * sk_h
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    t = tl.zeros([BLOCK_M], tl.float32)  # sum_j e^{s_ij - m_i} s_ij, for the entropy
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    top = tl.full([BLOCK_M, R_PAD], float("-inf"), tl.float32)  # the running top-ROW_TOP logits (ROW_TOP > 1)
    biased = (rows < n_rows)[:, None]  # HAS_BIAS: the rows whose logits take the key bias row
    for n0 in range(0, N_k, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = (cols < N_k)[None, :]
        s = dot(q, _load_cols(k_base, cols, N_k, sk_n, dd, d), DOT_F32, PRECISION) * scale
        if HAS_BIAS:
            key_bias = tl.load(bias_ptr + b * sb_b + h * sb_h + cols, mask=cols < N_k, other=0.0)
            s += tl.where(biased, key_bias[None, :], 0.0)
        s = tl.where(col_ok, s, float("-inf"))
        tile_max = tl.max(s, 1)
        m_new = tl.maximum(m, tile_max)
        m_ref = m_new
        if HAS_BIAS:
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row's tiles so far all bias -inf: no NaN
        alpha = tl.exp(m - m_ref)
        p = tl.exp(s - m_ref[:, None])
        l = l * alpha + tl.sum(p, 1)
        if HAS_V:
            v = _load_rows(v_ptr + b * sv_b + h * sv_h, cols, N_k, sv_n, dd, d)
            acc = acc * alpha[:, None] + dot(p, v, DOT_F32, PRECISION)
            if not HAS_BIAS:  # the entropy is the unmasked rows' statistic (p s is NaN at a -inf bias)
                t = t * alpha + tl.sum(p * tl.where(col_ok, s, 0.0), 1)
        if ROW_TOP > 1:
            # only a logit above the row's R-th largest so far can enter its top: a tile where no row holds one
            # is skipped (a per-row check), else its few such values are taken (_tile_top, ~6 operations per
            # score and step) and merged with the running top (R_PAD-wide, not BLOCK_N-wide); exact either way
            kth = tl.max(tl.where(tl.arange(0, R_PAD)[None, :] == ROW_TOP - 1, top, float("-inf")), 1)
            if tl.max((tile_max > kth).to(tl.int32), 0) > 0:
                top = _merge_top(top, _tile_top(s, kth, ROW_TOP, R_PAD), ROW_TOP, R_PAD)
        m = m_new
    lse = m + tl.log(l)
    row_ok = rows < N_q
    if not HAS_BIAS:
        tl.store(lse_ptr + bh * N_q + rows, lse, mask=row_ok)
    if HAS_V:
        o_offs = (bh * N_q + rows[:, None]) * d + dd[None, :]
        # o in its tensor's dtype: fp32 for the suppression path, q's dtype for the biased (given-keys) one
        tl.store(o_ptr + o_offs, (acc / l[:, None]).to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (dd < d)[None, :])
        if not HAS_BIAS:
            tl.store(ent_ptr + bh * N_q + rows, lse - t / l, mask=row_ok)
    if ROW_TOP > 0:
        slots = tl.arange(0, R_PAD)
        if ROW_TOP == 1:
            top = tl.where(slots[None, :] == 0, m[:, None], top)
        top_offs = (bh * N_q + rows[:, None]) * ROW_TOP + slots[None, :]
        tl.store(top_ptr + top_offs, tl.exp(top - lse[:, None]), mask=row_ok[:, None] & (slots < ROW_TOP)[None, :])


@triton.jit
def col_mass_kernel(q_ptr, k_ptr, lse_ptr, mass_ptr, H, N_q, N_k, n_query, d,
                    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, scale, inv_n_query,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    kt = _load_cols(k_ptr + b * sk_b + h * sk_h, cols, N_k, sk_n, dd, d)
    q_base = q_ptr + b * sq_b + h * sq_h
    acc = tl.zeros([BLOCK_N], tl.float32)
    for m0 in range(0, n_query, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_query
        lse = tl.load(lse_ptr + bh * N_q + rows, mask=row_ok, other=0.0)
        s = dot(_load_rows(q_base, rows, n_query, sq_n, dd, d), kt, DOT_F32, PRECISION) * scale
        acc += tl.sum(tl.where(row_ok[:, None], tl.exp(s - lse[:, None]), 0.0), 0)
    tl.store(mass_ptr + bh * N_k + cols, acc * inv_n_query, mask=cols < N_k)


@triton.jit
def topk_kernel(score_ptr, idx_ptr, best_ptr, N, k, BLOCK: tl.constexpr, K_PAD: tl.constexpr,
                LARGEST: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, BLOCK)
    keep = t < K_PAD
    # A packed key sorts by score, then by lower index: (ordered score bits) << 32 | (2^31 - 1 - j).
    empty = tl.full([BLOCK], -9223372036854775808, tl.int64)
    tl.store(best_ptr + row * K_PAD + t, empty, mask=keep)
    for n0 in range(0, N, BLOCK - K_PAD):
        j = n0 + t - K_PAD
        fresh = (t >= K_PAD) & (j < N)
        bits = tl.load(score_ptr + row * N + j, mask=fresh, other=0.0).to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # float order as signed-int order
        if not LARGEST:
            ordered = ~ordered
        key = (ordered.to(tl.int64) << 32) | (2147483647 - j).to(tl.int64)
        tl.debug_barrier()
        best = tl.load(best_ptr + row * K_PAD + t, mask=keep, other=0)
        key = tl.sort(tl.where(keep, best, tl.where(fresh, key, empty)), descending=True)
        tl.debug_barrier()
        tl.store(best_ptr + row * K_PAD + t, key, mask=keep)
    tl.debug_barrier()
    best = tl.load(best_ptr + row * K_PAD + t, mask=t < k, other=0)
    tl.store(idx_ptr + row * k + t, 2147483647 - (best & 0xFFFFFFFF), mask=t < k)


@triton.jit
def _masked_rows(q, k_base, v_base, key_row, j0, N_k, d, sk_n, sv_n, dd, scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_F32: tl.constexpr, PRECISION: tl.constexpr, RENORMALIZE: tl.constexpr):
    """Rows q against every key, by an online softmax: (the masked output [BLOCK_M, BLOCK_D], the masked
    probability of key j0 [BLOCK_M]). RENORMALIZE: key_row [N_k] is a bias added to the logits, the output
    softmax(s + bias) v; else it scales the values, softmax(s) (key_row v)."""
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    t0 = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, N_k, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        s = dot(q, _load_cols(k_base, cols, N_k, sk_n, dd, d), DOT_F32, PRECISION) * scale
        if RENORMALIZE:
            s += tl.load(key_row + cols, mask=cols < N_k, other=float("-inf"))[None, :]
        else:
            factor = tl.load(key_row + cols, mask=cols < N_k, other=0.0)
            s = tl.where((cols < N_k)[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile of bias -inf keys only: no NaN
        alpha = tl.exp(m - m_ref)
        p = tl.exp(s - m_ref[:, None])
        l = l * alpha + tl.sum(p, 1)
        t0 = t0 * alpha + tl.sum(tl.where((cols == j0)[None, :], p, 0.0), 1)
        if not RENORMALIZE:
            p *= factor[None, :]  # l and t0 have the unscaled p: the probabilities are untouched
        acc = acc * alpha[:, None] + dot(p, _load_rows(v_base, cols, N_k, sv_n, dd, d), DOT_F32, PRECISION)
        m = m_new
    return acc / l[:, None], t0 / l


@triton.jit
def suppress_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, idx_ptr, row_ptr, out_ptr, post_ptr, H, N_q, N_k, n_rows, K,
                    d, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, si_b, si_h, sb_b, sb_h, scale, a, w, wd, g,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, RECOMPUTE: tl.constexpr,
                    RENORMALIZE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    row_ok, fix = rows < N_q, rows < n_rows
    tile_mask = row_ok[:, None] & (dd < d)[None, :]
    k_base, v_base = k_ptr + b * sk_b + h * sk_h, v_ptr + b * sv_b + h * sv_h
    q = _load_rows(q_ptr + b * sq_b + h * sq_h, rows, n_rows, sq_n, dd, d)  # no lane past n_rows loads
    c = tl.zeros([BLOCK_M], tl.float32)  # sum_S P
    p0 = tl.zeros([BLOCK_M], tl.float32)  # P of the first selected key
    u = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # sum_S P v
    if pid_m * BLOCK_M < n_rows:
        lse = tl.load(lse_ptr + bh * N_q + rows, mask=fix, other=0.0)
        for s0 in range(0, K, BLOCK_S):
            sel = s0 + tl.arange(0, BLOCK_S)
            sel_ok = sel < K
            j = tl.load(idx_ptr + b * si_b + h * si_h + sel, mask=sel_ok, other=0)
            sel_ok = sel_ok & (j >= 0) & (j < N_k)  # an index out of range (unchecked under capture) selects nothing
            kt = tl.load(k_base + j[None, :] * sk_n + dd[:, None], mask=sel_ok[None, :] & (dd < d)[:, None], other=0.0)
            s = dot(q, kt, DOT_F32, PRECISION) * scale
            p = tl.where(fix[:, None] & sel_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
            vs = tl.load(v_base + j[:, None] * sv_n + dd[None, :], mask=sel_ok[:, None] & (dd < d)[None, :], other=0.0)
            c += tl.sum(p, 1)
            p0 += tl.sum(tl.where((sel == 0)[None, :], p, 0.0), 1)
            u += dot(p, vs, DOT_F32, PRECISION)
    denom = a - wd * c  # (a, w, wd, g): reference.suppression_weights
    # 1 / that factor amplifies the rounding (sinks_math.h): such a row is recomputed below instead
    exact = fix & (a - w * c <= RECOMPUTE * a)
    denom = tl.where(exact | (rows >= n_rows), 1.0, denom)  # no 0/0 in a row that is not corrected
    # o is read only now, after the loop: holding it through the loop spills at head_dim 128
    o_offs = (bh * N_q + rows[:, None]) * d + dd[None, :]
    o = tl.load(o_ptr + o_offs, mask=tile_mask & ~exact[:, None], other=0.0)
    fixed = tl.where(fix[:, None], (a * o - w * u) / denom[:, None], o)  # rows >= n_rows: o itself
    tl.store(out_ptr + o_offs, fixed.to(out_ptr.dtype.element_ty), mask=tile_mask & ~exact[:, None])
    tl.store(post_ptr + bh * n_rows + rows, g * p0 / denom, mask=fix & ~exact)
    if tl.max(exact.to(tl.int32), 0) > 0:  # the same pass writes the flagged rows, as the masked softmax
        j0 = tl.load(idx_ptr + b * si_b + h * si_h)
        masked, post = _masked_rows(q, k_base, v_base, row_ptr + b * sb_b + h * sb_h, j0, N_k, d, sk_n, sv_n, dd,
                                    scale, BLOCK_M, BLOCK_N, BLOCK_D, DOT_F32, PRECISION, RENORMALIZE)
        tl.store(out_ptr + o_offs, masked.to(out_ptr.dtype.element_ty), mask=exact[:, None] & (dd < d)[None, :])
        tl.store(post_ptr + bh * n_rows + rows, post, mask=exact)


def _bh_strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _shape_key(dtype, *sizes) -> tuple:
    """The autotuning key: the dtype and each size rounded up to a power of two."""
    return (str(dtype), *(triton.next_power_of_2(max(n, 1)) for n in sizes))


def _fwd(q, k, v, n_query, scale, row_top=0):
    B, H, N_q, d = q.shape
    N_k = k.shape[2]
    dev = q.device
    lse = _triton.empty((B, H, N_q), torch.float32, dev)
    mass = _triton.empty((B, H, N_k), torch.float32, dev)
    o = _triton.empty((B, H, N_q, d), torch.float32, dev) if v is not None else None
    ent = _triton.empty((B, H, N_q), torch.float32, dev) if v is not None else None
    top = _triton.empty((B, H, N_q, row_top), torch.float32, dev)
    if B * H * N_q == 0:
        return o, lse, mass.zero_(), ent, top
    fixed = dict(BLOCK_D=block_d(d), **_dot.dot_meta(q.dtype))
    attn = _attn_launch(q, k, v, o if o is not None else lse, lse, ent if ent is not None else lse,
                        top if row_top else lse, row_top, scale)

    def col(config):
        return col_mass_kernel[(triton.cdiv(N_k, config.constexprs["BLOCK_N"]), B * H)](
            q, k, lse, mass, H, N_q, N_k, n_query, d, *_bh_strides(q), *_bh_strides(k), scale,
            1.0 / max(n_query, 1), **fixed, **config.meta())
    attn(_autotune.pick("sinks.attn_fwd_kernel", (*_shape_key(q.dtype, N_q, N_k, d), v is not None, row_top),
                        fwd_configs(d, q.dtype), attn, kernel=attn_fwd_kernel))
    col(_autotune.pick("sinks.col_mass_kernel", _shape_key(q.dtype, n_query, N_k, d), col_mass_configs(d, q.dtype),
                       col, kernel=col_mass_kernel))
    return o, lse, mass, ent, top


def _attn_launch(q, k, v, o, lse, ent, top, row_top, scale, bias_row=None, n_rows=0):
    """attn_fwd_kernel's launch for a config (the pointers o, lse, ent, top: any tensor where unused); bias_row
    [B, G, N_k] fp32 (G in {1, H}): added to the logits of rows < n_rows (HAS_BIAS)."""
    B, H, N_q, d = q.shape
    vv = v if v is not None else k
    bias = bias_row if bias_row is not None else lse
    sb_b, sb_h = (bias_row.stride(0), bias_row.stride(1) if bias_row.shape[1] > 1 else 0) if bias_row is not None \
        else (0, 0)

    def attn(config):
        return attn_fwd_kernel[(triton.cdiv(N_q, config.constexprs["BLOCK_M"]), B * H)](
            q, k, vv, o, lse, ent, top, bias, H, N_q, k.shape[2], n_rows, d, *_bh_strides(q), *_bh_strides(k),
            *_bh_strides(vv), sb_b, sb_h, scale, HAS_V=v is not None, ROW_TOP=row_top,
            R_PAD=triton.next_power_of_2(max(row_top, 1)), HAS_BIAS=bias_row is not None, BLOCK_D=block_d(d),
            **_dot.dot_meta(q.dtype), **config.meta())
    return attn


def sink_mass(q, k, n_query, scale):
    """Launches attn_fwd_kernel (lse only) and col_mass_kernel: (mass [B, H, N_k], lse [B, H, N_q]) fp32."""
    _, lse, mass, _, _ = _fwd(q, k, None, n_query, scale)
    return mass, lse


def attention_fwd(q, k, v, n_query, scale, row_top=0):
    """Launches attn_fwd_kernel (with V, and the top-row_top probabilities) and col_mass_kernel: (o, lse, mass,
    entropy, top_p), fp32."""
    return _fwd(q, k, v, n_query, scale, row_top)


def topk_config(k: int, n: int) -> tuple[int, int, int]:
    """(BLOCK, K_PAD, num_warps): chunks of BLOCK - K_PAD >= K_PAD new scores per sort, at most 1024-wide
    sorts unless K needs more (a short row sorts once, in a block just wide enough)."""
    k_pad = max(16, triton.next_power_of_2(max(k, 1)))
    block = max(2 * k_pad, min(1024, triton.next_power_of_2(n + k_pad)))
    return block, k_pad, max(4, min(16, block // 256))


def topk_configs(k: int, n: int) -> list[Config]:
    """topk_kernel's candidates: topk_config's chunk at its warps, then at twice as many (at most 16). The kernel
    moves and sorts packed int64 keys (score bits, index), all distinct, and does no float arithmetic, so any warp
    count gives the same bits (more warps only spread each sort over more threads). num_stages stays Triton's
    default: the scratch row is stored and reloaded every chunk (ordered by barriers), a load a deeper pipeline
    must not hoist."""
    block, k_pad, warps = topk_config(k, n)
    return [Config({"BLOCK": block, "K_PAD": k_pad}, w) for w in dict.fromkeys((warps, min(16, 2 * warps)))]


def sink_topk(score, k, largest):
    """Launches topk_kernel: indices [B, G, k] int64 of the k largest/smallest scores, ties -> lower index."""
    B, G, N = score.shape
    idx = _triton.empty((B, G, k), torch.int64, score.device)
    if B * G * k == 0:
        return idx
    configs = topk_configs(k, N)
    best = torch.empty((B * G, configs[0].constexprs["K_PAD"]), dtype=torch.int64, device=score.device)
    score = score.contiguous()

    def launch(config):
        return topk_kernel[(B * G,)](score, idx, best, N, k, LARGEST=largest, **config.meta())
    launch(_autotune.pick("sinks.topk_kernel", (_autotune.bucket(N), k, largest), configs, launch, kernel=topk_kernel))
    return idx


def sink_suppress(q, k, v, o, lse, idx, n_rows, scale, bias, renormalize=True):
    """Launches suppress_kernel, which writes every output row once: corrected, or recomputed where flagged:
    (out [B, H, N_q, d] in q's dtype, post [B, H, n_rows] fp32)."""
    B, H, N_q, d = q.shape
    N_k, K = k.shape[2], idx.shape[2]
    out = _triton.empty((B, H, N_q, d), q.dtype, q.device)
    post = _triton.empty((B, H, n_rows), torch.float32, q.device)
    if B * H * N_q == 0:
        return out, post
    a, w, wd, g = suppression_weights(bias, K, N_k, renormalize)
    G = idx.shape[1]
    si_h = idx.stride(1) if G > 1 else 0
    row = lse  # read by no program when no row can be flagged (w = 0: every row keeps its attention)
    if n_rows and w != 0.0:
        # the selected keys' bias row (renormalize) or value factors (value path: e^bias, 1 elsewhere), read
        # only by tiles that recompute a row (no host sync decides that); an out-of-range index (unchecked
        # under capture) changes no key, as in the correction
        row = key_row(idx, N_k, *((0.0, bias) if renormalize else (1.0, math.exp(bias))))

    def launch(config):
        return suppress_kernel[(triton.cdiv(N_q, config.constexprs["BLOCK_M"]), B * H)](
            q, k, v, o, lse, idx, row, out, post, H, N_q, N_k, n_rows, K, d, *_bh_strides(q), *_bh_strides(k),
            *_bh_strides(v), idx.stride(0), si_h, G * N_k, N_k if G > 1 else 0, scale, a, w, wd, g,
            BLOCK_S=SEL_BLOCK, BLOCK_D=block_d(d), RECOMPUTE=recompute_below(q.dtype), RENORMALIZE=renormalize,
            **_dot.dot_meta(q.dtype), **config.meta())
    launch(_autotune.pick("sinks.suppress_kernel", (*_shape_key(q.dtype, N_q, N_k, d), K), suppress_configs(d, q.dtype),
                          launch, kernel=suppress_kernel))
    return out, post


def key_row(idx, n_keys, neutral, change):
    """[B, G, n_keys] fp32: `change` on the keys idx [B, G, K] selects (a key listed twice changed once), `neutral`
    elsewhere; an out-of-range index (unchecked under capture) changes no key."""
    in_range = (idx >= 0) & (idx < n_keys)
    return torch.full((*idx.shape[:2], n_keys), neutral, dtype=torch.float32, device=idx.device).scatter_reduce_(
        -1, idx.clamp(0, n_keys - 1), torch.where(in_range, change, neutral).float(),
        "amin" if change <= neutral else "amax")


def given_configs(d: int, dtype: torch.dtype) -> list[Config]:
    """attn_fwd_kernel's candidates with the key bias (HAS_BIAS, sink_attention_given): its tile (GIVEN_TILES) at 3
    and 2 pipeline stages (4 spills at fp32 head_dim 128), which give the same bits."""
    bm, bn, warps = (GIVEN_TILES_F32 if dtype == torch.float32 else GIVEN_TILES)[block_d(d)]
    return [Config({"BLOCK_M": bm, "BLOCK_N": bn}, warps, stages) for stages in (3, 2)]


def attention_given(q, k, v, idx, n_rows, scale, bias):
    """Launches attn_fwd_kernel once with the selected keys' bias row (HAS_BIAS): out [B, H, N_q, d] in q's dtype,
    softmax_j(s_ij + bias [j in S]) v for rows < n_rows, plain attention below; a (b, h) whose every key is
    selected gets no bias (it would cancel)."""
    B, H, N_q, d = q.shape
    out = _triton.empty((B, H, N_q, d), q.dtype, q.device)
    if B * H * N_q == 0:
        return out
    row = key_row(idx, k.shape[2], 0.0, bias)
    row = torch.where((row == bias).all(-1, keepdim=True), 0.0, row)
    attn = _attn_launch(q, k, v, out, out, out, out, 0, scale, row, n_rows)
    attn(_autotune.pick("sinks.attn_fwd_kernel", (*_shape_key(q.dtype, N_q, k.shape[2], d), "bias"),
                        given_configs(d, q.dtype), attn, kernel=attn_fwd_kernel))
    return out


def _candidates(kernel, signature, fixed, configs, ty, d, tags) -> list[KernelSpec]:
    """Every candidate of `kernel` on top of `fixed`, grouped (for the reduction-order test) by all but the
    configuration."""
    group = f"{kernel.__name__}[{ty},d={d}," + ",".join(f"{k}={v}" for k, v in fixed.items()) + "]"
    return _autotune.candidate_specs(group, kernel, signature, fixed, configs, tags)


def aot_specs() -> list[KernelSpec]:
    """Every candidate configuration of head_dim 64 and 128 per dtype (the forward without and with the
    statistics' row_top = 5, and with the given keys' bias; the suppression renormalising or scaling values), fp32's
    products in tf32x3 and, at head_dim 64, tf32; and the top-k kernel for K up to MAX_TOPK."""
    specs = []
    strides = {f"s{x}_{y}": "i64" for x in ("q", "k", "v") for y in ("b", "h", "n")}
    dims = {"H": "i32", "N_q": "i32", "N_k": "i32", "d": "i32"}
    cases = [(dtype, d, "tf32x3") for dtype, d in itertools.product((torch.bfloat16, torch.float16, torch.float32),
                                                                    (64, 128))]
    for dtype, d, fp32_precision in cases + [(torch.float32, 64, "tf32")]:
        ty = _triton.TRITON_DTYPE[dtype]
        common = {"BLOCK_D": block_d(d), **_dot.gpu_meta(dtype, fp32_precision)}
        tags = {"dtype": _dtypes.name(dtype), "head_dim": d, **_dot.precision_tags(dtype, fp32_precision)}
        qkv = {"q_ptr": f"*{ty}", "k_ptr": f"*{ty}", "v_ptr": f"*{ty}"}
        fwd = {**qkv, "o_ptr": "*fp32", "lse_ptr": "*fp32", "ent_ptr": "*fp32", "top_ptr": "*fp32", "bias_ptr": "*fp32",
               "H": "i32", "N_q": "i32", "N_k": "i32", "n_rows": "i32", "d": "i32", **strides, "sb_b": "i64",
               "sb_h": "i64", "scale": "fp32"}
        col = {"q_ptr": f"*{ty}", "k_ptr": f"*{ty}", "lse_ptr": "*fp32", "mass_ptr": "*fp32", **dims, "n_query": "i32",
               **{s: "i64" for s in list(strides)[:6]}, "scale": "fp32", "inv_n_query": "fp32"}
        sup = {**qkv, "o_ptr": "*fp32", "lse_ptr": "*fp32", "idx_ptr": "*i64", "row_ptr": "*fp32", "out_ptr": f"*{ty}",
               "post_ptr": "*fp32", **dims, "n_rows": "i32", "K": "i32", **strides, "si_b": "i64", "si_h": "i64",
               "sb_b": "i64", "sb_h": "i64", "scale": "fp32", "a": "fp32", "w": "fp32", "wd": "fp32", "g": "fp32"}
        for r in (5, 0):
            fixed = {**common, "HAS_V": True, "ROW_TOP": r, "R_PAD": triton.next_power_of_2(max(r, 1)),
                     "HAS_BIAS": False}
            specs += _candidates(attn_fwd_kernel, fwd, fixed, fwd_configs(d, dtype), ty, d, tags)
        fixed = {**common, "HAS_V": True, "ROW_TOP": 0, "R_PAD": 1, "HAS_BIAS": True}  # the given-keys forward
        specs += _candidates(attn_fwd_kernel, {**fwd, "o_ptr": f"*{ty}"}, fixed, given_configs(d, dtype), ty, d, tags)
        specs += _candidates(col_mass_kernel, col, common, col_mass_configs(d, dtype), ty, d, tags)
        for renormalize in (True, False):
            fixed = {**common, "BLOCK_S": SEL_BLOCK, "RECOMPUTE": recompute_below(dtype), "RENORMALIZE": renormalize}
            specs += _candidates(suppress_kernel, sup, fixed, suppress_configs(d, dtype), ty, d, tags)
    for k_pad, largest in itertools.product((16, 64, 256, MAX_TOPK), (True, False)):
        specs += _autotune.candidate_specs(
            f"topk_kernel[K_PAD={k_pad},LARGEST={largest}]", topk_kernel,
            {"score_ptr": "*fp32", "idx_ptr": "*i64", "best_ptr": "*i64", "N": "i32", "k": "i32"}, {"LARGEST": largest},
            topk_configs(k_pad, 4429), {"k_pad": k_pad})
    return specs
