"""Reward-guided samplers for flow-matching (velocity) models: NTRK and the baselines it is compared with.

Convention (specs/ntrk.md): x_t = (1 - t) x0 + t eps, the model predicts v = eps - x0, so the Tweedie
estimate is x0_hat = x_t - t v. Every sampler takes the same stochastic reverse steps t -> t' of the
flow SDE (Flow-GRPO's, csrc/include/diffkern/grpo_math.h): std_t = c t,
    mu = a x + b v,   x' = mu + s eps,   s = std_t sqrt(t - t')
and differs only in what it does to that step:
  BaseSampler   nothing (rho = 0)                                           1 NFE per step
  NTRKSampler   eps -> sqrt(rho) W(g) + sqrt(1 - rho) eps, g = grad_x r(x0_hat)  1 NFE + 1 VJP per step
  DPSSampler    mu -> mu + scale s^2 g  (mean shift)                        1 NFE + 1 VJP per step
  SVDDSampler   K candidate noises, keep the one whose x0_hat(x') scores best  1 + K NFE per step
  best_of_n     N independent runs of any sampler, keep the best final reward   N x its NFE
NFE counts velocity evaluations per trajectory (a VJP is reported apart, as `grads`).

The model is a velocity callable velocity(x, t, **cond) on the samplers' own schedule (flow_sigmas, shift 1),
or a diffusers pipeline through diffkern.flow.FlowAdapter (its schedule, velocity with its guidance, a reward
on latents or decoded pixels, gradient checkpointing): see diffkern.ntrk.models. The rule std_t = c t is
finite at every sigma of a pipeline's schedule, the first one (sigma = 1 for SD3 and FLUX) included.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import _checks
from ..grpo.reference import step_coefficients
from .api import ntrk_step
from .models import as_model
from .whiten import DOMAINS, WHITEN_ALPHA, whiten


@dataclass
class Trace:
    """What a run cost and did: NFE and VJPs per trajectory, the final reward [B], and (when asked) the
    standardised perturbation (x' - mu_model) / s of every step, the noise a sampler actually injected."""
    nfe: float = 0.0
    grads: float = 0.0
    reward: torch.Tensor | None = None
    perturbations: list = field(default_factory=list)


def _per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.dim() - 1)))


class BaseSampler:
    """The pretrained model's own stochastic sampler: `steps` SDE steps down the model's schedule.

    model: a velocity callable velocity(x, t, **cond) -> v (t: [B]) stepped from t = 0.999 to 0 in `steps`
    (default 25) steps; or a diffkern.flow.FlowAdapter (steps None: the pipeline's sigmas, reward on latents)
    or a diffkern.ntrk.models.FlowModel(adapter, reward_on="pixels", checkpoint=True) for a reward on
    decoded images / checkpointed VJPs. reward(x0) -> [B], differentiable (used by the guided samplers
    and to score the result; None: the base sampler and NTRK at rho = 0 need none). std_coef: c of std_t = c t.
    """

    def __init__(self, model, reward: Callable | None, steps: int | None = None, std_coef: float = 0.7,
                 record: bool = False):
        self.model = as_model(model, steps, type(self).__name__)
        self.reward, self.steps, self.std_coef, self.record = reward, self.model.steps, std_coef, record

    def schedule(self, device) -> torch.Tensor:
        return self.model.sigmas(device)

    def _v(self, x, t, cond, trace: Trace, batch: int):
        trace.nfe += x.shape[0] / batch
        return self.model.velocity(x, t.expand(x.shape[0]), cond)

    def _score(self, x0):
        if self.reward is None:
            raise ValueError(f"{type(self).__name__}: reward is None but this sampler needs one")
        return self.model.score(self.reward, x0)

    def _v_and_grad(self, x, t, cond, trace: Trace, batch: int):
        """v and g = grad_x r(x - t v(x)): one forward and one VJP through the model and the reward."""
        trace.grads += 1
        with torch.enable_grad(), self.model.grad_context():
            xg = x.detach().requires_grad_()
            v = self._v(xg, t, cond, trace, batch)
            (g,) = torch.autograd.grad(self._score(xg - _per_sample(t.expand(x.shape[0]), x) * v).sum(), xg)
        return v.detach(), g

    def step(self, x, t, t_next, cond, trace: Trace, generator):
        """One reverse step; returns x'. Subclasses change this."""
        c = self._coef(t, t_next, x)
        mu = c.a * x + c.b * self._v(x, t, cond, trace, x.shape[0])
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self._record(mu + c.noise_scale * eps, mu, c.noise_scale, trace)

    def _coef(self, t, t_next, x):
        c = step_coefficients(t.reshape(1).double(), t_next.reshape(1).double(), 0, self.std_coef)
        return type(c)(*(v.to(x.dtype).item() for v in c))

    def _record(self, x_next, mu, s, trace: Trace):
        if self.record and s > 0:
            trace.perturbations.append(((x_next - mu) / s).detach())
        return x_next

    @torch.no_grad()
    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None, **cond):
        """Runs the reverse chain from x (the draw at the schedule's first sigma, [B, ...]: adapter.init_noise
        for an adapter) with cond (an adapter's encode(...) dict, unpacked); returns (x0, Trace), the trace's
        reward None when the sampler has no reward."""
        trace = Trace()
        ts = self.schedule(x.device)
        for k in range(self.steps):
            x = self.step(x, ts[k], ts[k + 1], cond, trace, generator)
        trace.reward = None if self.reward is None else self._score(x).detach()
        return x, trace


class NTRKSampler(BaseSampler):
    """Noise-tilted reverse kernels (specs/ntrk.md): the model's mean and sigma, the whitened reward
    gradient in the noise, x' = mu + s (sqrt(rho_t) W(g) + sqrt(1 - rho_t) eps) through diffkern.ntrk_step.

    rho: a float in [0, 1] or a function t -> rho_t; whiten_kw: arguments of diffkern.whiten (domains,
    tile, alpha, passes). A step with rho_t = 0 skips the VJP (w = 0): it is the base step's mean and sigma
    with the kernel's Philox noise.
    """

    def __init__(self, model, reward, steps: int | None = None, std_coef: float = 0.7, rho=0.5,
                 record: bool = False, **whiten_kw):
        super().__init__(model, reward, steps, std_coef, record)
        self.rho = rho if callable(rho) else (lambda t, r=float(rho): r)
        self.whiten_kw = {"domains": DOMAINS, "alpha": WHITEN_ALPHA, **whiten_kw}

    def step(self, x, t, t_next, cond, trace, generator):
        c = self._coef(t, t_next, x)
        rho = float(self.rho(float(t)))
        if rho == 0:
            v = self._v(x, t, cond, trace, x.shape[0])
            w = torch.zeros_like(v)
        else:
            v, g = self._v_and_grad(x, t, cond, trace, x.shape[0])
            w = whiten(g, **self.whiten_kw)
        mu = c.a * x + c.b * v
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=x.device).item())
        x_next = ntrk_step(mu.contiguous(), c.noise_scale, w.contiguous(), rho, seed=seed)
        return self._record(x_next, mu, c.noise_scale, trace)


class DPSSampler(BaseSampler):
    """Mean-shift guidance (DPS-style): x' = mu + scale s^2 g + s eps, the Gaussian step tilted by
    exp(scale * linearised reward); the injected perturbation is eps + scale s g, no longer N(0, I)."""

    def __init__(self, model, reward, steps: int | None = None, std_coef: float = 0.7, scale: float = 1.0,
                 record: bool = False):
        super().__init__(model, reward, steps, std_coef, record)
        self.scale = scale

    def step(self, x, t, t_next, cond, trace, generator):
        c = self._coef(t, t_next, x)
        v, g = self._v_and_grad(x, t, cond, trace, x.shape[0])
        mu = c.a * x + c.b * v
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self._record(mu + self.scale * c.noise_scale ** 2 * g + c.noise_scale * eps, mu, c.noise_scale, trace)


class SVDDSampler(BaseSampler):
    """SVDD-style search: per step, K candidate noises; each candidate x' is scored by r(x0_hat(x'))
    (one more velocity evaluation per candidate) and the best is kept. The reward scores the K B candidates
    at once, candidate j of sample b in row j B + b (cond repeated so)."""

    def __init__(self, model, reward, steps: int | None = None, std_coef: float = 0.7, k: int = 4,
                 record: bool = False):
        super().__init__(model, reward, steps, std_coef, record)
        if _checks.integer("SVDDSampler", "k", k) < 1:
            raise ValueError(f"SVDDSampler: k must be >= 1, got {k}")
        self.k = k

    def step(self, x, t, t_next, cond, trace, generator):
        B = x.shape[0]
        c = self._coef(t, t_next, x)
        mu = c.a * x + c.b * self._v(x, t, cond, trace, B)
        eps = torch.randn((self.k, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
        cand = (mu + c.noise_scale * eps).reshape(self.k * B, *x.shape[1:])
        if float(t_next) > 0:
            rep = {k: v.repeat(self.k, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) else v
                   for k, v in cond.items()}
            x0 = cand - t_next * self._v(cand, t_next, rep, trace, B)
        else:
            x0 = cand
        best = self._score(x0).reshape(self.k, B).argmax(0)
        x_next = cand.reshape(self.k, B, *x.shape[1:])[best, torch.arange(B, device=x.device)]
        return self._record(x_next, mu, c.noise_scale, trace)


def best_of_n(sampler: BaseSampler, x_init: Callable[[], torch.Tensor], n: int,
              generator: torch.Generator | None = None, **cond):
    """n independent runs of `sampler` from fresh starts x_init() (for an adapter: lambda:
    adapter.init_noise(B, generator)); per sample keeps the best final reward.

    Returns (x0, Trace) with n times the NFE and VJPs of one run."""
    if _checks.integer("best_of_n", "n", n) < 1:
        raise ValueError(f"best_of_n: n must be >= 1, got {n}")
    best_x, total = None, Trace()
    for _ in range(n):
        x, tr = sampler.sample(x_init(), generator, **cond)
        total.nfe, total.grads = total.nfe + tr.nfe, total.grads + tr.grads
        total.perturbations += tr.perturbations
        if best_x is None:
            best_x, total.reward = x, tr.reward
            continue
        better = tr.reward > total.reward
        best_x = torch.where(_per_sample(better, x), x, best_x)
        total.reward = torch.where(better, tr.reward, total.reward)
    return best_x, total
