"""Attention sinks in plain PyTorch: the explicit-matrix definition, the test oracle (float64) and the
"reference" backend. It forms the whole [B, H, N_q, N_k] probability matrix, as the paper's code does.

Over the image queries i < n_query (specs/sinks.md), s = scale q k^T:
    P[b,h,i,j] = softmax_j(s[b,h,i,:]),   m[b,h,j] = (1/n_query) sum_{i<n_query} P[b,h,i,j]
Suppression adds `bias` to the selected keys' logits (rows i < n_rows) and re-normalises, or (the value
path) scales their values by e^bias.
"""
from __future__ import annotations

import math

import torch

from .. import _dtypes


# Rows whose correction denominator 1 - w sum_S P is below recompute_below(dtype) are recomputed as the
# masked softmax itself by the fused kernels (csrc/include/diffkern/sinks_math.h, the same values and rule,
# with the analysis): the correction amplifies the rounding of o, lse and the selected keys' logits by up to
# 1 / that denominator. 16-bit outputs absorb 8x the fp32 error under their own rounding; 32/64-bit outputs
# hold the error model only up to 2x.
RECOMPUTE_BELOW_16BIT = 0.125
RECOMPUTE_BELOW_WIDE = 0.5


def recompute_below(dtype: torch.dtype) -> float:
    """The correction denominator below which a row of a `dtype` output (the inputs' dtype) is recomputed:
    1/8 for float16/bfloat16, 1/2 for float32/float64 (the rows whose suppressed keys hold over 7/8, resp.
    over 1/2, of their mass)."""
    return RECOMPUTE_BELOW_16BIT if dtype.itemsize <= 2 else RECOMPUTE_BELOW_WIDE


def suppression_weights(bias: float, n_selected: int, n_keys: int,
                        renormalize: bool = True) -> tuple[float, float, float, float]:
    """(a, w, d, g), so that for a suppressed row, with P the unmasked probabilities and S the selected keys,
        out' = (a o - w sum_{j in S} P_ij v_j) / (a - d sum_{j in S} P_ij),  post' = g P_i,idx0 / (a - d sum_S P)
    (csrc/include/diffkern/sinks_math.h, the same rule). With e = e^bias:
      renormalize, bias <= 0:  (1, 1 - e, 1 - e, e): bias added to S's logits, the row re-softmaxed;
      renormalize, bias > 0:   (h, h - 1, h - 1, 1), h = e^-bias: the same divided through by e (no overflow);
      renormalize, S holds every key: (1, 0, 0, 1): the bias shifts every logit alike and cancels, the row
        keeps its unmasked attention (also for bias = -inf, the limit of finite biases);
      not renormalize (value path): (1, 1 - e, 0, 1): S's values scaled by e, probabilities untouched.
    A row with a - d sum_S P <= recompute_below(dtype) * a is recomputed as the masked softmax.
    """
    if not renormalize:
        return 1.0, 1.0 - math.exp(bias), 0.0, 1.0
    if n_selected >= n_keys:
        return 1.0, 0.0, 0.0, 1.0
    if bias > 0:
        h = math.exp(-bias)
        return h, h - 1.0, h - 1.0, 1.0
    g = math.exp(bias)
    return 1.0, 1.0 - g, 1.0 - g, g


def logits(q, k, scale):
    """s [B, H, N_q, N_k] = scale q k^T in the accumulation dtype (float64 for float64, else float32)."""
    acc = _dtypes.acc(q.dtype)
    return torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale


def sink_mass(q, k, n_query, scale):
    """Reference backend of diffkern::sink_mass: (mass [B, H, N_k], lse [B, H, N_q])."""
    s = logits(q, k, scale)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None])
    return p[:, :, :n_query].sum(2) / n_query, lse


def row_top_p(p, row_top):
    """[..., row_top]: the row_top largest entries of each row of p, descending (ties count separately), 0 past
    p's last dim."""
    r = min(row_top, p.shape[-1])
    return torch.nn.functional.pad(p.topk(r, -1).values, (0, row_top - r))


def attention_fwd(q, k, v, n_query, scale, row_top=0):
    """Reference backend of diffkern::sink_attention_fwd: (o, lse, mass, entropy, top_p), all in the
    accumulation dtype.

    o = P v (unmasked), entropy_i = -sum_j P_ij log P_ij = lse_i - sum_j P_ij s_ij, top_p [B, H, N_q, row_top]
    each row's row_top largest P_ij (row_top_p).
    """
    s = logits(q, k, scale)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None])
    o = torch.matmul(p, v.to(s.dtype))
    entropy = lse - (p * s).sum(-1)
    return o, lse, p[:, :, :n_query].sum(2) / n_query, entropy, row_top_p(p, row_top)


def sink_topk(score, k, largest):
    """Reference backend of diffkern::sink_topk: indices [B, G, k] (int64) of the k largest (or smallest)
    scores of each row, ties broken towards the lower index (a stable sort)."""
    return torch.sort(score, dim=-1, descending=largest, stable=True).indices[..., :k].contiguous()


def key_mask(idx, n_heads, n_keys):
    """[B, H, 1, N_k] bool: True on the selected keys (idx [B, G, K], G in {1, H})."""
    B, G, _ = idx.shape
    mask = torch.zeros(B, G, n_keys, dtype=torch.bool, device=idx.device).scatter_(-1, idx, True)
    return mask.expand(B, n_heads, n_keys)[:, :, None, :]


def key_bias(idx, n_heads, n_keys, bias, dtype):
    """The additive bias [B, H, 1, N_k]: `bias` on the selected keys (idx [B, G, K], G in {1, H}), 0 elsewhere."""
    zero = torch.tensor(0.0, dtype=dtype)
    return torch.where(key_mask(idx, n_heads, n_keys), torch.tensor(bias, dtype=dtype), zero)


def attention_given(q, k, v, idx, n_rows, scale, bias):
    """Reference backend of diffkern::sink_attention_given: softmax_j(s_ij + bias [j in S]) v for rows i < n_rows
    (S: the keys idx [B, G, K] lists, a key listed twice biased once), plain attention below, in q's dtype; a
    (b, h) whose every key is in S keeps its unmasked attention (the bias cancels)."""
    s = logits(q, k, scale)
    B, H, N_q, N_k = s.shape
    mask = key_mask(idx, H, N_k)
    rows = torch.arange(N_q, device=s.device)[:, None] < n_rows
    biased = rows & mask & ~mask.all(-1, keepdim=True)
    p = torch.softmax(s + torch.where(biased, torch.tensor(bias, dtype=s.dtype), torch.tensor(0.0, dtype=s.dtype)), -1)
    return torch.matmul(p, v.to(s.dtype)).to(q.dtype)


def sink_suppress(q, k, v, o, lse, idx, n_rows, scale, bias, renormalize=True):
    """Reference backend of diffkern::sink_suppress, from the explicit matrix (o and lse are not read).

    Rows i < n_rows get, with renormalize, softmax(s + bias on the selected keys) v (none when the selection
    holds every key: the bias cancels), without it P v' with the selected keys' values v'_j = e^bias v_j; the
    other rows plain attention. Returns (out [B, H, N_q, d] in q's dtype, post [B, H, n_rows]: the
    probability of idx[..., 0] after the change).
    """
    s = logits(q, k, scale)
    B, H, N_q, N_k = s.shape
    p = torch.softmax(s, -1)
    rows = torch.arange(N_q, device=s.device)[:, None] < n_rows
    if renormalize and suppression_weights(bias, idx.shape[-1], N_k)[1] != 0.0:
        p = torch.softmax(s + torch.where(rows, key_bias(idx, H, N_k, bias, s.dtype), 0.0), -1)
    vs = v.to(s.dtype)
    out = torch.matmul(p, vs)
    if not renormalize:
        scaled = torch.where(key_mask(idx, H, N_k).transpose(-1, -2), math.exp(bias) * vs, vs)
        out = torch.where(rows, torch.matmul(p, scaled), out)
    top = idx[..., :1].expand(B, H, 1)[:, :, None, :].expand(B, H, n_rows, 1)
    return out.to(q.dtype), torch.gather(p[:, :, :n_rows], -1, top)[..., 0]
