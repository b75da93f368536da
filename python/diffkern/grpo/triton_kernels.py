"""Triton kernels for Flow-GRPO (specs/grpo.md) and their launchers.

Layout: a sample's D elements are cut into chunks of `tiles_per_chunk` tiles of BLOCK elements; one
program owns one (sample, chunk) and leaves one fp32 partial sum per reduction; finalize_kernel then
adds each sample's partials in chunk order (a fixed-order split reduction: no atomics,
deterministic) and does the per-sample scalar math. Every kernel computes the step's scalars from
sigma itself (`_coefficients`: grpo_math.h's formulas), so a call is two launches and no host-side
tensor math. target is y = x_next - a x (HAS_X off) or x_next (HAS_X on, x read too).
  sde_step_kernel      reads x, v, noise; writes x_next, y; partial sum of (y - b v)^2
  log_prob_fwd_kernel  reads v (+ v_uncond), target (+ x, v_ref); partial sums of (x_next - mu)^2 (and (v - v_ref)^2)
  log_prob_bwd_kernel  reads the same again; writes dv (+ dv_uncond) once
  finalize_kernel      per sample: log_prob, kl, inv_lambda from the partial sums
Bytes per element of B x D (no CFG/KL, y form): forward 2 reads, backward 2 reads + 1 write.

Autotuning (diffkern._autotune) keeps every output bit: log_prob_bwd_kernel is elementwise, so its tile and warps
are free (BWD_CONFIGS). The other three each reduce over every dimension they tile (tl.sum over the BLOCK lanes,
finalize over the chunk partials), and their warps and tile fix the order of those float sums on a GPU (a
different num_warps or BLOCK changes it: tests/test_autotune_candidates.py), so each keeps its one configuration.
"""
from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from .. import _autotune, _dtypes, _triton
from .._autotune import Config, bucket, candidate_specs
from .._triton import KernelSpec

# 1024 elements at 8 per thread (4 warps): the backward keeps ~6 live fp32 tiles (v, v_uncond, x,
# target, v_ref, dv), far below the register budget; the tile is also the interpreter's unit of work.
BLOCK, NUM_WARPS = 1024, 4
BWD_CONFIGS = (Config({"BLOCK": BLOCK}, NUM_WARPS), Config({"BLOCK": 2 * BLOCK}, NUM_WARPS))


@triton.jit
def _tile(pid, n_chunks, tiles_per_chunk, k, D, BLOCK: tl.constexpr):
    """64-bit offsets and mask of tile k of program pid's chunk."""
    b = (pid // n_chunks).to(tl.int64)
    e = ((pid % n_chunks) * tiles_per_chunk + k).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return b * D + e, e < D


@triton.jit
def _coefficients(sigma_ptr, sigma_next_ptr, i, std_coef, STD_RULE: tl.constexpr):
    """Sample i's step scalars (a, b, noise_scale, inv_2var, log_norm, inv_lambda), fp32: the formulas of
    csrc/include/diffkern/grpo_math.h `step_coefficients` (mu = a x + b v)."""
    sigma = tl.load(sigma_ptr + i)
    sigma_next = tl.load(sigma_next_ptr + i)
    dt = sigma_next - sigma
    Dt = -dt
    if STD_RULE == 0:
        std = std_coef * sigma
    else:  # Flow-GRPO's SD3 form: sigma_next in the denominator at sigma == 1 (grpo_math.h step_std)
        std = std_coef * tl.sqrt(sigma / (1.0 - tl.where(sigma == 1.0, sigma_next, sigma)))
    s2 = std * std
    sqrt_Dt = tl.sqrt(Dt)
    half_log_2pi = 0.9189385332046727
    lam = sqrt_Dt / std + std * sqrt_Dt * (1.0 - sigma) / (2.0 * sigma)
    return (1.0 + s2 * dt / (2.0 * sigma), (1.0 + s2 * (1.0 - sigma) / (2.0 * sigma)) * dt, std * sqrt_Dt,
            1.0 / (2.0 * s2 * Dt), tl.log(std * sqrt_Dt) + half_log_2pi, 1.0 / lam)


@triton.jit
def _residual(target_ptr, x_ptr, offs, mask, v, a, b, HAS_X: tl.constexpr):
    """x_next - mu = target - b v (- a x when x is given: target is then x_next, else y), in fp32."""
    r = tl.load(target_ptr + offs, mask=mask, other=0.0).to(tl.float32) - b * v
    if HAS_X:
        r -= a * tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return r


@triton.jit
def _velocity(v_ptr, vu_ptr, offs, mask, cfg_scale, HAS_CFG: tl.constexpr):
    """v, or v_uncond + w (v - v_uncond) under classifier-free guidance, in fp32."""
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_CFG:
        vu = tl.load(vu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = vu + cfg_scale * (v - vu)
    return v


@triton.jit
def sde_step_kernel(x_ptr, v_ptr, noise_ptr, x_next_ptr, y_ptr, partial_ptr, sigma_ptr, sigma_next_ptr, std_coef,
                    D, n_chunks, tiles_per_chunk, STD_RULE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    a, b, noise_scale, _, _, _ = _coefficients(sigma_ptr, sigma_next_ptr, pid // n_chunks, std_coef, STD_RULE)
    acc = tl.zeros([BLOCK], tl.float32)
    for k in range(tiles_per_chunk):
        offs, mask = _tile(pid, n_chunks, tiles_per_chunk, k, D, BLOCK)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        bv = b * tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = bv + noise_scale * tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(x_next_ptr + offs, (a * x + y).to(x_next_ptr.dtype.element_ty), mask=mask)
        y_stored = y.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs, y_stored, mask=mask)
        # log p of y as stored (rounded to x's dtype), the value the loss reads back
        r = tl.where(mask, y_stored.to(tl.float32) - bv, 0.0)
        acc += r * r
    tl.store(partial_ptr + pid, tl.sum(acc, 0))


@triton.jit
def log_prob_fwd_kernel(v_ptr, vu_ptr, x_ptr, target_ptr, ref_ptr, partial_ptr, sigma_ptr, sigma_next_ptr, std_coef,
                        cfg_scale, D, n_chunks, tiles_per_chunk, n_programs, STD_RULE: tl.constexpr,
                        HAS_X: tl.constexpr, HAS_CFG: tl.constexpr, HAS_REF: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    a, b, _, _, _, _ = _coefficients(sigma_ptr, sigma_next_ptr, pid // n_chunks, std_coef, STD_RULE)
    acc_sq = tl.zeros([BLOCK], tl.float32)
    acc_kl = tl.zeros([BLOCK], tl.float32)
    for k in range(tiles_per_chunk):
        offs, mask = _tile(pid, n_chunks, tiles_per_chunk, k, D, BLOCK)
        v = _velocity(v_ptr, vu_ptr, offs, mask, cfg_scale, HAS_CFG)
        r = _residual(target_ptr, x_ptr, offs, mask, v, a, b, HAS_X)
        acc_sq += r * r
        if HAS_REF:
            dv = v - tl.load(ref_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            acc_kl += dv * dv
    tl.store(partial_ptr + pid, tl.sum(acc_sq, 0))
    tl.store(partial_ptr + n_programs + pid, tl.sum(acc_kl, 0))


@triton.jit
def log_prob_bwd_kernel(dv_ptr, dvu_ptr, v_ptr, vu_ptr, x_ptr, target_ptr, ref_ptr, dlog_prob_ptr, dkl_ptr, sigma_ptr,
                        sigma_next_ptr, std_coef, cfg_scale, D, n_chunks, tiles_per_chunk, STD_RULE: tl.constexpr,
                        HAS_X: tl.constexpr, HAS_CFG: tl.constexpr, HAS_REF: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = pid // n_chunks
    a, b, _, inv_2var, _, _ = _coefficients(sigma_ptr, sigma_next_ptr, i, std_coef, STD_RULE)
    # d log_prob / dv = (x_next - mu) b / (std^2 Dt D), d kl / dv = b^2 (v - v_ref) / (std^2 Dt D)
    gain = 2.0 * b * inv_2var / D
    k_lp = tl.load(dlog_prob_ptr + i) * gain
    for k in range(tiles_per_chunk):
        offs, mask = _tile(pid, n_chunks, tiles_per_chunk, k, D, BLOCK)
        v = _velocity(v_ptr, vu_ptr, offs, mask, cfg_scale, HAS_CFG)
        d = k_lp * _residual(target_ptr, x_ptr, offs, mask, v, a, b, HAS_X)
        if HAS_REF:
            k_kl = tl.load(dkl_ptr + i) * gain * b
            d += k_kl * (v - tl.load(ref_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        if HAS_CFG:
            tl.store(dv_ptr + offs, (cfg_scale * d).to(dv_ptr.dtype.element_ty), mask=mask)
            tl.store(dvu_ptr + offs, ((1.0 - cfg_scale) * d).to(dv_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(dv_ptr + offs, d.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def finalize_kernel(partial_ptr, sigma_ptr, sigma_next_ptr, log_prob_ptr, kl_ptr, inv_lambda_ptr, std_coef, inv_D,
                    B, n_chunks, STD_RULE: tl.constexpr, HAS_KL: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sample i = program id: sums its partials in a fixed order, then log_prob, kl, 1/lambda."""
    i = tl.program_id(0)
    _, b, _, inv_2var, log_norm, inv_lambda = _coefficients(sigma_ptr, sigma_next_ptr, i, std_coef, STD_RULE)
    sq = tl.zeros([BLOCK_C], tl.float32)
    kk = tl.zeros([BLOCK_C], tl.float32)
    for c0 in range(0, n_chunks, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        sq += tl.load(partial_ptr + i * n_chunks + c, mask=c < n_chunks, other=0.0)
        if HAS_KL:
            kk += tl.load(partial_ptr + (B + i) * n_chunks + c, mask=c < n_chunks, other=0.0)
    tl.store(log_prob_ptr + i, -tl.sum(sq, 0) * inv_D * inv_2var - log_norm)
    tl.store(kl_ptr + i, b * b * tl.sum(kk, 0) * inv_D * inv_2var)
    tl.store(inv_lambda_ptr + i, inv_lambda)


def _grid(x: torch.Tensor, block: int = BLOCK) -> tuple[int, int, int, int]:
    """(B, D, n_chunks, tiles per chunk) of the split reduction over each sample's elements (tiles of `block`)."""
    B, D = x.shape[0], math.prod(x.shape[1:])
    per_chunk = _triton.tiles_per_chunk(B, triton.cdiv(D, block), x.device)
    return B, D, triton.cdiv(triton.cdiv(D, block), per_chunk), per_chunk


# Chunks summed per step of finalize_kernel's loop.
FINAL_BLOCK_C = 128
_META = dict(BLOCK=BLOCK, num_warps=NUM_WARPS, maxnreg=_triton.register_budget(NUM_WARPS))


def _per_sample_outputs(x, n: int):
    return [_triton.empty(x.shape[:1], torch.float32, x.device) for _ in range(n)]


def _finalize(partial, sigma, sigma_next, std_rule, std_coef, D, has_kl):
    """(log_prob, kl, inv_lambda) [B] fp32 from the [n_sums, B, n_chunks] partial sums."""
    _, B, n_chunks = partial.shape
    outs = _per_sample_outputs(sigma, 3)
    finalize_kernel[(B,)](partial, sigma, sigma_next, *outs, std_coef, 1.0 / D, B, n_chunks, STD_RULE=std_rule,
                          HAS_KL=has_kl, BLOCK_C=FINAL_BLOCK_C, num_warps=1, maxnreg=_triton.register_budget(1))
    return outs


def sde_step(x, v, sigma, sigma_next, eps, std_rule, std_coef):
    """Launches sde_step_kernel and finalize_kernel: (x_next, y, log_prob [B] fp32, inv_lambda [B] fp32)."""
    sigma, sigma_next = _sigmas(sigma, sigma_next)
    x_next, y = _triton.empty(x.shape, x.dtype, x.device), _triton.empty(x.shape, x.dtype, x.device)
    B, D, n_chunks, per_chunk = _grid(x)
    if B == 0:
        return x_next, y, *_per_sample_outputs(x, 2)
    partial = _triton.empty((1, B, n_chunks), torch.float32, x.device)
    sde_step_kernel[(B * n_chunks,)](x, v, eps, x_next, y, partial, sigma, sigma_next, std_coef, D, n_chunks,
                                     per_chunk, STD_RULE=std_rule, **_META)
    log_prob, _, inv_lambda = _finalize(partial, sigma, sigma_next, std_rule, std_coef, D, False)
    return x_next, y, log_prob, inv_lambda


def _sigmas(sigma, sigma_next):
    """sigma and sigma_next as the kernels index them: contiguous fp32 [B] (the caller's may be views)."""
    return sigma.float().contiguous(), sigma_next.float().contiguous()


def _optional(t, fallback):
    """A tensor for a pointer argument the kernel does not read (HAS_CFG/HAS_REF off)."""
    return fallback if t is None else t


def _flags(x, v_ref, v_uncond) -> dict:
    return dict(HAS_X=x is not None, HAS_CFG=v_uncond is not None, HAS_REF=v_ref is not None)


def log_prob_fwd(v, x, target, sigma, sigma_next, v_ref, v_uncond, cfg_scale, std_rule, std_coef):
    """Launches log_prob_fwd_kernel and finalize_kernel: (log_prob, kl, inv_lambda) [B] in fp32."""
    sigma, sigma_next = _sigmas(sigma, sigma_next)
    B, D, n_chunks, per_chunk = _grid(v)
    if B == 0:
        return tuple(_per_sample_outputs(v, 3))
    partial = _triton.empty((2, B, n_chunks), torch.float32, v.device)
    log_prob_fwd_kernel[(B * n_chunks,)](v, _optional(v_uncond, v), _optional(x, v), target, _optional(v_ref, v),
                                         partial, sigma, sigma_next, std_coef, cfg_scale, D, n_chunks, per_chunk,
                                         B * n_chunks, STD_RULE=std_rule, **_flags(x, v_ref, v_uncond), **_META)
    return tuple(_finalize(partial, sigma, sigma_next, std_rule, std_coef, D, v_ref is not None))


def log_prob_bwd(dlog_prob, dkl, v, x, target, sigma, sigma_next, v_ref, v_uncond, cfg_scale, std_rule, std_coef):
    """Launches log_prob_bwd_kernel: [dv] or [dv, dv_uncond] in v's dtype."""
    grads = [_triton.empty(v.shape, v.dtype, v.device) for _ in range(1 if v_uncond is None else 2)]
    sigma, sigma_next = _sigmas(sigma, sigma_next)
    if v.shape[0] == 0:
        return grads

    def launch(config):
        B, D, n_chunks, per_chunk = _grid(v, config.constexprs["BLOCK"])
        return log_prob_bwd_kernel[(B * n_chunks,)](grads[0], grads[-1], v, _optional(v_uncond, v), _optional(x, v),
                                                    target, _optional(v_ref, v), dlog_prob, dkl, sigma, sigma_next,
                                                    std_coef, cfg_scale, D, n_chunks, per_chunk, STD_RULE=std_rule,
                                                    **_flags(x, v_ref, v_uncond), **config.meta())

    key = (_dtypes.name(v.dtype), *_flags(x, v_ref, v_uncond).values(), bucket(v.numel()))
    launch(_autotune.pick("log_prob_bwd_kernel", key, BWD_CONFIGS, launch, kernel=log_prob_bwd_kernel))
    return grads


def aot_specs() -> list[KernelSpec]:
    """Every launch configuration: one per kernel, dtype, std rule and (HAS_X, HAS_CFG, HAS_REF); the backward
    with each autotune candidate."""
    specs = []
    grid = {"D": "i32", "n_chunks": "i32", "tiles_per_chunk": "i32"}
    step = {"sigma_ptr": "*fp32", "sigma_next_ptr": "*fp32", "std_coef": "fp32"}
    maxnreg = _META["maxnreg"]
    for rule, has_kl in itertools.product((0, 1), (False, True)):
        specs.append(KernelSpec(
            f"finalize_kernel[STD_RULE={rule},HAS_KL={has_kl}]", finalize_kernel,
            {"partial_ptr": "*fp32", "sigma_ptr": "*fp32", "sigma_next_ptr": "*fp32", "log_prob_ptr": "*fp32",
             "kl_ptr": "*fp32", "inv_lambda_ptr": "*fp32", "std_coef": "fp32", "inv_D": "fp32", "B": "i32",
             "n_chunks": "i32", "STD_RULE": "constexpr", "HAS_KL": "constexpr", "BLOCK_C": "constexpr"},
            {"STD_RULE": rule, "HAS_KL": has_kl, "BLOCK_C": FINAL_BLOCK_C}, 1, _triton.register_budget(1),
            {"std_rule": rule}))
    for rule in (0, 1):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            ty = _triton.TRITON_DTYPE[dtype]
            p = f"*{ty}"
            tags = {"dtype": _dtypes.name(dtype), "std_rule": rule}
            specs.append(KernelSpec(
                f"sde_step_kernel[{ty},STD_RULE={rule}]", sde_step_kernel,
                {"x_ptr": p, "v_ptr": p, "noise_ptr": p, "x_next_ptr": p, "y_ptr": p, "partial_ptr": "*fp32", **step,
                 **grid, "STD_RULE": "constexpr", "BLOCK": "constexpr"},
                {"STD_RULE": rule, "BLOCK": BLOCK}, NUM_WARPS, maxnreg, tags))
            for has_x, cfg, ref in itertools.product((False, True), repeat=3):
                constexprs = {"STD_RULE": rule, "HAS_X": has_x, "HAS_CFG": cfg, "HAS_REF": ref, "BLOCK": BLOCK}
                flags = {k: "constexpr" for k in constexprs}
                latents = {"v_ptr": p, "vu_ptr": p, "x_ptr": p, "target_ptr": p, "ref_ptr": p}
                name = f"[{ty},STD_RULE={rule},HAS_X={has_x},HAS_CFG={cfg},HAS_REF={ref}]"
                specs.append(KernelSpec(
                    f"log_prob_fwd_kernel{name}", log_prob_fwd_kernel,
                    {**latents, "partial_ptr": "*fp32", **step, "cfg_scale": "fp32", **grid, "n_programs": "i32",
                     **flags}, constexprs, NUM_WARPS, maxnreg, {**tags, "backward": False}))
                specs += candidate_specs(
                    f"log_prob_bwd_kernel{name}", log_prob_bwd_kernel,
                    {"dv_ptr": p, "dvu_ptr": p, **latents, "dlog_prob_ptr": "*fp32", "dkl_ptr": "*fp32", **step,
                     "cfg_scale": "fp32", **grid, **flags}, constexprs, BWD_CONFIGS, {**tags, "backward": True})
    return specs
