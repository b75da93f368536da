"""The Flow-GRPO loss benchmark's traffic, modeled: the counts the interpreter makes, without running it.

The interpreter takes minutes to count `grpo_iso_loss` on Wan latents (17M elements a tensor), so the
default run takes these figures instead; tests/test_grpo_model.py holds them equal to the interpreter's
and AtenTraffic's counts on small awkward shapes, and the full run (`make bench FULL=1`) counts the case.
The kernels (grpo/triton_kernels.py, no CFG or KL) touch data-independent addresses:
  log_prob_fwd_kernel  per program: sigma, sigma_next; every element of v and the target (and x in the
                       pair form); stores two fp32 partial sums
  finalize_kernel      per sample: sigma, sigma_next and its chunks' partial sums; stores three fp32 scalars
  log_prob_bwd_kernel  per program: sigma, sigma_next, dlog_prob; the same elements again; stores dv
The aten glue around them (the PPO loss and its autograd on [B] tensors) does not depend on the latent
size, so it is counted as AtenTraffic counts it, on meta tensors of the case's own shapes.
"""
from __future__ import annotations

import torch
import triton

from .. import _triton
from ..grpo.triton_kernels import BLOCK
from . import counts
from .aten_traffic import AtenTraffic
from .workload import BWD, FWD, Case, Workload, grad_leaves, requiring_grad


def kernels(B: int, D: int, itemsize: int, has_x: bool) -> dict:
    """Per pass, per kernel: launches, programs, bytes loaded and stored (the launchers' grid on the model GPU)."""
    per_chunk = _triton.tiles_per_chunk(B, triton.cdiv(D, BLOCK), torch.device("cpu"))
    n_chunks = triton.cdiv(triton.cdiv(D, BLOCK), per_chunk)
    programs, latent = B * n_chunks, B * D * itemsize
    reads = (3 if has_x else 2) * latent
    return {FWD: {"log_prob_fwd_kernel": counts.kernel(programs, 8 * programs + reads, 8 * programs),
                  "finalize_kernel": counts.kernel(B, B * (8 + 4 * n_chunks), 12 * B)},
            BWD: {"log_prob_bwd_kernel": counts.kernel(programs, 12 * programs + reads, latent)}}


def glue(workload: Workload, case: Case, dtype: torch.dtype) -> dict:
    """AtenTraffic of one forward and backward of the op on meta tensors (its kernels' fake outputs move nothing)."""
    import diffkern
    args = requiring_grad(workload.make_args(case, dtype, "meta"))
    with diffkern.backend("triton"):
        with AtenTraffic(descend=("diffkern",)) as fwd:
            out = workload.diffkern(*args)
        with AtenTraffic(descend=("diffkern",)) as bwd:
            torch.autograd.grad(out, grad_leaves(args), torch.empty_like(out))
    return {FWD: fwd.traffic, BWD: bwd.traffic}


def loss_counts(workload: Workload, case: Case, dtype: torch.dtype, has_x: bool) -> dict:
    """{"fwd", "bwd"} counts of the bench's grpo_iso_loss call, in diffkern.bench.interpreted's format."""
    aten = glue(workload, case, dtype)
    return {p: counts.flat(ks, counts.aten_glue(aten[p]))
            for p, ks in kernels(case.params["B"], case.params["D"], dtype.itemsize, has_x).items()}
