"""R-MDM's tiled Triton forward (rmdm/triton_kernels.py) modeled from its launch geometry, and its H100 roofline.

`tiled_launches` lists every launch of one `recurse_tiled` call with what the interpreter's TritonMonitor
counts for it (programs, bytes of the active lanes loaded and stored) and its FLOPs, 2 m n k of every `tl.dot`
an active program runs at the block sizes (the tensor cores compute the padded tile). Per block evaluation:
  recurse_norm_kernel (x2)  loads the fp32 state (4 B/element), LN w and b once per program, adaLN's shift and scale
                    per row; stores u in the operand dtype
  recurse_linear_kernel     a [M, Kd] read once per column tile, W [N, Kd] and the bias once per row tile; STORE/GELU
                    store [M, N] in the operand dtype; RESIDUAL loads the fp32 state and (adaLN) the gate per
                    element, stores the fp32 state and, after an iteration's last block, the output state
  recurse_attention_kernel  each (query tile, sample, head) program loads its q rows and all T keys and values of its
                    head; stores ctx
The h = x copy to fp32 before the first launch is one aten op (not a Triton launch, not counted here).
tests/test_rmdm_tiled_model.py holds the counts equal to the interpreter's at small awkward shapes.

The predicted H100 time of a call is the sum over its launches of max(bytes / 3.35 TB/s, FLOPs / peak) with
the peak of the products' precision on a GPU (diffkern._dot): bf16/fp16 990 TFLOP/s dense, fp32 inputs at
tf32x3 (torch's default "highest" matmul precision) 165, tf32 495. Bytes are the monitor's (every load an
active lane issues, L2 hits included), so the figure is an upper bound on the HBM side; `unique_bytes` gives
each launch's bytes with every tensor touched once (the minimum), for comparison. Between the two, the L2-aware
time (`l2_launch_seconds`, the backward's model below: minimal bytes through HBM, the monitor's bytes through L2,
FLOPs at peak, the slowest of the three per launch) is the figure the issue's 1 ms bar is judged by. Launch latency
(about 2-4 us a launch without a CUDA graph) is not in the roofline: `launches` says how many there are.

The Triton backward (rmdm/triton_backward.py): `backward_launches` lists its launches (each iteration's recompute,
then 13 per block) with programs, FLOPs, the monitor's loaded and stored bytes and minimal bytes, and
`triton_backward` sums them into its modeled H100 time, where each launch takes the slowest of its minimal bytes
through HBM, its loaded and stored bytes through L2 (roofline.H100_L2_BYTES_PER_S: a tile that many programs re-read
is an L2 hit, not free) and its FLOPs, beside the roofline of the backward's FLOPs alone (the issue's 1.2x bar) and
`aten_backward`'s floor.
"""
from __future__ import annotations

import torch
import triton

from .. import _autotune
from ..rmdm import triton_backward as tb
from ..rmdm import triton_kernels as tk
from .roofline import H100_DOT_FLOPS, H100_HBM_BYTES_PER_S, H100_L2_BYTES_PER_S, dot_peak, dot_precision


def _launch(name, programs, loaded, stored, flops, unique) -> dict:
    return dict(kernel=name, programs=programs, bytes_loaded=loaded, bytes_stored=stored, flops=flops,
                unique_bytes=unique)


def norm_launch(M, d, isz, has_mod, cfg: _autotune.Config) -> dict:
    programs = triton.cdiv(M, cfg.constexprs["BLOCK_M"])
    mod = 2 * M * d * isz if has_mod else 0
    loaded = M * d * 4 + programs * 2 * d * isz + mod
    return _launch("recurse_norm_kernel", programs, loaded, M * d * isz, 0, M * d * (4 + isz) + 2 * d * isz + mod)


def linear_launch(M, N, Kd, isz, epilogue, has_mod, write_state, cfg: _autotune.Config) -> dict:
    bm, bn, bk = (cfg.constexprs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    pm, pn = triton.cdiv(M, bm), triton.cdiv(N, bn)
    operands = M * Kd * isz * pn + (N * Kd + N) * isz * pm
    unique = (M * Kd + N * Kd + N) * isz
    if epilogue == tk.RESIDUAL:
        gate = M * N * isz if has_mod else 0
        loaded, stored = operands + M * N * 4 + gate, M * N * (4 + (isz if write_state else 0))
        unique += M * N * 4 + gate + stored
    else:
        loaded, stored = operands, M * N * isz
        unique += stored
    flops = pm * pn * triton.cdiv(Kd, bk) * 2 * bm * bn * bk
    return _launch("recurse_linear_kernel", pm * pn, loaded, stored, flops, unique)


def attention_launch(B, T, d, heads, isz, cfg: _autotune.Config) -> dict:
    bq, bkv, dh = cfg.constexprs["BLOCK_Q"], cfg.constexprs["BLOCK_KV"], d // heads
    pq = triton.cdiv(T, bq)
    loaded = B * heads * (T * dh + pq * 2 * T * dh) * isz
    flops = B * heads * pq * triton.cdiv(T, bkv) * 2 * (2 * bq * bkv * tk.block_dh(dh))
    return _launch("recurse_attention_kernel", pq * B * heads, loaded, B * T * d * isz, flops, 4 * B * T * d * isz)


def launch_plan(B, T, d, f, heads, K, L, dtype, has_mod) -> list[tuple]:
    """Every launch of recurse_tiled, in order, as (record of a candidate config, the kernel's candidates)."""
    M, isz = B * T, dtype.itemsize
    norm = (lambda c: norm_launch(M, d, isz, has_mod, c), tk.norm_configs(d))

    def linear(N, Kd, epilogue, write_state=False):
        return (lambda c: linear_launch(M, N, Kd, isz, epilogue, has_mod, write_state, c),
                tk.linear_configs(dtype, epilogue, N % 16 == 0 and Kd % 16 == 0))  # torch's allocations: aligned
    attention = (lambda c: attention_launch(B, T, d, heads, isz, c), tk.attention_configs())
    out = []
    for _ in range(L):
        for kb in range(K):
            out += [norm, linear(3 * d, d, tk.STORE), attention, linear(d, d, tk.RESIDUAL), norm,
                    linear(f, d, tk.GELU), linear(d, f, tk.RESIDUAL, kb == K - 1)]
    return out


def tiled_launches(B, T, d, f, heads, K, L, dtype, has_mod) -> list[dict]:
    """Every launch of recurse_tiled at configs[0] (what the interpreter runs)."""
    return [record(configs[0]) for record, configs in launch_plan(B, T, d, f, heads, K, L, dtype, has_mod)]


def by_kernel(launches: list[dict]) -> dict:
    """Per kernel name: launches, programs, bytes_loaded, bytes_stored, flops (TritonMonitor.by_kernel's keys)."""
    out = {}
    for r in launches:
        k = out.setdefault(r["kernel"], dict(launches=0, programs=0, bytes_loaded=0, bytes_stored=0, flops=0))
        k["launches"] += 1
        for key in ("programs", "bytes_loaded", "bytes_stored", "flops"):
            k[key] += r[key]
    return out


def launch_seconds(r: dict, peak: float, unique: bool = False) -> float:
    nbytes = r["unique_bytes"] if unique else r["bytes_loaded"] + r["bytes_stored"]
    return max(nbytes / H100_HBM_BYTES_PER_S, r["flops"] / peak)


def l2_launch_seconds(r: dict, peak: float) -> float:
    """A launch's H100 time with its on-chip traffic: the slowest of its minimal bytes through HBM, every byte its
    programs load or store (the monitor's count: each tile as often as a program touches it) through L2, and its
    FLOPs at `peak`."""
    return max(launch_seconds(r, peak, unique=True), (r["bytes_loaded"] + r["bytes_stored"]) / H100_L2_BYTES_PER_S)


def predicted(B, T, d, f, heads, K, L, dtype, has_mod=False) -> dict:
    """The tiled call's modeled H100 time: at configs[0], and with each launch at its fastest candidate by the
    model (what autotuning approximates) on the monitor's bytes at HBM speed (us_best, an upper bound), on unique
    bytes (us_best_unique, a lower bound) and L2-aware (us_best_l2, l2_launch_seconds as the backward's model: the
    figure the issue's 1 ms bar is judged by); the products at the precision a GPU runs them for `dtype`
    (roofline.dot_precision: fp32 follows torch's matmul precision)."""
    peak = dot_peak(dtype)
    plan = launch_plan(B, T, d, f, heads, K, L, dtype, has_mod)
    first = [record(configs[0]) for record, configs in plan]
    every = [[record(c) for c in configs] for record, configs in plan]
    return dict(
        launches=len(first), precision=dot_precision(dtype),
        flops=sum(r["flops"] for r in first), bytes=sum(r["bytes_loaded"] + r["bytes_stored"] for r in first),
        unique_bytes=sum(r["unique_bytes"] for r in first),
        us_configs0=1e6 * sum(launch_seconds(r, peak) for r in first),
        us_best=1e6 * sum(min(launch_seconds(r, peak) for r in rs) for rs in every),
        us_best_unique=1e6 * sum(min(launch_seconds(r, peak, True) for r in rs) for rs in every),
        us_best_l2=1e6 * sum(min(l2_launch_seconds(r, peak) for r in rs) for rs in every))


# (B, T, d, heads, K, L): the Sudoku bar shape and the benchmark's two cases; f = 4d, no adaLN.
CASES = ((64, 81, 512, 8, 2, 4), (1, 81, 256, 8, 2, 4), (64, 81, 256, 8, 2, 4))


def rmdm_roofline(dtypes=(torch.bfloat16, torch.float32)) -> list[dict]:
    """The modeled H100 time of the tiled forward at CASES, per dtype (one row each)."""
    return [dict(case=f"B={B} T={T} d={d} heads={h} f={4 * d} K={K} L={L}", dtype=str(dt).removeprefix("torch."),
                 **predicted(B, T, d, 4 * d, h, K, L, dt)) for B, T, d, h, K, L in CASES for dt in dtypes]


def aten_backward(B, T, d) -> dict:
    """At the benchmark's heads, f, K and L (bench/rmdm.py): the modeled case against the GPU backward
    (rmdm_recurse_bwd_cuda: ATen ops and cuBLAS). It re-runs every iteration's forward and then computes both
    products of every forward product (bench.rmdm.block_gemms), all in fp32 whatever the inputs' dtype
    (csrc/cpu/rmdm_recurse_bwd.cpp), so its products run at cuBLAS's fp32 peak (tf32 only where
    torch.backends.cuda.matmul.allow_tf32 is set). FLOPs alone then bound its time from below; against the
    bf16 roofline of the same products that bound is the ratio it cannot beat. The elementwise ops between
    (LayerNorm, softmax and gelu backward, residual sums) only add to it."""
    from . import rmdm  # the workload's GEMM list (rmdm imports this module lazily)
    flops = rmdm.RECURSE.flops(rmdm._case(B, T, d))
    total = flops["fwd"] + flops["bwd"]
    floor = {p: 1e6 * total / H100_DOT_FLOPS[p] for p in ("ieee", "tf32", "bf16")}
    return dict(flops=total, us_fp32=floor["ieee"], us_tf32=floor["tf32"], us_bf16_roofline=floor["bf16"],
                ratio_fp32=floor["ieee"] / floor["bf16"], ratio_tf32=floor["tf32"] / floor["bf16"])


def _product_flops(pm, pn, depth, cfg: _autotune.Config) -> int:
    bm, bn, bk = (cfg.constexprs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return pm * pn * triton.cdiv(depth, bk) * 2 * bm * bn * bk


def _dx_launch(M, N, Kd, dtype, gelu) -> dict:
    """recurse_dx_kernel: each row tile reads its dy rows and all of W's columns tile by tile (dy read once per
    column tile, W once per row tile)."""
    cfg, isz = tb.product_config(dtype), dtype.itemsize
    pm, pn = triton.cdiv(M, cfg.constexprs["BLOCK_M"]), triton.cdiv(N, cfg.constexprs["BLOCK_N"])
    z = M * N * isz if gelu else 0
    unique = (M * Kd + Kd * N + M * N) * isz + z
    return _launch("recurse_dx_kernel", pm * pn, (M * Kd * pn + Kd * N * pm) * isz + z, M * N * isz,
                   _product_flops(pm, pn, Kd, cfg), unique)


def _dw_launch(R, N, Kd, dtype) -> dict:
    """recurse_dw_kernel: dy [R, N] read once per column tile of W, x [R, Kd] once per row tile; the fp32
    accumulators dw (and db, by the first column tile) read and written once."""
    cfg, isz = tb.product_config(dtype), dtype.itemsize
    pm, pn = triton.cdiv(N, cfg.constexprs["BLOCK_M"]), triton.cdiv(Kd, cfg.constexprs["BLOCK_N"])
    acc = (N * Kd + N) * 4
    unique = (R * N + R * Kd) * isz + 2 * acc
    return _launch("recurse_dw_kernel", pm * pn, (R * N * pn + R * Kd * pm) * isz + acc, acc,
                   _product_flops(pm, pn, R, cfg), unique)


def _attention_bwd_launch(B, T, d, heads, dtype) -> dict:
    """recurse_attention_bwd_kernel: per (sample, head), a key tile's program reads its k, v rows and every query
    tile's q, dctx, ctx rows and lse; a query tile's program its q, dctx, ctx rows and lse and every key tile's k, v
    rows."""
    c, dh, isz = tb.attention_config(dtype).constexprs, d // heads, dtype.itemsize
    nq, nkv = triton.cdiv(T, c["BLOCK_Q"]), triton.cdiv(T, c["BLOCK_KV"])
    tile = 2 * c["BLOCK_Q"] * c["BLOCK_KV"] * tk.block_dh(dh)
    flops = B * heads * nq * nkv * 7 * tile  # 4 products in a key tile's loop (s, dp, dv, dk), 3 in a query's
    queries = T * (3 * dh * isz + 4)  # q, dctx, ctx and lse of every row of a head
    loaded = B * heads * ((nkv + 1) * queries + (1 + nq) * 2 * T * dh * isz)
    unique = B * T * (3 * d + 2 * d + 3 * d) * isz + B * heads * T * 4  # qkv, ctx, dctx, dqkv, lse
    return _launch("recurse_attention_bwd_kernel", (nq + nkv) * B * heads, loaded, B * T * 3 * d * isz, flops,
                   unique)


def _norm_bwd_launches(B, T, d, dtype, has_mod, second, add_state) -> list[dict]:
    """recurse_norm_bwd_kernel over row tiles of whole rows within its row groups (tb.norm_groups), each program
    reading the [d] vectors (LN w, with adaLN LN b and the scale) for its rows, and the partials' sum."""
    cfg, M, isz = tb.norm_config(d), B * T, dtype.itemsize
    groups, rows = tb.norm_groups(B, T, has_mod)
    nt = triton.cdiv(rows, cfg.constexprs["BLOCK_M"])
    programs = nt * groups
    n_q = 2 if not has_mod else (tb.N_PARTIALS if second else 4)
    parts = programs * n_q * d * 4
    vectors = (1 + 2 * int(has_mod)) * d * isz
    gate = M * d * isz if has_mod else 0  # adaLN's gate, loaded per element (a sample's [d] row)
    # h (fp32); du and res in the operand dtype; dstate, a and y (adaLN, after LN2)
    rows_in = M * d * (4 + 2 * isz) + M * d * isz * (int(add_state) + (2 if has_mod and second else 0))
    rows_out = M * d * isz * (1 + int(has_mod))  # dh, dy (adaLN)
    unique = (2 * d + (2 * B * d if has_mod else 0)) * isz + rows_in + rows_out + parts
    pc = tb.PARTIALS.constexprs
    sums = 2 * d * 4 + (n_q - 2) * groups * d * 4  # the accumulators' rows: read, added to, written
    return [_launch("recurse_norm_bwd_kernel", programs, programs * vectors + gate + rows_in, rows_out + parts, 0,
                    unique),
            _launch("recurse_partials_kernel", triton.cdiv(d, pc["BLOCK_D"]) * n_q * groups,
                    parts + sums, sums, 0, parts + 2 * sums)]


def _recompute_launches(B, T, d, f, heads, K, dtype, has_mod, peak=None) -> list[dict]:
    """One iteration's recompute (triton_backward._recompute): the forward's launches at configs[0] (what the
    interpreter runs), or with `peak` each at its fastest candidate by l2_launch_seconds (what a GPU's autotuner
    approximates; aligned launches, as torch allocates, where the widths are 16-divisible), with the stores the
    backward keeps (z, lse, and with adaLN a and y); the last block forms y only (with adaLN)."""
    M, isz = B * T, dtype.itemsize

    def pick(record, configs):
        if peak is None:
            return record(configs[0])
        return min(map(record, configs), key=lambda r: l2_launch_seconds(r, peak))
    out = []
    for kb in range(K):
        norm = pick(lambda c: norm_launch(M, d, isz, has_mod, c), tk.norm_configs(d))
        att = pick(lambda c: attention_launch(B, T, d, heads, isz, c), tk.attention_configs())
        def linear(N, Kd, epilogue, mod=has_mod):
            aligned = peak is not None and N % 16 == 0 and Kd % 16 == 0
            return pick(lambda c: linear_launch(M, N, Kd, isz, epilogue, mod, False, c),
                        tk.linear_configs(dtype, epilogue, aligned))
        launches = [norm, linear(3 * d, d, tk.STORE), att, linear(d, d, tk.RESIDUAL), dict(norm), linear(f, d, tk.GELU)]
        if kb < K - 1:
            launches.append(linear(d, f, tk.RESIDUAL))
        elif has_mod:
            launches.append(linear(d, f, tk.STORE, False))
        kept = {5: M * f * isz, 2: B * heads * T * 4}  # z, lse
        if has_mod:
            kept[3] = M * d * isz  # a
            if kb < K - 1:
                kept[6] = M * d * isz  # y
        for i, n in kept.items():
            launches[i]["bytes_stored"] += n
            launches[i]["unique_bytes"] += n
        out += launches
    return out


def backward_launches(B, T, d, f, heads, K, L, dtype, has_mod=False, peak=None) -> list[dict]:
    """Every Triton launch of one triton_backward.recurse_bwd call, in order, each with its programs, FLOPs (2 m n k of
    every tl.dot an active program runs at the block sizes), the bytes its programs load and store (every tile each
    program touches, L2 hits included) as the interpreter's TritonMonitor counts them, and its minimal bytes
    (unique_bytes: each tensor the launch touches once). tests/test_rmdm_triton_backward.py holds all but the last
    equal to the interpreter's. With `peak`, the recompute's launches at their fastest candidates
    (_recompute_launches)."""
    M = B * T
    out = []
    for it in reversed(range(L)):
        out += _recompute_launches(B, T, d, f, heads, K, dtype, has_mod, peak)
        for kb in reversed(range(K)):
            out += [_dw_launch(M, d, f, dtype), _dx_launch(M, f, d, dtype, True), _dw_launch(M, f, d, dtype),
                    _dx_launch(M, d, f, dtype, False), *_norm_bwd_launches(B, T, d, dtype, has_mod, True, False),
                    _dw_launch(M, d, d, dtype), _dx_launch(M, d, d, dtype, False),
                    _attention_bwd_launch(B, T, d, heads, dtype), _dw_launch(M, 3 * d, d, dtype),
                    _dx_launch(M, d, 3 * d, dtype, False),
                    *_norm_bwd_launches(B, T, d, dtype, has_mod, False, kb == 0 and it > 0)]
    return out


def triton_backward(B, T, d, f, heads, K, L, dtype, has_mod=False) -> dict:
    """The Triton backward's modeled H100 time: the sum over its launches of l2_launch_seconds (minimal bytes
    through HBM, loaded and stored bytes through L2, FLOPs at the products' precision's peak), against the roofline
    of the backward's exact FLOPs alone (three times the forward's products, the figure aten_backward holds the ATen
    backward to) at the same peak; ratio: modeled / roofline (the issue's bar: 1.2). us_hbm: the same sum without
    the L2 term (what a model of minimal bytes alone predicts); us_tuned, ratio_tuned: with the recompute's forward
    launches at their fastest candidates, as an autotuning GPU runs them (the backward's own kernels have one
    configuration each). Launch latency is not in it: `launches` says how many there are."""
    from . import rmdm  # the workload's GEMM list (rmdm imports this module lazily)
    peak = dot_peak(dtype)
    launches = backward_launches(B, T, d, f, heads, K, L, dtype, has_mod)
    exact = rmdm.RECURSE.flops(rmdm._case(B, T, d))
    roofline = 1e6 * (exact["fwd"] + exact["bwd"]) / peak
    modeled = 1e6 * sum(l2_launch_seconds(r, peak) for r in launches)
    tuned = 1e6 * sum(l2_launch_seconds(r, peak)
                      for r in backward_launches(B, T, d, f, heads, K, L, dtype, has_mod, peak))
    return dict(launches=len(launches), precision=dot_precision(dtype), flops=sum(r["flops"] for r in launches),
                unique_bytes=sum(r["unique_bytes"] for r in launches),
                l2_bytes=sum(r["bytes_loaded"] + r["bytes_stored"] for r in launches), us_modeled=modeled,
                us_hbm=1e6 * sum(launch_seconds(r, peak, unique=True) for r in launches), us_roofline=roofline,
                ratio=modeled / roofline, us_tuned=tuned, ratio_tuned=tuned / roofline)


if __name__ == "__main__":
    for row in rmdm_roofline():
        print(row)
    print("ATen backward, B=64 T=81 d=512 K=2 L=4:", aten_backward(64, 81, 512))
    for dt in (torch.bfloat16, torch.float32):
        print(f"Triton backward {dt}, B=64 T=81 d=512 K=2 L=4:", triton_backward(64, 81, 512, 2048, 8, 2, 4, dt))
