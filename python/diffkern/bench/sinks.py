"""Attention-sink benchmark: `python -m diffkern.bench.sinks --out results [--quick]`.

A forward-only op does not fit the fwd/bwd workload model of the main harness, so this is its own
report section (sinks.md and sinks.json in --out):
  1. CPU: peak extra memory and median time of sink_attention (per-head top-1, statistics on, C++ backend) and of
     sink_attention_given (one key per head given, "given") against the explicit-matrix reference (the
     authors' way: the whole fp32 probability matrix), at SD3-like shapes B=2, H=24, d=64, N_k = N_q + 333.
     Each point runs in its own child process; peak extra memory = the child's peak RSS minus its RSS once
     the inputs exist. Explicit points whose matrices would not fit this shared machine are modeled (their
     matrix size), not run.
  2. Modeled GPU (bf16, SD3 shapes): FLOPs and memory traffic of the four Triton kernels against one
     plain flash-attention forward, from `kernel_traffic` (the kernels' loop structure; the tests hold
     it equal to the interpreter's counted bytes), and the modeled H100 time; and of the given-keys path
     (sink_attention_given: keys known before the call, one biased flash forward, `given_traffic`).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import triton

from .roofline import H100_HBM_BYTES_PER_S, dot_peak

B, H, D, N_TEXT = 2, 24, 64, 333
# The explicit reference holds ~4 fp32 [B, H, N_q, N_k] tensors at once; run it only below this.
EXPLICIT_MAX_BYTES = 6e9


def default_tiles(d, dtype) -> dict:
    """(BLOCK_M, BLOCK_N) per kernel of the configuration the CPU tests run (each candidate list's first)."""
    from ..sinks import triton_kernels as tk
    return {name: (c.constexprs["BLOCK_M"], c.constexprs["BLOCK_N"])
            for name, c in (("attn_fwd_kernel", tk.fwd_configs(d, dtype)[0]),
                            ("col_mass_kernel", tk.col_mass_configs(d, dtype)[0]),
                            ("suppress_kernel", tk.suppress_configs(d, dtype)[0]))}


def _tile_flops(m, n, d, bm, bn, products=1) -> int:
    """2 m n k of every tl.dot the programs run: `products` [bm, BLOCK_D] x [BLOCK_D, bn]-sized products (or
    the transposed pair) per (row tile, column tile) of an m x n grid, padded tiles and head_dim included."""
    return 2 * products * triton.cdiv(m, bm) * bm * triton.cdiv(n, bn) * bn * max(16, triton.next_power_of_2(d))


def kernel_traffic(N_q, N_k, d, n_query, K, n_rows, itemsize, tiles, sel_block, topk_cfg, row_top=0):
    """Per (b, h) (top-k: per score row), the bytes each kernel loads and stores, as the kernels issue
    them (active lanes; re-reads across programs counted each time), the HBM bytes if every re-read hits the
    L2 (hbm: each distinct byte moved once), and their tl.dot FLOPs (2 m n k per product, padded tiles
    included); tiles: (BLOCK_M, BLOCK_N) per kernel (default_tiles); row_top: the
    probabilities per row the forward keeps (5 with the statistics). suppress_kernel's flagged tiles
    (recompute_traffic) are data-dependent and left out."""
    (fm, fn), (cm, cn), (sm, _) = (tiles[k] for k in ("attn_fwd_kernel", "col_mass_kernel", "suppress_kernel"))
    t_q, t_k, t_r = triton.cdiv(N_q, fm), triton.cdiv(N_k, cn), triton.cdiv(n_rows, sm)
    block, k_pad = topk_cfg
    chunks = triton.cdiv(N_k, block - k_pad)
    qkv, o32 = (N_q + 2 * N_k) * d * itemsize, N_q * d * 4
    return {
        "attn_fwd_kernel": dict(loaded=(N_q + 2 * t_q * N_k) * d * itemsize,
                                stored=o32 + (2 + row_top) * N_q * 4, hbm=qkv + o32 + (2 + row_top) * N_q * 4,
                                flops=_tile_flops(N_q, N_k, d, fm, fn, 2)),
        "col_mass_kernel": dict(loaded=N_k * d * itemsize + t_k * n_query * (d * itemsize + 4), stored=N_k * 4,
                                hbm=N_k * (d * itemsize + 4) + n_query * (d * itemsize + 4),
                                flops=_tile_flops(n_query, N_k, d, cm, cn)),
        "topk_kernel": dict(loaded=N_k * 4 + (chunks * k_pad + K) * 8, stored=((chunks + 1) * k_pad + K) * 8,
                            hbm=N_k * 4 + K * 8, flops=0),
        "suppress_kernel": dict(loaded=N_q * d * 4 + n_rows * (d * itemsize + 4) + t_r * K * (8 + 2 * d * itemsize),
                                stored=N_q * d * itemsize + n_rows * 4,
                                hbm=o32 + n_rows * (d * itemsize + 8) + K * (8 + 2 * d * itemsize) + N_q * d * itemsize,
                                flops=_tile_flops(n_rows, K, d, sm, sel_block, 2)),
    }


def recompute_traffic(flagged, N_k, d, itemsize, tile):
    """What one suppress_kernel tile (BLOCK_M, BLOCK_N) = `tile` with `flagged` rows (rows whose suppressed keys
    hold more than 1 - recompute_below(dtype) of their mass) adds to kernel_traffic: the masked softmax loads the
    first selected index, then per key the bias row (fp32), k and v, and the flagged rows do not read o; and its
    tl.dot FLOPs. Data-dependent, so kernel_traffic leaves it out: the modeled traffic is that of inputs where no
    row is recomputed."""
    bm, bn = tile
    return dict(loaded=8 + N_k * (4 + 2 * d * itemsize) - flagged * d * 4, stored=0,
                flops=_tile_flops(bm, N_k, d, bm, bn, 2))


# Passes over the fp32 [B, G, N_k] key bias row that sink_attention_given's launcher makes with ATen before its
# one kernel (full, scatter_reduce_ read and write, == and all, where read and write: ~7 x 4 bytes per key).
KEY_ROW_BYTES_PER_KEY = 7 * 4


def given_traffic(N_q, N_k, d, itemsize, tile):
    """Per (b, h): attn_fwd_kernel with the key bias (HAS_BIAS), the given-keys path's one kernel, as it issues
    its loads and stores (q once; k, v and the fp32 bias row once per query tile; the output once in q's dtype,
    no lse), its HBM bytes (each distinct byte once, plus the launcher's ATen passes over the bias row, counted
    per (b, h): a per-sample set shares one row over the heads) and its tl.dot FLOPs; tile: the forward's
    (BLOCK_M, BLOCK_N)."""
    bm, bn = tile
    t_q = triton.cdiv(N_q, bm)
    return dict(loaded=(N_q + 2 * t_q * N_k) * d * itemsize + t_q * N_k * 4, stored=N_q * d * itemsize,
                hbm=(2 * N_q + 2 * N_k) * d * itemsize + N_k * (4 + KEY_ROW_BYTES_PER_KEY),
                flops=_tile_flops(N_q, N_k, d, bm, bn, 2))


def plain_flash(N_q, N_k, d, itemsize, tile):
    """One flash-attention forward at the forward's tile (q once, k and v once per query tile, o and lse
    written)."""
    bm, bn = tile
    t_q = triton.cdiv(N_q, bm)
    return dict(loaded=(N_q + 2 * t_q * N_k) * d * itemsize, stored=N_q * (d * itemsize + 4),
                hbm=(2 * N_q + 2 * N_k) * d * itemsize + N_q * 4, flops=_tile_flops(N_q, N_k, d, bm, bn, 2))


def modeled_rows(sizes, K=1):
    """K selected keys per (b, h): k_sink per head, or k_sink * H shared (head-union; its top-k then has
    B rows, not B * H: counted as B * H here, an overcount of a few KB); with the statistics (the forward
    stores each row's top-5)."""
    import torch

    from ..sinks import triton_kernels as tk
    from ..sinks.op import STATS_ROW_TOP
    rows = []
    for n in sizes:
        N_k = n + N_TEXT
        tiles, peak = default_tiles(D, torch.bfloat16), dot_peak(torch.bfloat16)
        per = kernel_traffic(n + N_TEXT, N_k, D, n, K, n, 2, tiles, tk.SEL_BLOCK, tk.topk_config(K, N_k)[:2],
                             STATS_ROW_TOP)
        # every kernel runs once per (b, h): the per-head top-k has B * H score rows too
        ours = {k: sum(v[k] for v in per.values()) * B * H for k in ("loaded", "stored", "hbm", "flops")}
        plain = {k: v * B * H for k, v in plain_flash(n + N_TEXT, N_k, D, 2, tiles["attn_fwd_kernel"]).items()}
        rows.append(_row("selection in the call", n, K, ours, plain, peak))
    return rows


def modeled_given_rows(sizes, K=1):
    """modeled_rows' figures for sink_attention_given (the keys known before the call): one biased flash forward,
    whatever K (the bias row has N_k entries)."""
    import torch

    from ..sinks import triton_kernels as tk
    rows = []
    for n in sizes:
        N_k = n + N_TEXT
        tile, peak = tk.given_configs(D, torch.bfloat16)[0].constexprs, dot_peak(torch.bfloat16)
        traffic = given_traffic(n + N_TEXT, N_k, D, 2, (tile["BLOCK_M"], tile["BLOCK_N"]))
        ours = {k: v * B * H for k, v in traffic.items()}
        plain = {k: v * B * H for k, v in plain_flash(n + N_TEXT, N_k, D, 2, default_tiles(D, torch.bfloat16)[
            "attn_fwd_kernel"]).items()}
        rows.append(_row("given keys", n, K, ours, plain, peak))
    return rows


def _row(path, n, K, ours, plain, peak) -> dict:
    """One modeled row: totals `ours` and one flash forward's `plain` (loaded, stored, hbm, flops) at n image
    tokens."""
    N_k = n + N_TEXT
    ob, pb = ours["loaded"] + ours["stored"], plain["loaded"] + plain["stored"]
    return dict(path=path, N_q=n + N_TEXT, N_k=N_k, n_query=n, K=K, flops=ours["flops"], plain_flops=plain["flops"],
                flops_ratio=ours["flops"] / plain["flops"], bytes=ob, plain_bytes=pb, bytes_ratio=ob / pb,
                hbm_bytes=ours["hbm"], plain_hbm_bytes=plain["hbm"],
                h100_us=max(ours["hbm"] / H100_HBM_BYTES_PER_S, ours["flops"] / peak) * 1e6,
                plain_h100_us=max(plain["hbm"] / H100_HBM_BYTES_PER_S, plain["flops"] / peak) * 1e6,
                explicit_matrix_bytes=B * H * (n + N_TEXT) * N_k * 4)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(kind: str, n_img: int, repeats: int) -> dict:
    """Runs in a child process: one candidate at one size; peak extra memory and median time."""
    import torch

    import diffkern
    from diffkern.sinks import reference
    torch.set_num_threads(os.cpu_count())
    g = torch.Generator().manual_seed(0)
    N = n_img + N_TEXT
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    scale = D ** -0.5

    def explicit():
        mass = reference.sink_mass(q, k, n_img, scale)[0]
        idx = reference.sink_topk(mass, 1, True)
        return reference.sink_suppress(q, k, v, None, None, idx, n_img, scale, -1e4)[0]

    def fused():
        with torch.no_grad(), diffkern.backend("cpu"):
            return diffkern.sink_attention(q, k, v, k_sink=1, n_query=n_img, return_stats=True)

    idx = torch.randint(0, N, (B, H, 1), generator=g)

    def given():  # one key per head known before the call
        with torch.no_grad(), diffkern.backend("cpu"):
            return diffkern.sink_attention_given(q, k, v, idx, n_query=n_img)
    fn = {"explicit": explicit, "diffkern": fused, "given": given}[kind]
    base = _rss_bytes()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(kind=kind, N_q=N, peak_extra_mb=(peak - base) / 1e6, median_ms=sorted(times)[len(times) // 2] * 1e3)


def cpu_rows(sizes, repeats: int, log=print):
    rows = []
    for n in sizes:
        N = n + N_TEXT
        for kind in ("diffkern", "given", "explicit"):
            if kind == "explicit" and 4 * B * H * N * N * 4 > EXPLICIT_MAX_BYTES:
                need = 4 * B * H * N * N * 4 / 1e9
                rows.append(dict(kind=kind, N_q=N, skipped=f"needs ~{need:.1f} GB (4 fp32 N_q x N_k tensors); "
                                                          "not run on this shared machine"))
                continue
            cmd = [sys.executable, "-m", "diffkern.bench.sinks", "--child", kind, str(n), str(repeats)]
            run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TRITON_INTERPRET="0"))
            rows.append(json.loads(run.stdout) if run.returncode == 0
                        else dict(kind=kind, N_q=N, error=run.stderr[-800:]))
            log(f"[sinks cpu] {kind} N_q={N}: {rows[-1]}")
    return rows


def markdown(cpu, modeled) -> str:
    out = ["## Attention sinks (sink_attention, per-head top-1, statistics on; sink_attention_given, one given key "
           "per head; forward only)", "",
           f"### CPU (fp32, B={B}, H={H}, d={D}, N_k = N_q + {N_TEXT}; own child process per point)", "",
           "| N_q | candidate | median ms | peak extra MB |", "|---|---|---|---|"]
    for r in cpu:
        if "skipped" in r or "error" in r:
            out.append(f"| {r['N_q']} | {r['kind']} | {r.get('skipped') or 'error'} | |")
        else:
            out.append(f"| {r['N_q']} | {r['kind']} | {r['median_ms']:.0f} | {r['peak_extra_mb']:.0f} |")
    out += ["", f"### Modeled GPU (bf16, B={B}, H={H}, d={D}; Triton kernels vs one plain flash forward)", "",
            "| path | N_q | N_k | K selected | FLOPs ratio | issued bytes (MB) ours / flash "
            "| HBM bytes (MB) ours / flash | predicted H100 us ours / flash (ratio) | explicit P matrix MB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in modeled:
        out.append(f"| {r['path']} | {r['N_q']} | {r['N_k']} | {r['K']} | {r['flops_ratio']:.3f} | "
                   f"{r['bytes'] / 1e6:.0f} / {r['plain_bytes'] / 1e6:.0f} | {r['hbm_bytes'] / 1e6:.0f} / "
                   f"{r['plain_hbm_bytes'] / 1e6:.0f} | "
                   f"{r['h100_us']:.0f} / {r['plain_h100_us']:.0f} ({r['h100_us'] / r['plain_h100_us']:.2f}x) | "
                   f"{r['explicit_matrix_bytes'] / 1e6:.0f} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    print(report(args.quick, args.out))


def report(quick: bool, out: str, mode=None) -> str:
    """Runs both parts, writes sinks.json / sinks.md to `out`, returns the Markdown. Each CPU point is timed
    over 3 calls, 1 in a quick run or one that times only headline cases (mode: the harness's
    diffkern.bench.mode.Mode; the default run), whose explicit-matrix calls take seconds each."""
    sizes = (128,) if quick else (1024, 2048, 3072, 4096)  # quick: one point per candidate, a smoke run
    modeled = modeled_rows((1024, 2048, 3072, 4096)) + modeled_rows((4096,), K=5) + modeled_rows((4096,), K=120) \
        + modeled_rows((4096,), K=1200) + modeled_given_rows((4096,), K=1) + modeled_given_rows((4096,), K=120)
    repeats = 1 if quick or (mode is not None and not mode.time_all) else 3
    cpu = cpu_rows(sizes, repeats, log=lambda msg: print(msg, file=sys.stderr))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sinks.json"), "w") as f:
        json.dump({"cpu": cpu, "modeled": modeled}, f, indent=1)
    md = markdown(cpu, modeled)
    with open(os.path.join(out, "sinks.md"), "w") as f:
        f.write(md)
    return md


if __name__ == "__main__":
    main()
