"""Flow-GRPO's step at every sigma of the schedules diffusers produces (SD3, FLUX, Wan2.1), both std rules.

The schedulers are diffusers' FlowMatchEulerDiscreteScheduler built from the models' scheduler configs
(nothing downloaded), their sigmas set as the pipelines set them. Their first sigma is exactly 1, where the
"sd3" std c sqrt(sigma / (1 - sigma)) divides by zero: Flow-GRPO's SD3 form puts the schedule's second
sigma in that denominator, which the first step's test below computes explicitly in float64.
"""
import math

import numpy as np
import pytest
import torch

import diffkern
from diffkern.grpo import reference
from diffkern.grpo.reference import grpo_iso_loss_reference
from diffkern.testing.backends import device_for, forced
from diffkern.testing.numerics import assert_close_to_oracle
from test_grpo import BACKENDS, RULES, check_log_prob, check_log_prob_bwd, check_sde_step, grpo_oracle, \
    loss_and_grads, on_cpu_leaves

diffusers = pytest.importorskip("diffusers")

# Latent elements per sample: odd, so that a tile is partly masked.
D = 37


def sd3_sigmas(steps=28):
    """StableDiffusion3Pipeline's schedule: the SD3 scheduler config (shift 3.0), 28 steps by default."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas


def flux_sigmas(steps=28, height=1024, width=1024):
    """FluxPipeline's schedule: FLUX.1's scheduler config (dynamic shifting), sigmas linspace(1, 1/steps),
    mu from the packed image sequence length (2x2 patches of the 8x-downsampled latent) by the pipeline's
    own calculate_shift."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    c = scheduler.config
    mu = calculate_shift((height // 16) * (width // 16), c.base_image_seq_len, c.max_image_seq_len, c.base_shift,
                         c.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas


def wan_sigmas(shift, steps):
    """Wan2.1's flow schedule: shift 3.0 at 480P (Wan's recommendation, and Flash-GRPO's 20 steps), 5.0 at 720P
    (50 steps, WanPipeline's default)."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas


SCHEDULES = {"sd3": sd3_sigmas, "flux": flux_sigmas, "wan480": lambda: wan_sigmas(3.0, 20),
             "wan720": lambda: wan_sigmas(5.0, 50)}


@pytest.fixture(scope="module", params=list(SCHEDULES))
def sigmas(request):
    """A schedule's sigmas [steps + 1] (float32, as diffusers gives them): 1 first, 0 last."""
    s = SCHEDULES[request.param]()
    assert s.dtype == torch.float32 and s[0].item() == 1.0 and s[-1].item() == 0.0 and (s[1:] < s[:-1]).all()
    return s


def every_step(sigmas, seed, device, dtype=torch.float32):
    """(x, v, sigma, sigma_next, eps): one sample at each step of the schedule."""
    n = sigmas.numel() - 1
    g = torch.Generator().manual_seed(seed)
    x, v, eps = (torch.randn((n, D), generator=g).to(device, dtype) for _ in range(3))
    return x, v, sigmas[:-1].to(device), sigmas[1:].to(device), eps


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_step_matches_float64_reference(backend, rule, sigmas):
    """flow_sde_step, grpo_log_prob, its backward and grpo_iso_loss (with its gradients) finite and equal to
    the float64 reference at every step of the schedule, the first (sigma = 1) and the last (sigma_next = 0)."""
    device = device_for(backend)
    x, v, sigma, sigma_next, eps = every_step(sigmas, 0, device)
    coef = reference.default_std_coef(rule)
    with forced(backend):
        step = diffkern.flow_sde_step(x, v, sigma, sigma_next, eps=eps, std_rule=rule)
    assert all(t.isfinite().all() for t in step)
    check_sde_step((x, v, sigma, sigma_next, eps, reference.STD_RULES[rule], coef), step)

    # the loss at the stored step, with a velocity near the rollout's, CFG and a reference policy
    g = torch.Generator().manual_seed(1)
    near = lambda scale: (v.cpu() + scale * torch.randn(v.shape, generator=g)).to(device)  # noqa: E731
    kw = dict(v=near(0.05), y=step[1], sigma=sigma, sigma_next=sigma_next, v_ref=near(0.1), v_uncond=near(0.5),
              cfg_scale=4.5)
    args = (kw["v"], None, kw["y"], sigma, sigma_next, kw["v_ref"], kw["v_uncond"], 4.5, reference.STD_RULES[rule],
            coef)
    dlog_prob, dkl = (torch.randn(sigma.shape, generator=g).to(device) for _ in range(2))
    with forced(backend):
        outs = torch.ops.diffkern.grpo_log_prob(*args)
        grads = torch.ops.diffkern.grpo_log_prob_bwd(dlog_prob, dkl, *args)
    assert all(t.isfinite().all() for t in (*outs, *grads))
    check_log_prob(args, outs, ("log_prob", "kl", "inv_lambda"))
    check_log_prob_bwd((dlog_prob, dkl, *args), grads)

    kw = {k: t.detach().requires_grad_(k in ("v", "v_uncond")) if isinstance(t, torch.Tensor) else t
          for k, t in kw.items()}
    kw["log_prob_old"] = step[2] - 0.01 * torch.randn(sigma.shape, generator=g).to(device)
    kw["advantages"] = torch.randn(sigma.shape, generator=g).to(device)
    options = dict(tgr=True, beta=0.1, std_rule=rule)
    with forced(backend):
        loss, stats, loss_grads = loss_and_grads(diffkern.grpo_iso_loss, kw, options)

    def reference_loss(*values):
        loss, stats, grads = loss_and_grads(grpo_iso_loss_reference, on_cpu_leaves(dict(zip(kw, values))), options)
        return [loss, stats["weights"], *grads]
    (ref_loss, ref_weights, *ref_grads), spreads = grpo_oracle(reference_loss, list(kw.values()), torch.float32)
    plain = reference_loss(*kw.values())
    assert_close_to_oracle(loss, ref_loss, plain[0], "loss", spreads[0])
    assert_close_to_oracle(stats["weights"].cpu(), ref_weights, plain[1], "weights", spreads[1])
    for grad, want, low, spread in zip(loss_grads, ref_grads, plain[2:], spreads[2:]):
        assert grad.isfinite().all()
        assert_close_to_oracle(grad, want, low, "grad", spread)


def flow_grpo_first_step(x, v, eps, sigmas):
    """Flow-GRPO's SD3 step (sd3_sde_with_logprob) at the schedule's first sigma (1), written out from its
    public formulas in the dtype of the arguments (float64: the oracle): std = a sqrt(sigma / (1 - sigma_max)),
    sigma_max = the schedule's second sigma (Flow-GRPO's replacement of sigma == 1), a = 0.7. Returns
    (x_next, log_prob, 1/lambda); lambda is the spec's TGR factor
    sqrt(Dt) / std + std sqrt(Dt) (1 - sigma) / (2 sigma)."""
    sigma, sigma_prev, sigma_max = sigmas[0], sigmas[1], sigmas[1]
    assert sigma.item() == 1.0
    dt = sigma_prev - sigma
    std = 0.7 * torch.sqrt(sigma / (1 - sigma_max))
    mean = x * (1 + std ** 2 / (2 * sigma) * dt) + v * (1 + std ** 2 * (1 - sigma) / (2 * sigma)) * dt
    x_next = mean + std * torch.sqrt(-dt) * eps
    log_prob = (-(x_next - mean) ** 2 / (2 * (std * torch.sqrt(-dt)) ** 2) - torch.log(std * torch.sqrt(-dt))
                - math.log(math.sqrt(2 * math.pi))).mean(1)
    inv_lambda = 1 / (torch.sqrt(-dt) / std + std * torch.sqrt(-dt) * (1 - sigma) / (2 * sigma))
    return x_next, log_prob, inv_lambda.expand(log_prob.shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step_is_flow_grpo_sd3_form(backend, sigmas):
    """At sigma = 1 the "sd3" rule is Flow-GRPO's value: std with the schedule's second sigma in 1 - sigma."""
    device = device_for(backend)
    x, v, sigma, sigma_next, eps = (t[:1] for t in every_step(sigmas, 2, device))
    with forced(backend):
        x_next, _, log_prob, inv_lambda = diffkern.flow_sde_step(x, v, sigma, sigma_next, eps=eps, std_rule="sd3")
    (want_x, want_lp, want_il), spreads = grpo_oracle(lambda *a: flow_grpo_first_step(*a, sigmas.double()),
                                                     (x, v, eps), torch.float32)
    plain = flow_grpo_first_step(*(t.cpu() for t in (x, v, eps)), sigmas)
    for name, got, want, low, spread in zip(("x_next", "log_prob", "inv_lambda"), (x_next, log_prob, inv_lambda),
                                            (want_x, want_lp, want_il), plain, spreads):
        assert_close_to_oracle(got.cpu(), want, low, name, spread)
