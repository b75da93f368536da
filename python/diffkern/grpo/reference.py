"""Flow-GRPO in plain PyTorch: the readable definition, the test oracle (float64) and the "reference" backend.

Per sample, one step sigma -> sigma_next of the flow SDE (specs/grpo.md), dt = sigma_next - sigma < 0, Dt = -dt:
    std = c sigma (rule "wan") or c sqrt(sigma / (1 - s)) (rule "sd3"; s = sigma, or sigma_next at sigma == 1)
    mu  = a x + b v,   a = 1 + std^2 dt / (2 sigma),   b = (1 + std^2 (1 - sigma) / (2 sigma)) dt
    x'  = mu + std sqrt(Dt) eps
    log p = mean over elements of [-(x' - mu)^2 / (2 std^2 Dt)] - log(std sqrt(Dt)) - log sqrt(2 pi)
    1/lambda = 1 / (sqrt(Dt) / std + std sqrt(Dt) (1 - sigma) / (2 sigma))       (TGR)

Since a depends on the step only, x' - mu = y - b v with the residual target y = x' - a x = b v + std sqrt(Dt) eps:
the loss needs y and v alone. A rollout that stores y instead of (x, x') halves what the loss reads, and
y is more exact in a low-precision dtype (it is O(std sqrt(Dt)) where x' is O(1), so its rounding
error is that much smaller and x' - a x does not cancel).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import _dtypes

STD_RULES = {"wan": 0, "sd3": 1}
SD3_STD_COEF = 0.7


def flow_sigmas(steps: int = 20, shift: float = 3.0, dtype=torch.float64) -> torch.Tensor:
    """The shifted flow schedule [steps + 1]: sigma = shift u / (1 + (shift - 1) u), u from 0.999 down to 0."""
    u = torch.linspace(0.999, 0.0, steps + 1, dtype=torch.float64)
    return (shift * u / (1 + (shift - 1) * u)).to(dtype)


# Wan's c is the schedule's second sigma (~0.98242).
WAN_STD_COEF = flow_sigmas()[1].item()


def default_std_coef(std_rule: str) -> float:
    return WAN_STD_COEF if std_rule == "wan" else SD3_STD_COEF


class StepCoef(NamedTuple):
    """Per-sample scalars of one step ([B] tensors); csrc/include/diffkern/grpo_math.h is the same math."""
    a: torch.Tensor
    b: torch.Tensor
    noise_scale: torch.Tensor
    inv_2var: torch.Tensor
    log_norm: torch.Tensor
    inv_lambda: torch.Tensor


def step_std(sigma: torch.Tensor, sigma_next: torch.Tensor, std_rule: int, std_coef: float) -> torch.Tensor:
    """The step's std [B]: c sigma ("wan"), or Flow-GRPO's SD3 form c sqrt(sigma / (1 - s)) ("sd3").

    s = sigma, except at sigma == 1 (the first sigma of diffusers' flow-matching schedules), where the
    square root would divide by zero: there Flow-GRPO's sd3_sde_with_logprob puts the schedule's second
    sigma (scheduler.sigmas[1]) in the denominator, which at that first step is the step's sigma_next; so
    s = sigma_next, and no argument is added. Every other factor of the step is finite at sigma = 1 and at
    sigma_next = 0.
    """
    if std_rule == STD_RULES["wan"]:
        return std_coef * sigma
    return std_coef * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_next, sigma)))


def step_coefficients(sigma: torch.Tensor, sigma_next: torch.Tensor, std_rule: int, std_coef: float) -> StepCoef:
    dt = sigma_next - sigma
    Dt = -dt
    std = step_std(sigma, sigma_next, std_rule, std_coef)
    s2, sqrt_Dt = std * std, torch.sqrt(Dt)
    lam = sqrt_Dt / std + std * sqrt_Dt * (1 - sigma) / (2 * sigma)
    return StepCoef(1 + s2 * dt / (2 * sigma), (1 + s2 * (1 - sigma) / (2 * sigma)) * dt, std * sqrt_Dt,
                    1 / (2 * s2 * Dt), torch.log(std * sqrt_Dt) + 0.5 * math.log(2 * math.pi), 1 / lam)


def _coefficients(x, sigma, sigma_next, std_rule, std_coef) -> StepCoef:
    acc = _dtypes.acc(x.dtype)
    return step_coefficients(sigma.to(acc), sigma_next.to(acc), std_rule, std_coef)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [B, D] (an empty batch included)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def _per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def flow_sde_step(x, v, sigma, sigma_next, noise, std_rule, std_coef):
    """Reference backend of diffkern::flow_sde_step: (x_next, y, log_prob, inv_lambda), math in x's opmath dtype."""
    acc = _dtypes.acc(x.dtype)
    c = _coefficients(x, sigma, sigma_next, std_rule, std_coef)
    bv = _per_sample(c.b, x) * v.to(acc)
    y = bv + _per_sample(c.noise_scale, x) * noise.to(acc)
    x_next = _per_sample(c.a, x) * x.to(acc) + y
    # log p of y as stored (rounded to x's dtype): the value the loss reads back
    sq = _rows(y.to(x.dtype).to(acc) - bv).pow(2).mean(1)
    return x_next.to(x.dtype), y.to(x.dtype), -sq * c.inv_2var - c.log_norm, c.inv_lambda


def guided(v, v_uncond, cfg_scale):
    """The velocity trained through: v, or v_uncond + w (v - v_uncond) under classifier-free guidance."""
    return v if v_uncond is None else v_uncond + cfg_scale * (v - v_uncond)


def residual(c: StepCoef, v, x, target):
    """x_next - mu in the accumulation dtype of v (already widened): target - a x - b v, where target is
    x_next when x is given, else the residual target y = x_next - a x."""
    r = target.to(v.dtype) - _per_sample(c.b, v) * v
    return r if x is None else r - _per_sample(c.a, v) * x.to(v.dtype)


def log_prob(v, x, target, sigma, sigma_next, v_ref, v_uncond, cfg_scale, std_rule, std_coef):
    """Reference backend of diffkern::grpo_log_prob, differentiable: (log_prob, kl, inv_lambda), each [B].

    kl = mean((mu - mu_ref)^2) / (2 std^2 Dt), where mu - mu_ref = b (v - v_ref); zeros without v_ref.
    """
    acc = _dtypes.acc(target.dtype)
    c = _coefficients(target, sigma, sigma_next, std_rule, std_coef)
    vg = guided(v.to(acc), None if v_uncond is None else v_uncond.to(acc), cfg_scale)
    lp = -_rows(residual(c, vg, x, target)).pow(2).mean(1) * c.inv_2var - c.log_norm
    if v_ref is None:
        return lp, torch.zeros_like(lp), c.inv_lambda
    dmu = _rows(_per_sample(c.b, vg) * (vg - v_ref.to(acc)))
    return lp, dmu.pow(2).mean(1) * c.inv_2var, c.inv_lambda


def log_prob_bwd(dlog_prob, dkl, v, x, target, sigma, sigma_next, v_ref, v_uncond, cfg_scale, std_rule, std_coef):
    """Reference backend of diffkern::grpo_log_prob_bwd: the spec's gradient formulas, written out.

        dv = b / (std^2 Dt D) [dlog_prob (x' - mu) + dkl b (v - v_ref)];  under CFG dv_c = w dv, dv_u = (1 - w) dv
    """
    acc = _dtypes.acc(target.dtype)
    c = _coefficients(target, sigma, sigma_next, std_rule, std_coef)
    D = max(math.prod(target.shape[1:]), 1)
    vg = guided(v.to(acc), None if v_uncond is None else v_uncond.to(acc), cfg_scale)
    k = _per_sample(2 * c.b * c.inv_2var / D, vg)
    dv = k * _per_sample(dlog_prob.to(acc), vg) * residual(c, vg, x, target)
    if v_ref is not None:
        dv = dv + k * _per_sample(dkl.to(acc) * c.b, vg) * (vg - v_ref.to(acc))
    dtype = target.dtype
    if v_uncond is None:
        return [dv.to(dtype)]
    return [(cfg_scale * dv).to(dtype), ((1 - cfg_scale) * dv).to(dtype)]


def tgr_weights(inv_lambda: torch.Tensor) -> torch.Tensor:
    """TGR: w_i = (1/lambda_i) / mean(1/lambda) over the batch, so the weights average 1."""
    return inv_lambda / inv_lambda.mean() if inv_lambda.numel() else inv_lambda


def ppo_loss(log_prob, kl, log_prob_old, advantages, weights, clip_eps: float, beta: float):
    """loss = mean_i max(-w A r, -w A clip(r, 1 - eps, 1 + eps)) + beta mean(kl), r = exp(log p - log p_old), and stats.

    Shared by every backend: it is [B]-sized, so plain PyTorch (and autograd) is the right tool.
    An empty batch gives loss 0.
    """
    n = max(log_prob.shape[0], 1)
    delta = log_prob - log_prob_old.to(log_prob.dtype)
    ratio = torch.exp(delta)
    wa = weights.to(log_prob.dtype) * advantages.to(log_prob.dtype)
    per_sample = torch.maximum(-wa * ratio, -wa * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps))
    loss = per_sample.sum() / n
    if beta:
        loss = loss + beta * kl.sum() / n
    with torch.no_grad():
        stats = {"approx_kl": 0.5 * delta.pow(2).sum() / n,
                 "clip_fraction": ((ratio - 1).abs() > clip_eps).to(log_prob.dtype).sum() / n,
                 "ratio_mean": ratio.sum() / n,
                 "weights": weights.detach()}
    return loss, stats


def ppo_epilogue(log_prob, kl, inv_lambda, log_prob_old, advantages, clip_eps: float, tgr: bool, beta: float,
                 tgr_mean=None):
    """The [B] epilogue of diffkern::grpo_iso_loss with its derivatives written out (no autograd): the Python
    backends' twin of the C++ kernel's (csrc/include/diffkern/grpo_math.h `ppo_term`, the same math).

    Returns (loss, approx_kl, clip_fraction, ratio_mean, weights, dloss_dsample): ppo_loss's loss and
    statistics with the TGR weights (the mean of inv_lambda: tgr_mean, else this batch's), and
    dloss_dsample [3, B] = d loss / d (log_prob, advantages, kl) as autograd takes them through ppo_loss
    (torch.maximum: a tie splits the gradient in halves, NaN sends it to both sides; clamp: gradient
    inside [1 - clip_eps, 1 + clip_eps], bounds included).
    """
    dtype, n = log_prob.dtype, max(log_prob.shape[0], 1)
    if not tgr:
        weights = torch.ones_like(log_prob)
    else:
        weights = inv_lambda / (inv_lambda.sum() / n if tgr_mean is None else tgr_mean.to(dtype).reshape(()))
    delta = log_prob - log_prob_old.to(dtype)
    ratio = torch.exp(delta)
    lo, hi = 1 - clip_eps, 1 + clip_eps
    clipped = torch.clamp(ratio, lo, hi)
    wa = weights * advantages.to(dtype)
    a, b = -wa * ratio, -wa * clipped
    tie = a == b
    ga, gb = torch.where(tie, 0.5, (~(a < b)).to(dtype)), torch.where(tie, 0.5, (~(a > b)).to(dtype))
    in_range = ((ratio >= lo) & (ratio <= hi)).to(dtype)
    dloss_dsample = torch.stack([-wa * (ga + gb * in_range) * ratio, -weights * (ga * ratio + gb * clipped),
                                 torch.full_like(a, beta)]) / n
    loss = torch.maximum(a, b).sum() / n
    if beta:
        loss = loss + beta * kl.sum() / n
    return (loss, 0.5 * delta.pow(2).sum() / n, ((ratio - 1).abs() > clip_eps).to(dtype).sum() / n, ratio.sum() / n,
            weights, dloss_dsample)


def grpo_iso_loss_reference(v, x=None, x_next=None, sigma=None, sigma_next=None, log_prob_old=None, advantages=None,
                            clip_eps=1e-3, tgr=True, beta=0.0, v_ref=None, cfg_scale=None, v_uncond=None,
                            std_rule="wan", std_coef=None, *, y=None):
    """The whole loss in plain PyTorch (autograd does the backward): the oracle of diffkern.grpo_iso_loss."""
    coef = default_std_coef(std_rule) if std_coef is None else std_coef
    rule = STD_RULES[std_rule]
    target = x_next if y is None else y
    lp, kl, inv_lambda = log_prob(v, x, target, sigma, sigma_next, v_ref, v_uncond, cfg_scale, rule, coef)
    weights = tgr_weights(inv_lambda) if tgr else torch.ones_like(lp)
    return ppo_loss(lp, kl, log_prob_old, advantages, weights, clip_eps, beta)
