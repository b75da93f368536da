"""DAR chunked residual gathering as a torch op: checks, fakes, backends, public API (autograd: csrc/diffkern/autograd_dar.cpp).

Schemas: diffkern::dar_gather_fwd / dar_gather_bwd (csrc/diffkern/ops.cpp); C++ CPU kernels in
csrc/cpu/dar.cpp and Triton kernels in triton_kernels.py, both the routing kernels themselves run
with a summary to form (forward) or a last-source gradient to add (backward).

Where the summary is formed. Chunk j-1's summary c_j is first needed by sublayer jS, the first of
chunk j, which routes over [c_0..c_{j-1}, c_j]. This op reads chunk j-1's S outputs (the addends)
in place of c_j, writes c_j once and routes over the stored c_j. [B, T, d] passes per chunk spent
forming c_j and reading it there:
    a separate sum, then routing over c_j:                          S reads + 1 write + 1 read = S + 2
    formed by the routing op (this op):                             S reads + 1 write          = S + 1
    a partial sum P of the first S-1 outputs written by the op of sublayer jS-1 (which reads them
      anyway), completed by the op of sublayer jS:                  1 write + 2 reads + 1 write = 4
At S=4: 6, 5 and 4. The second is chosen although the third saves a pass at S >= 5: its backward
needs no addend values (each addend's gradient is c_j's), so the addends are never saved for
backward (chunk recomputation then keeps only summaries), S <= 2 and "last" summaries need no extra
op, and the op stays one routing pass with one optional input and one optional output.
"""
from __future__ import annotations

from .. import _checks, _dtypes, _lazy, _nvtx, _ops, _registry
from . import reference
triton_kernels = _lazy.module(__package__ + ".triton_kernels")  # imports triton on first use
from .op import check_bwd, check_fwd, check_like_source, check_public, check_saved, check_triton

OP = "dar_gather"


def check_gather_fwd(sources, addends, q, gain, eps) -> None:
    """Validates the arguments of dar_gather_fwd (the C++ CPU kernel checks the same, in the same words)."""
    check_fwd(sources, q, gain, eps, OP)
    for k, a in enumerate(addends):
        check_like_source(f"addends[{k}]", a, sources[0], OP)


def check_gather_bwd(dh, sources, q, gain, h, lse, dlast, eps) -> None:
    """Validates the arguments of dar_gather_bwd."""
    check_bwd(dh, sources, q, gain, h, lse, eps, OP)
    if dlast is not None:
        src = sources[0]
        check_saved("dlast", dlast, "[B, T, d]", list(src.shape), src.dtype, "the sources' dtype", src, OP)


def _fwd_triton(sources, addends, q, gain, eps):
    check_triton(sources, OP)
    return triton_kernels.route_fwd(sources, q, gain, eps, addends)


def _bwd_triton(dh, sources, q, gain, h, lse, dlast, eps):
    check_triton(sources, OP)
    return triton_kernels.route_bwd(dh, sources, q, gain, h, lse, eps, dlast)


def _bwd_reference(dh, sources, q, gain, h, lse, dlast, eps):
    return reference.route_bwd(dh, sources, q, gain, h, lse, eps, dlast)


_registry.register("dar_gather_fwd", check_gather_fwd, triton=_fwd_triton, reference=reference.gather_fwd)
_registry.register("dar_gather_bwd", check_gather_bwd, triton=_bwd_triton, reference=_bwd_reference)


@_registry.register_fake("diffkern::dar_gather_fwd")
def _fwd_fake(sources, addends, q, gain, eps):
    check_gather_fwd(sources, addends, q, gain, eps)
    src = sources[0]
    c = src.new_empty(src.shape if addends else (0,))
    return src.new_empty(src.shape), src.new_empty(src.shape[:2], dtype=_dtypes.acc(src.dtype)), c


@_registry.register_fake("diffkern::dar_gather_bwd")
def _bwd_fake(dh, sources, q, gain, h, lse, dlast, eps):
    check_gather_bwd(dh, sources, q, gain, h, lse, dlast, eps)
    return [x.new_empty(x.shape) for x in sources], q.new_empty(q.shape), gain.new_empty(gain.shape)


def dar_gather(sources, addends, q, gain, eps: float = 1e-6):
    """DAR chunked residual gathering: route over earlier sources and a chunk summary formed in the same pass.

    Per token (specs/dar.md, Eq. 7), with c = sum_k addends_k when addends are given:
        sources' = [*sources, c]  (or sources),  rstd_i = (mean(v_i^2) + eps)^-1/2,
        s_i = rstd_i <q * gain, v_i> / sqrt(d),  h = sum_i softmax_i(s)_i v_i
    In a chunked DAR network the sources are the chunk summaries c_0..c_{j-1} and the raw outputs of
    the current chunk; the addends are the outputs of the chunk that just ended, whose summary c_j
    this op writes once (the module docstring counts the bytes against the alternatives).

    Args:
        sources: n >= 1 tensors [B, T, d] of one dtype (float16, bfloat16, float32; float64 on the
            cpu/reference backends) and device, unit stride along d; read in place, never stacked.
        addends: k >= 0 tensors like sources[0]; k = 0 is plain routing (the final aggregator).
        q: [d], [B, d] or [B, T, d], in the sources' dtype or float32.  gain: [d], likewise.
        eps: RMSNorm epsilon (finite, >= 0).
    Returns:
        (h [B, T, d], c [B, T, d] or None without addends), both in the sources' dtype. c is summed in
        float32 and rounded once; h routes over the rounded c, as every later reader sees it.
    Traffic: reads n + k sources, writes h and c (k > 0) plus 4 bytes/token of log-sum-exp.
    Autograd: gradients flow to sources, addends (each gets c's total gradient), q and gain. Saved for
        backward: the routed sources (c, not the addends), h and the log-sum-exp; alpha and rstd are
        recomputed. Double backward is refused: differentiating the gradient raises NotImplementedError naming
        diffkern.dar.dar_gather.
    Backends: C++ (CPU tensors), Triton (CUDA tensors), reference; see `diffkern.backend`.
    NaN/inf and finite inputs near the float32 maximum: as `dar_route` (the summary c counts as a source;
    c itself overflows to inf where the addends' float32 sum does).
    Bad arguments raise TypeError or ValueError naming the argument, as dar_route.
    """
    sources, q, gain, eps = check_public(sources, q, gain, eps, OP)
    return gather(sources, _checks.tensor_list(OP, "addends", addends), q, gain, eps)


def gather(sources: list, addends: list, q, gain, eps: float):
    """`dar_gather` without its Python type checks, for callers whose arguments are tensors by construction
    (DARRouter): lists of tensors and a float eps. The op checks everything else."""
    with _nvtx.range("diffkern.dar_gather"):
        h, _, c = _ops.ops.dar_gather_fwd(sources, addends, q, gain, eps)
    return h, (c if addends else None)
