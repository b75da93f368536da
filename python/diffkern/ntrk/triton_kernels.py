"""Triton kernels of NoiseTilt (specs/ntrk.md) and their launchers.

ntrk_step_kernel: x = mu + a_i w + b_i eps over chunks of BLOCK-element tiles, one program per
  (sample, chunk); a_i = sigma_i sqrt(rho_i), b_i = sigma_i sqrt(1 - rho_i). eps is read, or drawn
  in-kernel at (seed, offset + flat index), both read from the int64 philox tensor: tl.randint4x's
  Philox words and philox.h's normal transform.
  Moves (2 or 3) + 1 latents: mu, w (, eps) read once, x written once.

2OS projection, one pass = three launches over a sample's N = M * D entries (y: [B, M, D] fp32):
  row_sort_kernel   ROWS tiles per program: each tile's D entries sorted as packed (value, column)
                    int64 keys; writes the rank-major sorted values s[b, j, m] and the columns perm[b, m, j]
  col_sort_kernel   one CHUNK of one rank column s[b, j, :] per program, sorted as (value, tile) keys
  clip_kernel       per key of a chunk: its rank r across the whole column (its place in its chunk +
                    a branch-free binary search in every other chunk), the band [lower, upper][r, j],
                    the in-band count, the clipped value scattered back to y[b, m, perm[b, m, j]]
A column never has to fit one program: M is cut into CHUNKs (video latents: M = 8190 tiles of 256).
Bytes per entry and pass: row (input) + 6, col 4 + 8, clip 8 + 2 + 8 (band gathers) + 4 + 8 (LOG_CHUNK + 1)
per other chunk (the binary search's gathers, L2-resident): bench/ntrk_model.py, tested against the
interpreter's counts.

Autotuning (diffkern._autotune; the first candidate is what the interpreter runs): every candidate gives the same
bits. ntrk_step_kernel is elementwise (eps drawn at each element's own Philox offset), so its tile and warps are
free (STEP_CONFIGS). The 2OS kernels sort keys that are unique (value packed with its position) and count in
int32, so their results do not depend on the layout: SORT_CONFIGS tries 4 and 8 warps for each.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _autotune, _checks, _dtypes, _triton
from .._autotune import Config, bucket, candidate_specs
from .._triton import KernelSpec

# ntrk_step: 1024 elements at 8 per thread (4 warps); three live fp32 tiles (or two and the Philox state).
BLOCK, NUM_WARPS = 1024, 4
STEP_CONFIGS = (Config({"BLOCK": BLOCK}, NUM_WARPS), Config({"BLOCK": 2 * BLOCK}, NUM_WARPS),
                Config({"BLOCK": 2 * BLOCK}, 2 * NUM_WARPS))
# 2OS: packed int64 keys per program. ROW_KEYS keys (ROWS tiles of BLOCK_D) and COL_CHUNK keys per
# sort keep 8-16 keys per thread at 4 warps: tl.sort's shuffles then stay in registers (no spills on
# sm_80/sm_90a, tests/test_kernels_compile.py). The tile D is held in one program, so D <= MAX_TILE.
ROW_KEYS, COL_CHUNK, SORT_WARPS, MAX_TILE = 2048, 1024, 4, 1024
KEY_PAD = tl.constexpr(2**63 - 1)  # sorts after every real key
SORT_CONFIGS = (Config(num_warps=SORT_WARPS), Config(num_warps=2 * SORT_WARPS))


@triton.jit
def _cos_2pi(u):
    """cos(2 pi u), u in [0, 1): csrc/include/diffkern/philox.h's cos_2pi (no libdevice cosf: no stack)."""
    q = 4.0 * u
    k = tl.floor(q + 0.5)
    f = (q - k) * 1.5707963267948966
    f2 = f * f
    c = 1.0 + f2 * (-0.5 + f2 * (4.1666666666666664e-2 + f2 * (-1.3888888888888889e-3 + f2 * 2.4801587301587302e-5)))
    s = f * (1.0 + f2 * (-0.16666666666666666 + f2 * (8.3333333333333332e-3 + f2 * (-1.9841269841269841e-4
                                                                                     + f2 * 2.7557319223985893e-6))))
    quadrant = k.to(tl.int32) & 3
    return tl.where(quadrant == 0, c, tl.where(quadrant == 1, -s, tl.where(quadrant == 2, -c, s)))


@triton.jit
def _uniform(r):
    i = r.to(tl.int32, bitcast=True)
    return tl.where(i < 0, ~i, i).to(tl.float32) * 4.6566127342e-10


@triton.jit
def _randn(seed, offset):
    """N(0, 1) at int64 offsets of stream seed: philox.h's randn (Box-Muller on tl.randint4x's words)."""
    r0, r1, _, _ = tl.randint4x(seed, offset)
    u1 = tl.maximum(_uniform(r0), 1.0e-7)
    return tl.sqrt(-2.0 * tl.log(u1)) * _cos_2pi(_uniform(r1))


@triton.jit
def ntrk_step_kernel(mu_ptr, w_ptr, eps_ptr, x_ptr, sigma_ptr, rho_ptr, philox_ptr, D, n_chunks, tiles_per_chunk,
                     HAS_EPS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = pid // n_chunks
    sigma = tl.load(sigma_ptr + i)
    rho = tl.load(rho_ptr + i)
    a = sigma * tl.sqrt(rho)
    b = sigma * tl.sqrt(1.0 - rho)
    if not HAS_EPS:
        seed = tl.load(philox_ptr)
        offset = tl.load(philox_ptr + 1)
    for k in range(tiles_per_chunk):
        e = ((pid % n_chunks) * tiles_per_chunk + k).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        offs = i.to(tl.int64) * D + e
        mask = e < D
        mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_EPS:
            eps = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            eps = _randn(seed, offset + offs)
        tl.store(x_ptr + offs, (mu + a * w + b * eps).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _packed_key(v, position):
    """(order-preserving int32 of v, position) as one int64 whose signed order is that lexicographic order.
    Every NaN becomes the positive quiet NaN, which orders above +inf: NaNs sort last, as torch.sort's."""
    v = tl.where(v != v, float("nan"), v)
    bits = (v + 0.0).to(tl.int32, bitcast=True)  # + 0.0 folds -0.0 onto +0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | position.to(tl.int64)


@triton.jit
def _key_value(key):
    ordered = (key >> 32).to(tl.int32)
    return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def row_sort_kernel(y_ptr, sorted_ptr, perm_ptr, M, D, n_row_blocks, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_row_blocks).to(tl.int64)
    rows = ((pid % n_row_blocks) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_D).to(tl.int64)[None, :]
    mask = (rows < M) & (cols < D)
    # tl.cast, not M.to: a launch with M == 1 passes M as the constexpr 1, a Python int with no .to
    N = tl.cast(M, tl.int64) * D
    v = tl.load(y_ptr + b * N + rows * D + cols, mask=mask, other=0.0).to(tl.float32)
    keys = tl.sort(tl.where(mask, _packed_key(v, cols), KEY_PAD), dim=1)
    tl.store(sorted_ptr + b * N + cols * M + rows, _key_value(keys), mask=mask)
    tl.store(perm_ptr + b * N + rows * D + cols, (keys & 0xFFFFFFFF).to(tl.int16), mask=mask)


@triton.jit
def col_sort_kernel(sorted_ptr, keys_ptr, M, n_chunks, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    col = (pid // n_chunks).to(tl.int64)
    m = (pid % n_chunks) * CHUNK + tl.arange(0, CHUNK)
    mask = m < M
    v = tl.load(sorted_ptr + col * M + m, mask=mask, other=0.0)
    keys = tl.sort(tl.where(mask, _packed_key(v, m), KEY_PAD))
    # the chunk's real keys sort first, into the same slots the mask selects
    tl.store(keys_ptr + col * M + m, keys, mask=mask)


@triton.jit
def _count_below(keys_ptr, base, start, M, key, valid, CHUNK: tl.constexpr, LOG_CHUNK: tl.constexpr):
    """How many keys of the sorted chunk at keys_ptr[base + start ...] (its part below M) are < key.

    A probe past M reads key M - 1 and counts as KEY_PAD: every valid lane loads at every step, so the
    kernel's accesses do not depend on the data (bench/ntrk_model.py counts them)."""
    pos = tl.zeros(key.shape, tl.int32)
    for s in tl.static_range(LOG_CHUNK):
        step = CHUNK >> (s + 1)
        at = start + pos + (step - 1)
        probe = tl.load(keys_ptr + base + tl.minimum(at, M - 1), mask=valid)
        pos = tl.where((at < M) & (probe < key), pos + step, pos)
    at = start + pos
    last = tl.load(keys_ptr + base + tl.minimum(at, M - 1), mask=valid)
    return pos + ((at < M) & (last < key)).to(tl.int32)


@triton.jit
def clip_kernel(keys_ptr, perm_ptr, lower_ptr, upper_ptr, y_ptr, count_ptr, M, D, n_chunks, CLIP: tl.constexpr,
                CHUNK: tl.constexpr, LOG_CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    col = (pid // n_chunks).to(tl.int64)
    k = pid % n_chunks
    b, j = col // D, col % D
    i = tl.arange(0, CHUNK)
    valid = k * CHUNK + i < M
    base = col * M
    key = tl.load(keys_ptr + base + k * CHUNK + i, mask=valid, other=KEY_PAD)
    rank = i
    for kk in range(n_chunks):
        if kk != k:
            rank += _count_below(keys_ptr, base, kk * CHUNK, M, key, valid, CHUNK, LOG_CHUNK)
    v = _key_value(key)
    band = rank.to(tl.int64) * D + j
    lo = tl.load(lower_ptr + band, mask=valid, other=0.0)
    hi = tl.load(upper_ptr + band, mask=valid, other=0.0)
    tl.store(count_ptr + pid, tl.sum((valid & (v >= lo) & (v <= hi)).to(tl.int32), 0))
    if CLIP:  # a NaN entry stays NaN (the reference's torch.minimum/maximum), never clipped into its band
        v = tl.minimum(tl.maximum(v, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)
    m = (key & 0xFFFFFFFF).to(tl.int64)
    N = tl.cast(M, tl.int64) * D  # tl.cast: M may be the constexpr 1 (row_sort_kernel)
    c = tl.load(perm_ptr + b * N + m * D + j, mask=valid, other=0).to(tl.int64)
    tl.store(y_ptr + b * N + m * D + c, v, mask=valid)


def ntrk_step(mu, sigma, w, rho, eps, philox):
    """Launches ntrk_step_kernel: x in mu's dtype."""
    x = _triton.empty(mu.shape, mu.dtype, mu.device)
    B = mu.shape[0]
    D = mu.numel() // B if B else 0
    if B == 0 or D == 0:
        return x
    sigma, rho = sigma.float().contiguous(), rho.float().contiguous()

    def launch(config):
        n_tiles = triton.cdiv(D, config.constexprs["BLOCK"])
        per_chunk = _triton.tiles_per_chunk(B, n_tiles, mu.device)
        n_chunks = triton.cdiv(n_tiles, per_chunk)
        return ntrk_step_kernel[(B * n_chunks,)](mu, w, mu if eps is None else eps, x, sigma, rho,
                                                 mu if philox is None else philox, D, n_chunks, per_chunk,
                                                 HAS_EPS=eps is not None, **config.meta())

    key = (_dtypes.name(mu.dtype), eps is not None, bucket(B * D))
    launch(_autotune.pick("ntrk_step_kernel", key, STEP_CONFIGS, launch, kernel=ntrk_step_kernel))
    return x


def row_geometry(D: int) -> tuple[int, int]:
    """(ROWS, BLOCK_D) of row_sort_kernel for tiles of D."""
    block_d = triton.next_power_of_2(D)
    return max(1, ROW_KEYS // block_d), block_d


def col_chunk(M: int) -> int:
    return min(COL_CHUNK, triton.next_power_of_2(M))


def twoos_project(x, lower, upper, max_passes):
    """Launches the three 2OS kernels per pass: (out in x's dtype, in_set [B] fp32)."""
    B, (M, D) = x.shape[0], lower.shape
    if D > MAX_TILE:
        raise ValueError(f"twoos_project: the triton backend sorts a tile in one program and takes tiles of at most "
                         f"{MAX_TILE} entries, got D = {D}; use the cpu backend")
    N, dev = M * D, x.device
    if B == 0:
        return x.new_empty(x.shape), _triton.empty((0,), torch.float32, dev)
    y = _triton.empty((B, N), torch.float32, dev)
    sorted_t = _triton.empty((B, D, M), torch.float32, dev)
    perm = torch.empty((B, M, D), dtype=torch.int16, device=dev)
    keys = torch.empty((B, D, M), dtype=torch.int64, device=dev)
    rows, block_d = row_geometry(D)
    n_row_blocks = triton.cdiv(M, rows)
    chunk = col_chunk(M)
    n_chunks = triton.cdiv(M, chunk)
    counts = torch.empty((B, D * n_chunks), dtype=torch.int32, device=dev)
    for p in range(max_passes + 1):
        source, clip = x if p == 0 else y, p < max_passes
        _launch_tuned("row_sort_kernel", (_dtypes.name(source.dtype), block_d, bucket(B * M)), lambda meta: (
            row_sort_kernel[(B * n_row_blocks,)](source, sorted_t, perm, M, D, n_row_blocks, ROWS=rows,
                                                 BLOCK_D=block_d, **meta)), row_sort_kernel)
        _launch_tuned("col_sort_kernel", (chunk, bucket(B * D * M)), lambda meta: (
            col_sort_kernel[(B * D * n_chunks,)](sorted_t, keys, M, n_chunks, CHUNK=chunk, **meta)), col_sort_kernel)
        _launch_tuned("clip_kernel", (clip, chunk, bucket(n_chunks), bucket(B * D * M)), lambda meta: (
            clip_kernel[(B * D * n_chunks,)](keys, perm, lower, upper, y, counts, M, D, n_chunks, CLIP=clip,
                                             CHUNK=chunk, LOG_CHUNK=chunk.bit_length() - 1, **meta)), clip_kernel)
        inside = counts.sum(1)
        # the early exit reads the counts on the host; under CUDA-graph capture every pass runs instead
        # (a pass after every sample is in the set clips nothing and leaves y as it is)
        if p == max_passes or (_checks.values_readable(inside) and bool((inside == N).all())):
            break
    return y.reshape(x.shape).to(x.dtype), inside.float() / N


def _launch_tuned(name: str, key: tuple, launch_meta, kernel) -> None:
    """Launches a 2OS kernel (launch_meta(meta) launches it with the launch options `meta`) with the
    SORT_CONFIGS candidate that _autotune picks for `key`."""
    def launch(config):
        return launch_meta(config.meta())
    launch(_autotune.pick(name, key, SORT_CONFIGS, launch, kernel=kernel))


def aot_specs() -> list[KernelSpec]:
    """Every launch configuration: the step per dtype and HAS_EPS; the 2OS kernels per tile / chunk size; each
    with every autotune candidate."""
    specs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ty = _triton.TRITON_DTYPE[dtype]
        p = f"*{ty}"
        for has_eps in (False, True):
            specs += candidate_specs(
                f"ntrk_step_kernel[{ty},HAS_EPS={has_eps}]", ntrk_step_kernel,
                {"mu_ptr": p, "w_ptr": p, "eps_ptr": p, "x_ptr": p, "sigma_ptr": "*fp32", "rho_ptr": "*fp32",
                 "philox_ptr": "*i64", "D": "i32", "n_chunks": "i32", "tiles_per_chunk": "i32",
                 "HAS_EPS": "constexpr", "BLOCK": "constexpr"},
                {"HAS_EPS": has_eps}, STEP_CONFIGS, {"dtype": _dtypes.name(dtype), "op": "step"})
        for D in (32, 128, 256, 1024):
            rows, block_d = row_geometry(D)
            specs += candidate_specs(
                f"row_sort_kernel[{ty},BLOCK_D={block_d}]", row_sort_kernel,
                {"y_ptr": p, "sorted_ptr": "*fp32", "perm_ptr": "*i16", "M": "i32", "D": "i32", "n_row_blocks": "i32",
                 "ROWS": "constexpr", "BLOCK_D": "constexpr"},
                {"ROWS": rows, "BLOCK_D": block_d}, SORT_CONFIGS, {"dtype": _dtypes.name(dtype), "op": "row",
                                                                   "block_d": block_d})
    for chunk in (64, 256, COL_CHUNK):
        specs += candidate_specs(
            f"col_sort_kernel[CHUNK={chunk}]", col_sort_kernel,
            {"sorted_ptr": "*fp32", "keys_ptr": "*i64", "M": "i32", "n_chunks": "i32", "CHUNK": "constexpr"},
            {"CHUNK": chunk}, SORT_CONFIGS, {"op": "col", "chunk": chunk})
        for clip in (False, True):
            specs += candidate_specs(
                f"clip_kernel[CLIP={clip},CHUNK={chunk}]", clip_kernel,
                {"keys_ptr": "*i64", "perm_ptr": "*i16", "lower_ptr": "*fp32", "upper_ptr": "*fp32", "y_ptr": "*fp32",
                 "count_ptr": "*i32", "M": "i32", "D": "i32", "n_chunks": "i32", "CLIP": "constexpr",
                 "CHUNK": "constexpr", "LOG_CHUNK": "constexpr"},
                {"CLIP": clip, "CHUNK": chunk, "LOG_CHUNK": chunk.bit_length() - 1}, SORT_CONFIGS,
                {"op": "clip", "chunk": chunk, "clip": clip})
    return specs
