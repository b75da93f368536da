"""The NoiseTilt benchmark's traffic, modeled: the counts the interpreter would make, from the loop structure.

The Triton interpreter sorts a video latent (about 2M entries a sample) too slowly for the benchmark,
so `ntrk_tilted_step`'s video case is modeled here instead of counted. Every access of the four
kernels (ntrk/triton_kernels.py) is data-independent (the clip kernel's binary search loads at every
step, a probe past M clamped to M - 1), so the bytes are a function of the shapes alone:
  row_sort_kernel  loads each entry (the input's dtype on the first pass, fp32 after); stores the
                   fp32 sorted value and the int16 column: 6 bytes
  col_sort_kernel  loads 4, stores the int64 key: 8 bytes
  clip_kernel      loads the key (8), LOG_CHUNK + 1 keys in every other chunk (8 each), both bands (4 + 4)
                   and the column (2); stores the value (4) and one int32 count per program
  ntrk_step_kernel loads mu, w, eps and stores x (the dtype), plus sigma and rho (4 + 4) per program
The aten glue around them (the band tables cast to fp32 on a process's first call, the in-set
reduction per pass, the output cast, the per-sample factors; the backward's multiply for deps) is
modeled op by op. tests/test_ntrk_model.py holds
every figure equal to the interpreter's and AtenTraffic's counts on small awkward shapes.
The number of projection passes is data-dependent; the modeled case assumes one (its input is a
Gaussian draw, which the first pass finds in the set, as the counted FLUX case shows).
"""
from __future__ import annotations

import triton
import torch

from .. import _triton
from ..ntrk.triton_kernels import BLOCK, col_chunk, row_geometry
from . import counts


def project_kernels(B: int, M: int, D: int, itemsize: int, passes: int = 1) -> dict:
    """Per kernel of twoos_project(passes run): launches, programs, bytes loaded and stored."""
    N = B * M * D
    rows = row_geometry(D)[0]
    chunk = col_chunk(M)
    n_chunks = triton.cdiv(M, chunk)
    log_chunk = chunk.bit_length() - 1
    columns = B * D * n_chunks
    row_loaded = N * itemsize + (passes - 1) * N * 4  # the input once, then the fp32 iterate
    return {
        "row_sort_kernel": counts.kernel(passes * B * triton.cdiv(M, rows), row_loaded, passes * 6 * N, passes),
        "col_sort_kernel": counts.kernel(passes * columns, passes * 4 * N, passes * 8 * N, passes),
        "clip_kernel": counts.kernel(passes * columns, passes * N * (18 + 8 * (log_chunk + 1) * (n_chunks - 1)),
                                     passes * (4 * N + 4 * columns), passes),
    }


def step_kernel(B: int, n: int, itemsize: int) -> dict:
    """ntrk_step_kernel with eps given, over B samples of n entries (grid as the launcher sizes it on CPU)."""
    n_tiles = triton.cdiv(n, BLOCK)
    programs = B * triton.cdiv(n_tiles, _triton.tiles_per_chunk(B, n_tiles, torch.device("cpu")))
    return {"ntrk_step_kernel": counts.kernel(programs, 3 * B * n * itemsize + 8 * programs, B * n * itemsize)}


def tilted_step_counts(B: int, M: int, D: int, itemsize: int, passes: int = 1, first_call: bool = True) -> dict:
    """{"fwd", "bwd"} counts of the bench's ntrk_tilted_step (twoos_project then ntrk_step, eps given), in
    diffkern.bench.interpreted's format. first_call: the process's first projection at (M, D), which
    casts the fp64 band tables to the fp32 copy bands_on caches (each counting child makes one call)."""
    n, n_chunks = M * D, triton.cdiv(M, col_chunk(M))
    cast = [("to", 4 * B * n, itemsize * B * n)] if itemsize != 4 else []  # inside the op: aten.to
    fwd_glue = [("_to_copy", 8 * n, 4 * n)] * 2 if first_call else []
    fwd_glue += [("sum", 4 * B * D * n_chunks, 8 * B), ("eq", 8 * B, B), ("all", B, 1), ("is_nonzero", 1, 0)] * passes
    fwd_glue += cast + [("to", 8 * B, 4 * B), ("div", 4 * B, 4 * B)]  # out, in_set = count / N
    fwd_glue += [("full", 0, 4 * B)] * 2  # sigma, rho per sample
    # dw is not asked for (w is the projection's output), so not computed; deps = dx * (sigma sqrt(1 - rho)) in dx's
    # dtype. Counted on CPU tensors, where the backward runs diffkern::ntrk_step_bwd's ATen form (reference.py),
    # whose cast is an aten.to; the GPU's (csrc/diffkern/autograd_ntrk.cpp) moves the same bytes as an _to_copy.
    bwd_glue = [("rsub", 4 * B, 4 * B), ("sqrt", 4 * B, 4 * B), ("mul", 8 * B, 4 * B), ("to", 4 * B, itemsize * B),
                ("mul", (B * n + B) * itemsize, B * n * itemsize)]
    return {"fwd": counts.flat({**project_kernels(B, M, D, itemsize, passes), **step_kernel(B, n, itemsize)},
                         counts.glue(fwd_glue)),
            "bwd": counts.flat({}, counts.glue(bwd_glue))}
