"""DAR routing and chunked gathering in plain PyTorch: the readable definition, the test oracle (float64)
and the "reference" backend.

Per token, over sources v_0..v_{n-1} (specs/dar.md):
    rstd_i = (mean(v_i^2) + eps)^-1/2,   k_i = v_i * rstd_i * g,   s_i = <q, k_i> / sqrt(d)
    alpha  = softmax_i(s),               h = sum_i alpha_i v_i
Chunked gathering routes over [sources..., c] with the new chunk summary c = sum_k addends_k.
"""
from __future__ import annotations

import math

import torch

from .. import _dtypes


def _broadcast_q(q: torch.Tensor) -> torch.Tensor:
    """q as [B or 1, T or 1, d] for the static [d], timestep [B, d] and dynamic [B, T, d] variants."""
    if q.dim() == 1:
        return q[None, None, :]
    if q.dim() == 2:
        return q[:, None, :]
    return q


def scores(sources, q, gain, eps):
    """s [n, B, T] and the stacked sources v [n, B, T, d] (naive: a full copy of every source)."""
    v = torch.stack(list(sources))
    d = v.shape[-1]
    rstd = torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    k = v * rstd * gain
    s = (k * _broadcast_q(q)).sum(-1) / math.sqrt(d)
    return s, v


def dar_route_reference(sources, q, gain, eps: float = 1e-6) -> torch.Tensor:
    """h [B, T, d] = sum_i softmax_i(s)_i v_i, in the promoted dtype of the inputs, cast to the sources' dtype."""
    s, v = scores(sources, q, gain, eps)
    alpha = torch.softmax(s, dim=0)
    return (alpha[..., None] * v).sum(0).to(sources[0].dtype)


def dar_gather_reference(sources, addends, q, gain, eps: float = 1e-6):
    """(h, c): c = sum(addends) in the inputs' dtype (None without addends), h = routing over [*sources, c]."""
    c = None
    for a in addends:
        c = a if c is None else c + a
    return dar_route_reference([*sources, *([c] if addends else [])], q, gain, eps), c


def route_fwd(sources, q, gain, eps):
    """Reference backend of diffkern::dar_route_fwd: (h, lse) with the math in float32 (float64 for float64)."""
    acc = _dtypes.acc(sources[0].dtype)
    s, v = scores([x.to(acc) for x in sources], q.to(acc), gain.to(acc), eps)
    lse = torch.logsumexp(s, dim=0)
    h = (torch.exp(s - lse)[..., None] * v).sum(0)
    return h.to(sources[0].dtype), lse


def gather_fwd(sources, addends, q, gain, eps):
    """Reference backend of diffkern::dar_gather_fwd: (h, lse, c), c summed in float32 and rounded once."""
    if not addends:
        return (*route_fwd(sources, q, gain, eps), sources[0].new_empty(0))
    acc = _dtypes.acc(sources[0].dtype)
    c = torch.stack([a.to(acc) for a in addends]).sum(0).to(sources[0].dtype)
    return (*route_fwd([*sources, c], q, gain, eps), c)


def route_bwd(dh, sources, q, gain, h, lse, eps, dlast=None):
    """Reference backend of diffkern::dar_route_bwd (and dar_gather_bwd, with dlast added to the last
    source's gradient): the spec's backward formulas, written out.

        da_i = <dh, v_i>,  ds_i = alpha_i (da_i - <dh, h>),  c_i = ds_i rstd_i / sqrt(d)
        dv_i = alpha_i dh + c_i (q*g) - c_i rstd_i^2 <q*g, v_i> / d * v_i
        u = sum_i c_i v_i,   dq = u * g (reduced to q's shape),   dgain = sum_tokens q * u
    """
    acc = _dtypes.acc(sources[0].dtype)
    v = torch.stack([x.to(acc) for x in sources])
    dh, h, qb, g = dh.to(acc), h.to(acc), _broadcast_q(q.to(acc)), gain.to(acc)
    d = v.shape[-1]
    qg = qb * g
    rstd = torch.rsqrt(v.pow(2).mean(-1) + eps)
    p = (qg * v).sum(-1)
    alpha = torch.exp(rstd * p / math.sqrt(d) - lse.to(acc))
    ds = alpha * ((dh * v).sum(-1) - (dh * h).sum(-1))
    c = ds * rstd / math.sqrt(d)
    dv = alpha[..., None] * dh + c[..., None] * qg - (c * rstd**2 * p / d)[..., None] * v
    u = (c[..., None] * v).sum(0)
    dq = (u * g).sum_to_size(qb.shape).reshape(q.shape)
    dgain = (qb * u).sum((0, 1))
    if dlast is not None:
        dv[-1] += dlast.to(acc)
    dsources = [x.to(sources[0].dtype, copy=True) for x in dv.unbind(0)]  # outputs must not alias
    return dsources, dq.to(q.dtype), dgain.to(gain.dtype)
