"""The DAR routing benchmark's traffic, modeled: the counts the interpreter makes, from the launch geometry.

The interpreter takes minutes to count `dar_route` at SiT-XL/2 shapes (a thousand programs over 18 or
57 sources, twice), so the default run takes these figures instead; tests/test_dar_route_model.py
holds them equal to the interpreter's and AtenTraffic's counts on small awkward shapes, and the full
run (`make bench FULL=1`) counts the cases. Every access of the two kernels (dar/triton_kernels.py)
is data-independent; with a per-batch query q [B, d] (the benchmark's) and 16-bit tensors:
  route_fwd_kernel  per program: gain and q rows (d each); per source its table entry (three int64) and
                    its tile; stores h and the fp32 lse of its tokens
  route_bwd_kernel  per program: gain and q rows; per tile slot (a chunk's last slots may lie past T,
                    masked, yet still read the tables): every source's table entry and its dsource
                    table pointer (four int64); per valid token dh, h, lse and every source; stores
                    every dsource and one fp32 [d] partial per program
The backward's glue sums the partials and forms dq and dgain in fp32 (op.py's route_bwd), eight aten ops.
"""
from __future__ import annotations

import torch
import triton

from .. import _triton
from ..dar.triton_kernels import route_config
from . import counts


def route_counts(n: int, B: int, T: int, d: int, itemsize: int) -> dict:
    """{"fwd", "bwd"} counts of one dar_route call with n sources [B, T, d], q [B, d] and gain [d], in
    diffkern.bench.interpreted's format (16-bit tensors: fp32 has no casts in its glue)."""
    if itemsize == 4:
        raise ValueError("modeled for 16-bit tensors (the benchmark's bf16); fp32 skips the glue's casts")
    stream, row, entry = B * T * d * itemsize, d * itemsize, 3 * 8
    block_t = route_config(d, backward=False)[0]
    programs = B * triton.cdiv(T, block_t)
    fwd = counts.kernel(programs, programs * 2 * row + n * (programs * entry + stream), stream + B * T * 4)

    block_t = route_config(d, backward=True)[0]
    n_tiles = triton.cdiv(T, block_t)
    per_chunk = _triton.tiles_per_chunk(B, n_tiles, torch.device("cpu"))
    n_chunks = triton.cdiv(n_tiles, per_chunk)
    programs = B * n_chunks
    bwd = counts.kernel(programs, programs * 2 * row + programs * per_chunk * n * (entry + 8) + (2 + n) * stream + B * T * 4,
                  n * stream + programs * d * 4)
    Bd = B * d * 4
    glue = [("sum", programs * d * 4, Bd),  # u = partial.sum(1)
            ("to", row, d * 4), ("mul", Bd + d * 4, Bd), ("to", Bd, B * row),  # dq = (u * gain.float()).to(q.dtype)
            ("to", B * row, Bd), ("mul", 2 * Bd, Bd), ("sum_to_size", Bd, d * 4),  # dgain = (q.float() * u).sum_to_size
            ("to", d * 4, row)]
    return {"fwd": counts.flat({"route_fwd_kernel": fwd}, counts.glue([])),
            "bwd": counts.flat({"route_bwd_kernel": bwd}, counts.glue(glue))}
