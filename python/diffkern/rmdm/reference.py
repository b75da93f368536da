"""Shared-block recursion in plain PyTorch: the readable definition, the float64 oracle, the "reference" backend.

One pre-norm block with weights p (the 12 tensors of `BLOCK_PARAMS`) and optional adaLN modulation
m = (shift1, scale1, gate1, shift2, scale2, gate2), each [B, d] (specs/rmdm.md "Model"):
    u = LN(h) (1 + scale1) + shift1,   h <- h + gate1 * (MHA(u) W_o^T + b_o)
    u = LN(h) (1 + scale2) + shift2,   h <- h + gate2 * (gelu(u W_1^T + b_1) W_2^T + b_2)
MHA is bidirectional softmax attention over the T tokens with `heads` heads of d/heads; gelu is the
exact (erf) one. Without m: shifts 0, scales 0, gates 1. Blocks(h) applies the K blocks in order;
h_k = Blocks(h_{k-1}), h_0 = x, and the op returns states[k-1] = h_k for k = 1..n_iter.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLOCK_PARAMS = ("ln1_w", "ln1_b", "w_qkv", "b_qkv", "w_o", "b_o", "ln2_w", "ln2_b", "w_1", "b_1", "w_2", "b_2")
N_PARAMS = len(BLOCK_PARAMS)
N_MOD = 6


def param_shapes(d: int, f: int) -> tuple[tuple[int, ...], ...]:
    """Shapes of one block's 12 tensors for width d and MLP width f, in `BLOCK_PARAMS` order."""
    return ((d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (f, d), (f,), (d, f), (d,))


def attention(u: torch.Tensor, w_qkv, b_qkv, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_h)) v per head, heads concatenated: [B, T, d]."""
    B, T, d = u.shape
    q, k, v = F.linear(u, w_qkv, b_qkv).view(B, T, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    return (p @ v).transpose(1, 2).reshape(B, T, d)


def block(h: torch.Tensor, p, m, heads: int, eps: float) -> torch.Tensor:
    """One pre-norm block; p its 12 tensors, m None or [B, 6, d]."""
    ln1_w, ln1_b, w_qkv, b_qkv, w_o, b_o, ln2_w, ln2_b, w_1, b_1, w_2, b_2 = p
    d = h.shape[-1]
    u = F.layer_norm(h, (d,), ln1_w, ln1_b, eps)
    if m is not None:
        u = u * (1 + m[:, None, 1]) + m[:, None, 0]
    a = F.linear(attention(u, w_qkv, b_qkv, heads), w_o, b_o)
    h = h + (a if m is None else m[:, None, 2] * a)
    u = F.layer_norm(h, (d,), ln2_w, ln2_b, eps)
    if m is not None:
        u = u * (1 + m[:, None, 4]) + m[:, None, 3]
    y = F.linear(F.gelu(F.linear(u, w_1, b_1)), w_2, b_2)
    return h + (y if m is None else m[:, None, 5] * y)


def blocks(h: torch.Tensor, weights, mod, heads: int, eps: float) -> torch.Tensor:
    """The K blocks in order (one iteration); weights is the flat list of K * 12 tensors, mod None or [B, K, 6, d]."""
    for k in range(len(weights) // N_PARAMS):
        h = block(h, weights[k * N_PARAMS:(k + 1) * N_PARAMS], None if mod is None else mod[:, k], heads, eps)
    return h


def recurse(x, weights, mod, n_iter: int, heads: int, eps: float) -> torch.Tensor:
    """states [n_iter, B, T, d]: Blocks applied n_iter times, every iteration's output (autograd-ready)."""
    states, h = [], x
    for _ in range(n_iter):
        h = blocks(h, weights, mod, heads, eps)
        states.append(h)
    return torch.stack(states) if states else x.new_empty((0, *x.shape))


def recurse_bwd(dstates, x, states, weights, mod, heads: int, eps: float):
    """(dx, dweights, dmod) of `recurse`, recomputing one iteration at a time from its saved input.

    Iterations are walked backwards: the gradient reaching h_k is dstates[k-1] plus what flows back from
    iteration k+1; iteration k is re-run from h_{k-1} (x or states[k-2]) and differentiated alone, so
    memory holds one iteration's activations. dmod is an empty tensor when mod is None.
    """
    g = torch.zeros_like(x)
    dweights = [torch.zeros_like(w) for w in weights]
    dmod = torch.zeros_like(mod) if mod is not None else x.new_empty(0)
    with torch.enable_grad():
        leaves = [w.detach().requires_grad_() for w in weights]
        m = mod.detach().requires_grad_() if mod is not None else None
        for k in reversed(range(states.shape[0])):
            g = g + dstates[k]
            h_in = (x if k == 0 else states[k - 1]).detach().requires_grad_()
            out = blocks(h_in, leaves, m, heads, eps)
            grads = torch.autograd.grad(out, [h_in, *leaves, *([m] if m is not None else [])], g)
            g = grads[0]
            for acc, gw in zip(dweights, grads[1:1 + len(leaves)]):
                acc += gw
            if m is not None:
                dmod += grads[-1]
    return g, dweights, dmod
