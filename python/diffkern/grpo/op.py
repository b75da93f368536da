"""Flow-GRPO as torch ops: argument checks, fake (meta) implementations, backends, public API.

The schemas live in csrc/diffkern/ops.cpp, the C++ CPU kernels in csrc/cpu/grpo.cpp and the autograd in
csrc/diffkern/autograd_grpo.cpp; this file
registers everything Python owns for diffkern::flow_sde_step / grpo_log_prob / grpo_log_prob_bwd / grpo_iso_loss.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from .. import _checks, _dtypes, _lazy, _nvtx, _ops, _registry, _triton
from . import cuda_ops, distributed, reference  # noqa: F401 (cuda_ops: fakes)
triton_kernels = _lazy.module(__package__ + ".triton_kernels")  # imports triton on first use

STEP_OP, LOSS_OP = "flow_sde_step", "grpo_iso_loss"


def _check_latents(op, lead: str, x, others: dict, sigma, sigma_next, std_rule, std_coef) -> None:
    """The checks csrc/cpu/grpo.cpp makes, in the same order and words; `lead` names x, which sets the
    shape, dtype and device of the other latents. The C++ CPU kernels also check the step values
    (check_steps: they are on the host there); the backends registered here are the GPU's (and model
    it when forced on CPU tensors), so they read no values back."""
    def fail(msg):
        raise ValueError(f"{op}: {msg}")
    if x.dim() < 1:
        fail(f"{lead} must be [B, ...], got a 0-dim tensor")
    _checks.check_float_contiguous(op, lead, x)
    for name, y in others.items():
        if y is None:
            continue
        if y.shape != x.shape:
            fail(f"{name} has shape {list(y.shape)} but {lead} has shape {list(x.shape)}")
        _checks.check_like(op, name, y, lead, x)
    B = x.shape[0]
    if B > 0 and x.numel() == 0:
        fail(f"{lead} must have at least one element per sample, got shape {list(x.shape)}")
    for name, s in (("sigma", sigma), ("sigma_next", sigma_next)):
        if s.device != x.device:
            fail(f"{name} is on {s.device} but {lead} is on {x.device}")
        if s.dim() != 1 or s.shape[0] != B:
            fail(f"{name} must be [B] = [{B}], got shape {list(s.shape)}")
        if s.dtype not in (torch.float32, torch.float64):
            fail(f"{name} dtype must be float32 or float64, got {_dtypes.name(s.dtype)}")
    if std_rule not in reference.STD_RULES.values():
        fail(f"std_rule must be 0 (wan) or 1 (sd3), got {std_rule}")
    if not 0 < std_coef < math.inf:
        fail(f"std_coef must be finite and > 0, got {std_coef}")


def check_sde_step(x, v, sigma, sigma_next, eps, std_rule, std_coef) -> None:
    _check_latents(STEP_OP, "x", x, {"v": v, "eps": eps}, sigma, sigma_next, std_rule, std_coef)


def check_log_prob(v, x, target, sigma, sigma_next, v_ref, v_uncond, cfg_scale, std_rule, std_coef) -> None:
    # target is the caller's x_next (with x) or y (without): named so
    _check_latents(LOSS_OP, "v", v, {"x_next" if x is not None else "y": target, "x": x, "v_ref": v_ref,
                                     "v_uncond": v_uncond}, sigma, sigma_next, std_rule, std_coef)
    if not -math.inf < cfg_scale < math.inf:
        raise ValueError(f"{LOSS_OP}: cfg_scale must be finite, got {cfg_scale}")


def check_log_prob_bwd(dlog_prob, dkl, v, *rest) -> None:
    check_log_prob(v, *rest)
    acc, B = _dtypes.acc(v.dtype), v.shape[0]
    for name, t in (("dlog_prob", dlog_prob), ("dkl", dkl)):
        if t.device != v.device:
            raise ValueError(f"{LOSS_OP}: {name} is on {t.device} but v is on {v.device}")
        if list(t.shape) != [B] or t.dtype != acc or not t.is_contiguous():
            raise ValueError(
                f"{LOSS_OP}: {name} must be a contiguous [B] = [{B}] tensor of dtype {_dtypes.name(acc)} (the accumulation "
                f"dtype), got shape {list(t.shape)}, dtype {_dtypes.name(t.dtype)}, strides {list(t.stride())}")


def _triton_backend(launch, x_arg: int, op: str):
    """The Triton backend: `launch`, once x (argument `x_arg`) is known not to be float64."""
    def run(*args):
        _triton.check_float32_math(op, args[x_arg].dtype, "latents")
        return launch(*args)
    return run


def _check_ppo_args(v, v_ref, v_uncond, cfg_scale, log_prob_old, advantages, clip_eps, beta, tgr_mean) -> None:
    """The arguments of diffkern::grpo_iso_loss that grpo_log_prob does not take: csrc/cpu/grpo.cpp
    `check_ppo_args`, in the same order and words."""
    if (cfg_scale is None) != (v_uncond is None):
        raise ValueError(f"{LOSS_OP}: cfg_scale and v_uncond go together (got cfg_scale={cfg_scale}, "
                         f"v_uncond {'given' if v_uncond is not None else 'None'})")
    if not 0 <= clip_eps < math.inf:  # comparisons, not math.isfinite: they trace (symbolic floats)
        raise ValueError(f"{LOSS_OP}: clip_eps must be finite and >= 0, got {clip_eps}")
    if not 0 <= beta < math.inf:
        raise ValueError(f"{LOSS_OP}: beta must be finite and >= 0, got {beta}")
    if beta > 0 and v_ref is None:
        raise ValueError(f"{LOSS_OP}: beta = {beta} > 0 weights a KL term to the reference policy: give v_ref "
                         "(or beta = 0)")
    _check_per_sample("log_prob_old", log_prob_old, v)
    _check_per_sample("advantages", advantages, v)
    if tgr_mean is not None:
        if tgr_mean.device != v.device:
            raise ValueError(f"{LOSS_OP}: tgr_mean is on {tgr_mean.device} but v is on {v.device}")
        if tgr_mean.numel() != 1 or not tgr_mean.is_floating_point():
            raise ValueError(f"{LOSS_OP}: tgr_mean must be a floating one-element tensor, got shape "
                             f"{list(tgr_mean.shape)}, dtype {_dtypes.name(tgr_mean.dtype)}")


def check_iso_loss(v, x, x_next, y, sigma, sigma_next, log_prob_old, advantages, v_ref, v_uncond, cfg_scale,
                   clip_eps, tgr, beta, std_rule, std_coef, tgr_mean) -> None:
    """diffkern::grpo_iso_loss's checks (csrc/cpu/grpo.cpp `grpo_iso_loss_cpu`): the stored step, the PPO
    arguments, then grpo_log_prob's."""
    x, target = _target(x, x_next, y)
    _check_ppo_args(v, v_ref, v_uncond, cfg_scale, log_prob_old, advantages, clip_eps, beta, tgr_mean)
    check_log_prob(v, x, target, sigma, sigma_next, v_ref if beta > 0 else None, v_uncond,
                   1.0 if cfg_scale is None else cfg_scale, std_rule, std_coef)


def _iso_loss_with(log_prob):
    """A Python backend of diffkern::grpo_iso_loss (the GPU's, and "reference"): `log_prob` (grpo_log_prob's
    backend of the same name, whose arguments check_iso_loss has checked already; the op itself in the fake),
    then the [B] epilogue in PyTorch (reference.ppo_epilogue, grpo_math.h's `ppo_term`)."""
    def run(v, x, x_next, y, sigma, sigma_next, log_prob_old, advantages, v_ref, v_uncond, cfg_scale, clip_eps, tgr,
            beta, std_rule, std_coef, tgr_mean):
        x, target = _target(x, x_next, y)
        log_p, kl, inv_lambda = log_prob(v, x, target, sigma, sigma_next, v_ref if beta > 0 else None, v_uncond,
                                         1.0 if cfg_scale is None else cfg_scale, std_rule, std_coef)
        return reference.ppo_epilogue(log_p, kl, inv_lambda, log_prob_old, advantages, clip_eps, tgr, beta, tgr_mean)
    return run


_registry.register("flow_sde_step", check_sde_step,
                   triton=_triton_backend(triton_kernels.function("sde_step"), 0, STEP_OP),
                   reference=reference.flow_sde_step, cuda=_ops.ops.flow_sde_step_cuda)
_registry.register("grpo_log_prob", check_log_prob,
                   triton=_triton_backend(triton_kernels.function("log_prob_fwd"), 0, LOSS_OP),
                   reference=reference.log_prob, cuda=_ops.ops.grpo_log_prob_cuda)
_registry.register("grpo_log_prob_bwd", check_log_prob_bwd,
                   triton=_triton_backend(triton_kernels.function("log_prob_bwd"), 2, LOSS_OP),
                   reference=reference.log_prob_bwd, cuda=_ops.ops.grpo_log_prob_bwd_cuda)
_registry.register("grpo_iso_loss", check_iso_loss, cuda_twin="grpo_log_prob",
                   **{name: _iso_loss_with(_registry.unchecked("grpo_log_prob", name))
                      for name in ("triton", "reference", "cuda")})


@_registry.register_fake("diffkern::flow_sde_step")
def _sde_step_fake(x, v, sigma, sigma_next, eps, std_rule, std_coef):
    check_sde_step(x, v, sigma, sigma_next, eps, std_rule, std_coef)
    acc = _dtypes.acc(x.dtype)
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape[:1], dtype=acc), \
        x.new_empty(x.shape[:1], dtype=acc)


@_registry.register_fake("diffkern::grpo_log_prob")
def _log_prob_fake(v, *rest):
    check_log_prob(v, *rest)
    return tuple(v.new_empty(v.shape[:1], dtype=_dtypes.acc(v.dtype)) for _ in range(3))


@_registry.register_fake("diffkern::grpo_log_prob_bwd")
def _log_prob_bwd_fake(dlog_prob, dkl, v, x, target, sigma, sigma_next, v_ref, v_uncond, *rest):
    check_log_prob_bwd(dlog_prob, dkl, v, x, target, sigma, sigma_next, v_ref, v_uncond, *rest)
    return [v.new_empty(v.shape) for _ in range(1 if v_uncond is None else 2)]


@_registry.register_fake("diffkern::grpo_iso_loss")
def _iso_loss_fake(*args):
    """The Python backend itself: grpo_log_prob's fake, then the epilogue's [B] ops on fake tensors (so that
    counting aten traffic on meta tensors sees the epilogue the GPU backends run: bench/grpo_model.py)."""
    check_iso_loss(*args)
    return _iso_loss_with(lambda *a: _ops.ops.grpo_log_prob(*a))(*args)


_DEFAULT_RULES = {name: (rule, reference.default_std_coef(name)) for name, rule in reference.STD_RULES.items()}
_DIST = dist.is_available()
_NO_RANGE = contextlib.nullcontext()  # NVTX off: no range object per call (a tiny call's time is in such things)


def _rule(op: str, std_rule: str, std_coef):
    if not isinstance(std_rule, str) or std_rule not in reference.STD_RULES:
        raise ValueError(f"{op}: std_rule must be 'wan' or 'sd3', got {std_rule!r}")
    return reference.STD_RULES[std_rule], _checks.number(
        op, "std_coef", reference.default_std_coef(std_rule) if std_coef is None else std_coef)


def flow_sde_step(x, v, sigma, sigma_next, eps=None, std_rule: str = "wan", std_coef: float | None = None,
                  generator=None):
    """One stochastic flow-matching step with its Gaussian log-probability and the TGR factor 1/lambda.

    Per sample i (specs/grpo.md), dt = sigma_next - sigma < 0, Dt = -dt, std = c sigma ("wan", c = the
    Wan schedule's sigma_1 ~ 0.98242 by default) or Flow-GRPO's SD3 form c sqrt(sigma / (1 - s)) ("sd3",
    c = 0.7), s = sigma except at sigma == 1, where s = sigma_next:
        mu = a x + b v,  a = 1 + std^2 dt / (2 sigma),  b = (1 + std^2 (1 - sigma) / (2 sigma)) dt
        y = b v + std sqrt(Dt) eps,  x_next = a x + y  (= mu + std sqrt(Dt) eps)
        log_prob = mean_e[-(y - b v)^2 / (2 std^2 Dt)] - log(std sqrt(Dt)) - log sqrt(2 pi)
        inv_lambda = 1 / (sqrt(Dt) / std + std sqrt(Dt) (1 - sigma) / (2 sigma))
    y = x_next - a x is the residual target: store it for training and pass it to grpo_iso_loss(y=...),
    which then reads 2 latent tensors instead of 3 (x_next - mu = y - b v), and more exactly in a low
    precision dtype (y is O(std sqrt(Dt)) where x_next is O(1)).
    The "sd3" std divides by 1 - sigma, and sigma = 1 is the first sigma of diffusers' flow-matching
    schedules (SD3, FLUX, Wan): there Flow-GRPO (sd3_sde_with_logprob) replaces that sigma by the schedule's
    second one, scheduler.sigmas[1], which at the first step is the step's sigma_next; so every step of a
    diffusers schedule, the first (sigma = 1) and the last (sigma_next = 0) included, is finite. The rest
    of the step divides by sigma, never by 1 - sigma.

    Args:
        x, v: [B, ...] contiguous latents and (guided) velocity, float16/bfloat16/float32 (float64 on cpu/reference).
        sigma, sigma_next: [B] float32/float64 (each sample at its own step).
        eps: the standard normal noise, x's shape and dtype; drawn with `generator` when None.
    Returns:
        (x_next, y) in x's dtype; (log_prob, inv_lambda) [B] float32 (float64 for float64). log_prob is
        of y as stored (the x_next/x form of the loss re-reads rounded x and x_next, so in bfloat16 its
        on-policy ratio is 1 only to that rounding). Autograd: none, a rollout op: the outputs never require
        grad, whatever the inputs (so there is no double backward either). Nothing is saved. Traffic: reads
        x, v, eps; writes x_next, y.
    Backends: C++ (CPU tensors), CUDA C++ or Triton (CUDA tensors; CUDA C++ when built with CUDA), reference;
        see `diffkern.backend`.
    Bad input: TypeError (not a tensor, std_coef not a number) or ValueError (shape, dtype, device, an
        unknown std_rule), naming the argument. The step must satisfy 0 <= sigma_next < sigma <= 1 (either
        std_rule): the CPU kernels, which have the values on the host, raise a ValueError naming sigma and
        sigma_next; on CUDA tensors they are not read back (no host sync), and a sample with an invalid
        step gets NaN/inf (as with the Python backends forced on CPU tensors).
    NaN/inf policy: propagated like the reference: NaN/inf in a sample's x, v or eps make that sample's
        outputs NaN/inf; other samples are unaffected.
    """
    x, v, sigma, sigma_next = (_checks.tensor(STEP_OP, n, t) for n, t in
                               (("x", x), ("v", v), ("sigma", sigma), ("sigma_next", sigma_next)))
    _checks.tensor(STEP_OP, "eps", eps, optional=True)
    rule, coef = _rule(STEP_OP, std_rule, std_coef)
    if eps is None:
        # No generator=None argument: fake tensors refuse it under dynamic shapes (torch.compile).
        extra = {} if generator is None else {"generator": generator}
        eps = torch.randn(x.shape, dtype=x.dtype, device=x.device, **extra)
    with _nvtx.range("diffkern.flow_sde_step"):
        return _ops.ops.flow_sde_step(x, v, sigma, sigma_next, eps, rule, coef)


def _check_per_sample(name, t, v):
    _checks.tensor(LOSS_OP, name, t, optional=True)
    if t is not None and t.device != v.device:
        raise ValueError(f"{LOSS_OP}: {name} is on {t.device} but v is on {v.device}")
    if t is None or list(t.shape) != [v.shape[0]] or not t.is_floating_point():
        got = "None" if t is None else f"shape {list(t.shape)}, dtype {_dtypes.name(t.dtype)} on {t.device}"
        raise ValueError(f"{LOSS_OP}: {name} must be a floating [B] = [{v.shape[0]}] tensor on {v.device}, got {got}")


def _target(x, x_next, y):
    """(x, target) of grpo_log_prob: (x, x_next) for the stored pair, (None, y) for the residual target."""
    if y is None and x is not None and x_next is not None:
        return x, x_next
    if y is not None and x is None and x_next is None:
        return None, y
    raise ValueError(f"{LOSS_OP}: give the stored step either as x and x_next, or as y alone (flow_sde_step's "
                     f"residual target x_next - a x); got x {'given' if x is not None else 'None'}, x_next "
                     f"{'given' if x_next is not None else 'None'}, y {'given' if y is not None else 'None'}")


def grpo_iso_loss(v, x=None, x_next=None, sigma=None, sigma_next=None, log_prob_old=None, advantages=None,
                  clip_eps: float = 1e-3, tgr: bool = True, beta: float = 0.0, v_ref=None,
                  cfg_scale: float | None = None, v_uncond=None, std_rule: str = "wan", std_coef: float | None = None,
                  *, y=None, group=None):
    """Flow-GRPO's one-step PPO loss with TGR weights, recomputing log p from the velocity (specs/grpo.md).

        r_i = exp(log p_theta(x_next_i | x_i) - log_prob_old_i),   w_i = (1/lambda_i) / mean(1/lambda)  (1 without tgr)
        loss = mean_i max(-w_i A_i r_i, -w_i A_i clip(r_i, 1 - clip_eps, 1 + clip_eps))
               + beta mean_i mean_e (mu - mu_ref)^2 / (2 std^2 Dt)          (with v_ref)
    The velocity is v, or v_uncond + cfg_scale (v - v_uncond) when v_uncond (the conditional one is v).
    The stored step is x and x_next, or (keyword) y = x_next - a x from flow_sde_step: x_next - mu is
    y - b v, so the y form reads 2 latent tensors where the pair form reads 3 (see flow_sde_step).

    Args:
        v: [B, ...] velocity (conditional under CFG) with grad; x, x_next or y: the stored step; v_ref,
            v_uncond: optional; all the same shape and dtype, contiguous, float16/bfloat16/float32
            (float64 on cpu/reference). sigma, sigma_next: [B] float32/float64; log_prob_old,
            advantages: [B] (all four required). v_ref is read only when beta > 0.
    Returns:
        (loss, stats): loss a 0-dim float32 (float64 for float64) tensor; stats holds approx_kl =
        0.5 mean((log p - log p_old)^2), clip_fraction = mean(|r - 1| > clip_eps), ratio_mean and weights.
        An empty batch gives loss 0.
    Autograd: gradients reach v (and v_uncond: dv_c = w dv, dv_u = (1 - w) dv) through one fused backward
        that re-reads its latent inputs and writes each gradient once; log_prob_old and advantages get theirs
        too. Saved: the inputs and 3 x B numbers (no temporaries).
        Double backward is refused: differentiating the gradient raises NotImplementedError naming
        diffkern.grpo_iso_loss.
        Traffic per step without CFG or KL, in passes over B x D: y form 2 reads + (2 reads, 1 write) = 5;
        pair form 3 + (3, 1) = 7.
    Backends: C++ (CPU tensors), CUDA C++ or Triton (CUDA tensors; CUDA C++ when built with CUDA), reference;
        see `diffkern.backend`. One op call, diffkern::grpo_iso_loss: on CPU tensors one C++ kernel checks the
        arguments and computes log p and the PPO epilogue; the other backends run grpo_log_prob's and the
        epilogue in PyTorch. The TGR mean is over the global batch: every rank's samples of `group`
        (default: the default group) when torch.distributed is initialised (1/lambda from the sigmas, an
        all-reduce of two numbers, then the op), else this batch.
    Bad input: TypeError (not a tensor, a scalar not a number) or ValueError (shape, dtype, device, the
        stored step given both ways, beta > 0 without v_ref, cfg_scale without v_uncond), naming the
        argument. The step values are checked as in flow_sde_step (by the CPU kernels; NaN/inf on a GPU).
    NaN/inf policy: propagated like the reference: NaN/inf in a sample's latents or per-sample inputs make
        that sample's log p (and the loss, a mean over samples) NaN/inf, and its gradients NaN (the other
        samples' gradients are unaffected, as autograd through the reference gives them).
    """
    # (group and is_initialized first: the common call, one process, pays for one check)
    # (a bool is a number to the op's schema but not to diffkern: such a call takes the checked path)
    if not (tgr and (group is not None or _DIST and dist.is_initialized()) and distributed._distributed(group)) \
            and bool not in (clip_eps.__class__, beta.__class__, cfg_scale.__class__):
        try:  # the op checks its arguments (in C++ on CPU tensors): no Python checks on the way in
            return _loss(v, x, x_next, y, sigma, sigma_next, log_prob_old, advantages, v_ref, v_uncond, cfg_scale,
                         clip_eps, tgr, beta, std_rule, std_coef)
        except (TypeError, RuntimeError):
            pass  # a Python value the op's schema refuses (a numpy array, None, a string): named below
    args = _checked_loss_args(v, x, x_next, y, sigma, sigma_next, log_prob_old, advantages, v_ref, v_uncond, cfg_scale,
                              clip_eps, tgr, beta, std_rule, std_coef)
    tgr_mean = None
    if tgr and distributed._distributed(group):  # the TGR mean of every rank's 1/lambda, then the op
        rule, coef = _rule(LOSS_OP, std_rule, std_coef)
        inv_lambda = reference.step_coefficients(*(s.to(_dtypes.acc(v.dtype)) for s in (sigma, sigma_next)), rule,
                                                 coef).inv_lambda
        tgr_mean = distributed.global_mean(inv_lambda, group)
    return _loss(*args, tgr_mean)


def _loss(v, x, x_next, y, sigma, sigma_next, log_prob_old, advantages, v_ref, v_uncond, cfg_scale, clip_eps, tgr,
          beta, std_rule, std_coef, tgr_mean=None):
    """grpo_iso_loss's one op call, as (loss, stats)."""
    rule, coef = _DEFAULT_RULES[std_rule] if std_coef is None and std_rule in _DEFAULT_RULES else \
        _rule(LOSS_OP, std_rule, std_coef)
    with _nvtx.range("diffkern.grpo_iso_loss") if _nvtx.ENABLED else _NO_RANGE:
        loss, approx_kl, clip_fraction, ratio_mean, weights, _ = _ops.ops.grpo_iso_loss(
            v, x, x_next, y, sigma, sigma_next, log_prob_old, advantages, v_ref, v_uncond, cfg_scale, clip_eps,
            bool(tgr), beta, rule, coef, tgr_mean)
    return loss, {"approx_kl": approx_kl, "clip_fraction": clip_fraction, "ratio_mean": ratio_mean, "weights": weights}


def _checked_loss_args(v, x, x_next, y, sigma, sigma_next, log_prob_old, advantages, v_ref, v_uncond, cfg_scale,
                       clip_eps, tgr, beta, std_rule, std_coef):
    """grpo_iso_loss's arguments checked in Python (a TypeError or ValueError naming the argument), the
    numbers as floats: the path of a call the op refused, and of the distributed TGR mean."""
    _checks.tensor(LOSS_OP, "v", v)
    for name, t in (("x", x), ("x_next", x_next), ("y", y), ("v_ref", v_ref), ("v_uncond", v_uncond)):
        _checks.tensor(LOSS_OP, name, t, optional=True)
    _rule(LOSS_OP, std_rule, std_coef)
    _target(x, x_next, y)
    clip_eps, beta = _checks.number(LOSS_OP, "clip_eps", clip_eps), _checks.number(LOSS_OP, "beta", beta)
    if cfg_scale is not None:
        cfg_scale = _checks.number(LOSS_OP, "cfg_scale", cfg_scale)
    _check_ppo_args(v, v_ref, v_uncond, cfg_scale, log_prob_old, advantages, clip_eps, beta, None)
    for name, t in (("sigma", sigma), ("sigma_next", sigma_next)):
        if t is None:
            raise ValueError(f"{LOSS_OP}: {name} is required")
        _checks.tensor(LOSS_OP, name, t)
    return (v, x, x_next, y, sigma, sigma_next, log_prob_old, advantages, v_ref, v_uncond, cfg_scale, clip_eps, tgr,
            beta, std_rule, std_coef)
