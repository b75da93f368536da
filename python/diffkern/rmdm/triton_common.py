"""The block math both Triton recursion kernels share (triton_kernels.py: tiled, triton_persistent.py: persistent).

Everything is fp32 after loading (inputs are upcast right after `tl.load`); products go through diffkern._dot
(the persistent kernel runs `attend`'s in fp32 "ieee" on its fp32 scratch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _dot

TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def param_ptr(table, i, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """The typed pointer of weight tensor i of the pointer table. A pointer read from memory carries no
    alignment facts: ALIGNED (the host checked every weight 16-byte aligned, _triton.aligned) states them, so
    rows whose width is a multiple of 16 bytes load 16 bytes at a time."""
    ptr = tl.load(table + i).to(tl.pointer_type(DT))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def param_vec(table, i, idx, mask, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """Elements idx of the table's tensor i (a bias or LayerNorm vector), in fp32."""
    return tl.load(param_ptr(table, i, DT, ALIGNED) + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def normalized(h, cmask, D, eps):
    """(xhat, rstd): the rows of an fp32 [rows, BLOCK_D] tile centred and scaled over the valid columns (0 elsewhere),
    and their 1 / sqrt(var + eps)."""
    mean = tl.sum(tl.where(cmask[None, :], h, 0.0), 1) / D
    xc = tl.where(cmask[None, :], h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
    return xc * rstd[:, None], rstd


@triton.jit
def layer_norm(h, w, b, cmask, D, eps):
    """LN(h) w + b over the valid columns of an fp32 [rows, BLOCK_D] tile; w, b fp32 [BLOCK_D]."""
    xhat, _ = normalized(h, cmask, D, eps)
    return xhat * w[None, :] + b[None, :]


@triton.jit
def gelu(z):
    """The exact (erf) gelu."""
    return 0.5 * z * (1.0 + tl.erf(z * SQRT_HALF))


@triton.jit
def gelu_grad(z):
    """d gelu / dz = Phi(z) + z phi(z) of the exact gelu."""
    return 0.5 * (1.0 + tl.erf(z * SQRT_HALF)) + z * INV_SQRT_2PI * tl.exp(-0.5 * z * z)


@triton.jit
def attend(qkv, ctx, q0, hd, T, D, DH, scale, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
           BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_DH: tl.constexpr):
    """ctx[q0:q0+BLOCK_Q, head hd] = softmax(q k^T * scale) v for one sample, online over BLOCK_KV-key tiles,
    the products through diffkern._dot at (DOT_F32, PRECISION). Returns the rows' log-sum-exp of the scaled
    scores (fp32 [BLOCK_Q]), which the backward (triton_backward.py) recomputes the probabilities from.

    qkv: the sample's [T, 3D] (q | k | v, heads contiguous within each), ctx: its [T, D], stored in ctx's dtype.
    """
    rows = q0 + tl.arange(0, BLOCK_Q)
    dcols = tl.arange(0, BLOCK_DH)
    dmask = dcols < DH
    qm = (rows < T)[:, None] & dmask[None, :]
    q = tl.load(qkv + rows[:, None] * 3 * D + hd * DH + dcols[None, :], mask=qm, other=0.0)
    m_i = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_Q,), tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_DH), tl.float32)
    for s0 in range(0, T, BLOCK_KV):
        keys = s0 + tl.arange(0, BLOCK_KV)
        km = (keys < T)[:, None] & dmask[None, :]
        kk = tl.load(qkv + keys[:, None] * 3 * D + D + hd * DH + dcols[None, :], mask=km, other=0.0)
        vv = tl.load(qkv + keys[:, None] * 3 * D + 2 * D + hd * DH + dcols[None, :], mask=km, other=0.0)
        s = scores(q, kk, keys, T, scale, DOT_F32, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot.dot(p, vv, DOT_F32, PRECISION)
        m_i = m_new
    tl.store(ctx + rows[:, None] * D + hd * DH + dcols[None, :], (acc / l_i[:, None]).to(ctx.dtype.element_ty),
             mask=qm)
    return m_i + tl.log(l_i)


@triton.jit
def scores(q, kk, keys, T, scale, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """q k^T * scale of a [BLOCK_Q, BLOCK_DH] query and a [BLOCK_KV, BLOCK_DH] key tile, -inf at keys >= T."""
    s = _dot.dot(q, tl.trans(kk), DOT_F32, PRECISION) * scale
    return tl.where((keys < T)[None, :], s, float("-inf"))


@triton.jit
def sample_mod_rows(mod_ptr, rows, kb, K, T, D):
    """Per token row, the pointer to its sample's [6, D] adaLN block of block kb."""
    return mod_ptr + ((rows // T).to(tl.int64) * K + kb)[:, None] * 6 * D


@triton.jit
def modulate(u, mod_rows, SHIFT: tl.constexpr, cols, mask, D):
    """u (1 + scale) + shift, adaLN's modulation; mod_rows points at a [6, D] block (one pointer, or one per row)."""
    shift = tl.load(mod_rows + SHIFT * D + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(mod_rows + (SHIFT + 1) * D + cols, mask=mask, other=0.0).to(tl.float32)
    return u * (1.0 + scale) + shift


@triton.jit
def gate(mod_rows, PART: tl.constexpr, cols, mask, D, HAS_MOD: tl.constexpr):
    """adaLN's residual gate (part 2 or 5 of the [6, D] block), or 1 without adaLN; shaped like mask."""
    g = tl.full(mask.shape, 1.0, tl.float32)
    if HAS_MOD:
        g = tl.load(mod_rows + PART * D + cols, mask=mask, other=0.0).to(tl.float32)
    return g


@triton.jit
def add_gated(h_ptr, state_ptr, offs, mask, g, y, WRITE_STATE, DT: tl.constexpr):
    """The gated residual h[offs] += g * y in the fp32 state, and the new h rounded into the output state
    when WRITE_STATE (after an iteration's last block)."""
    hh = tl.load(h_ptr + offs, mask=mask, other=0.0) + g * y
    tl.store(h_ptr + offs, hh, mask=mask)
    if WRITE_STATE:
        tl.store(state_ptr + offs, hh.to(DT), mask=mask)
