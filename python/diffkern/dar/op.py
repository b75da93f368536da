"""DAR routing as a torch op: argument checks, fake (meta) implementations, backends, public API.

The schemas live in csrc/diffkern/ops.cpp, the C++ CPU kernels in csrc/cpu/dar.cpp and the autograd in
csrc/diffkern/autograd_dar.cpp; this file registers everything Python owns for diffkern::dar_route_fwd /
dar_route_bwd.
"""
from __future__ import annotations

import math

import torch

from .. import _checks, _dtypes, _lazy, _nvtx, _ops, _registry, _triton
from . import reference
triton_kernels = _lazy.module(__package__ + ".triton_kernels")  # imports triton on first use

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(msg: str, op: str = "dar_route"):
    raise ValueError(f"{op}: {msg}")


def _check_param(name, x, shapes, src, shape_text, op):
    if x.device != src.device:
        _fail(f"{name} is on {x.device} but sources[0] is on {src.device}", op)
    if not any(tuple(x.shape) == s for s in shapes):
        _fail(f"{name} must be {shape_text}, got shape {list(x.shape)}", op)
    allowed = {src.dtype, _dtypes.acc(src.dtype)}
    if x.dtype not in allowed:
        alt = _dtypes.name(_dtypes.acc(src.dtype))
        _fail(f"{name} dtype must be {_dtypes.name(src.dtype)} (the sources' dtype) or {alt}, got {_dtypes.name(x.dtype)}",
              op)
    check_unit_stride(name, x, op)


def check_unit_stride(name, x, op) -> None:
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        _fail(f"{name} must have unit stride in its last dim (got stride {x.stride(-1)}); call .contiguous()", op)


def check_like_source(name, x, src, op) -> None:
    """A tensor that must match sources[0] in shape, dtype and device, with unit stride along d."""
    if x.shape != src.shape:
        _fail(f"{name} has shape {list(x.shape)} but sources[0] has shape {list(src.shape)}", op)
    if x.dtype != src.dtype:
        _fail(f"{name} dtype {_dtypes.name(x.dtype)} differs from sources[0] dtype {_dtypes.name(src.dtype)}", op)
    if x.device != src.device:
        _fail(f"{name} is on {x.device} but sources[0] is on {src.device}", op)
    check_unit_stride(name, x, op)


def check_fwd(sources, q, gain, eps, op: str = "dar_route") -> None:
    """Validates the arguments of dar_route_fwd (the C++ CPU kernel checks the same, in the same words)."""
    if len(sources) == 0:
        _fail("sources must hold at least one tensor", op)
    src = sources[0]
    for i, x in enumerate(sources):
        if x.dim() != 3:
            _fail(f"sources[{i}] must be [B, T, d], got shape {list(x.shape)}", op)
        if i == 0 and x.dtype not in _FLOATS:
            _fail(f"sources[0] dtype must be float16, bfloat16, float32 or float64, got {_dtypes.name(x.dtype)}", op)
        check_like_source(f"sources[{i}]", x, src, op)
    B, T, d = src.shape
    if d < 1:
        _fail("d must be at least 1", op)
    _check_param("q", q, ((d,), (B, d), (B, T, d)), src, f"[d], [B, d] or [B, T, d] with B={B}, T={T}, d={d}", op)
    _check_param("gain", gain, ((d,),), src, f"[d] = [{d}]", op)
    if not (math.isfinite(eps) and eps >= 0):
        _fail(f"eps must be finite and >= 0, got {eps}", op)


def check_saved(name, x, layout, shape, dtype, role, src, op) -> None:
    """A tensor the forward produced (or its incoming gradient), taken back by the backward."""
    if x.device != src.device:
        _fail(f"{name} is on {x.device} but sources[0] is on {src.device}", op)
    if list(x.shape) != shape or x.dtype != dtype or not x.is_contiguous():
        _fail(f"{name} must be a contiguous {layout} = {shape} tensor of dtype {_dtypes.name(dtype)} ({role}), got "
              f"shape {list(x.shape)}, dtype {_dtypes.name(x.dtype)}, strides {list(x.stride())}", op)


def check_bwd(dh, sources, q, gain, h, lse, eps, op: str = "dar_route") -> None:
    """Validates the arguments of dar_route_bwd."""
    check_fwd(sources, q, gain, eps, op)
    src = sources[0]
    B, T, d = src.shape
    check_saved("dh", dh, "[B, T, d]", [B, T, d], src.dtype, "the sources' dtype", src, op)
    check_saved("h", h, "[B, T, d]", [B, T, d], src.dtype, "the sources' dtype", src, op)
    check_saved("lse", lse, "[B, T]", [B, T], _dtypes.acc(src.dtype), "the accumulation dtype", src, op)


def check_triton(sources, op: str = "dar_route"):
    """The Triton kernels' own limits: float32 math, one row of d per program."""
    _triton.check_float32_math(op, sources[0].dtype, "sources")
    if sources[0].shape[-1] > triton_kernels.MAX_D:
        _fail(f"the triton backend takes d <= {triton_kernels.MAX_D} (one row per program), got "
              f"d={sources[0].shape[-1]}", op)


def _fwd_triton(sources, q, gain, eps):
    check_triton(sources)
    return triton_kernels.route_fwd(sources, q, gain, eps)[:2]


def _bwd_triton(dh, sources, q, gain, h, lse, eps):
    check_triton(sources)
    return triton_kernels.route_bwd(dh, sources, q, gain, h, lse, eps)


_registry.register("dar_route_fwd", check_fwd, triton=_fwd_triton, cuda=_ops.ops.dar_route_fwd_cuda,
                   reference=reference.route_fwd)
_registry.register("dar_route_bwd", check_bwd, triton=_bwd_triton, cuda=_ops.ops.dar_route_bwd_cuda,
                   reference=reference.route_bwd)


# The internal ops of the cuda backend (csrc/cuda/dar_route_api.cpp) share the public ops' fakes.
@_registry.register_fake("diffkern::dar_route_fwd_cuda")
@_registry.register_fake("diffkern::dar_route_fwd")
def _fwd_fake(sources, q, gain, eps):
    check_fwd(sources, q, gain, eps)
    src = sources[0]
    acc = _dtypes.acc(src.dtype)
    return src.new_empty(src.shape), src.new_empty(src.shape[:2], dtype=acc)


@_registry.register_fake("diffkern::dar_route_bwd_cuda")
@_registry.register_fake("diffkern::dar_route_bwd")
def _bwd_fake(dh, sources, q, gain, h, lse, eps):
    check_bwd(dh, sources, q, gain, h, lse, eps)
    return [x.new_empty(x.shape) for x in sources], \
        q.new_empty(q.shape), gain.new_empty(gain.shape)


def dar_route(sources, q, gain, eps: float = 1e-6) -> torch.Tensor:
    """DAR cross-layer routing: rebuild a sublayer input as a softmax-weighted mix of earlier outputs.

    Per token, over sources v_0..v_{n-1} (specs/dar.md):
        rstd_i = (mean(v_i^2) + eps)^-1/2,   s_i = rstd_i <q * gain, v_i> / sqrt(d)
        h = sum_i softmax_i(s)_i v_i          (no residual is added back)

    Args:
        sources: list of n >= 1 tensors [B, T, d] of one dtype (float16, bfloat16, float32; float64 on
            the cpu/reference backends) and device; any batch/token strides, unit stride along d. Read
            in place: never stacked.
        q: the routing query, [d] (static), [B, d] (timestep-injected) or [B, T, d] (dynamic), in the
            sources' dtype or float32.
        gain: the RMSNorm gain g, [d], in the sources' dtype or float32.
        eps: RMSNorm epsilon (finite, >= 0).
    Returns:
        h [B, T, d] in the sources' dtype. Softmax and norm math run in float32 (float64 for float64).
    Autograd: gradients flow to every source, q and gain. Saved for backward: h and the per-token
        log-sum-exp [B, T] (4 bytes/token); rstd and alpha are recomputed. Double backward is refused:
        differentiating the gradient (create_graph=True, then backward through it) raises NotImplementedError
        naming diffkern.dar_route; the first-order gradient itself is the same with create_graph.
    Backends: C++ (CPU tensors), CUDA C++ (CUDA tensors, when built with CUDA), Triton (CUDA tensors),
        reference; see `diffkern.backend`.
    NaN/inf policy: propagated like the reference: a NaN/inf in a token's sources (or in q, gain) makes
        that token's output NaN; tensor values are not checked.
    Finite inputs up to the float32 maximum give finite outputs, as the float64 reference: a token whose
    float32 sums overflow is routed again (forward and backward), in double on CPU, and on the GPU kernels
    with its rows scaled so that its largest source has rms 1 (dar_math.h). That GPU scaling assumes the
    token's sources are of comparable scale: eps shrinks with it (to 0), and a source over ~1e19 smaller
    than the largest underflows (its score, hence the token, becomes NaN). The reference backend computes
    in plain float32 and overflows there.
    Bad arguments raise TypeError (not a tensor, eps not a number) or ValueError (shape, dtype, device,
        stride, eps < 0), naming the argument.
    """
    sources, q, gain, eps = check_public(sources, q, gain, eps)
    with _nvtx.range("diffkern.dar_route"):
        return _ops.ops.dar_route_fwd(sources, q, gain, eps)[0]


def check_public(sources, q, gain, eps, op: str = "dar_route"):
    """The Python types of the public arguments (the op's schema checks the rest): (sources list, q, gain, eps)."""
    return (_checks.tensor_list(op, "sources", sources), _checks.tensor(op, "q", q), _checks.tensor(op, "gain", gain),
            _checks.number(op, "eps", eps))
