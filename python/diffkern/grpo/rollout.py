"""Flash-GRPO's rollout on a diffusers flow-matching model (a diffkern.flow.FlowAdapter): Euler ODE steps
everywhere but one SDE step per prompt (Iso-Temporal Grouping), whose (x_k, y, log p) is what training reads."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .. import _checks
from ..flow import FlowAdapter, euler_step
from .distributed import IsoTimestepSampler
from .op import flow_sde_step
from .reference import STD_RULES
from .train import GRPOStep

OP = "rollout"


@dataclasses.dataclass
class RolloutResult:
    """What `rollout` returns: B = P x group_size samples, prompt-major (sample i is a rollout of prompt i // G).

    x: [B, ...] x_k, the latents before each sample's SDE step (the transformer's layout, the adapter's dtype).
    y: [B, ...] float32, flow_sde_step's residual target x_{k+1} - a x_k. sigma, sigma_next: [B] float32,
        sigma_k and sigma_{k+1}. log_prob_old: [B] float32, log p of y under the rollout's policy.
    step_index: [B] int64, k (the same for every rollout of a prompt). cond: the adapter's cond, each
        tensor repeated to [B, ...]. prompt_ids: [B] int64. rewards: [B] float32, or None without a reward.
    latents: [B, ...] the final latents (sigma = 0); images: adapter.decode(latents) when decoded, else None.
    """
    x: torch.Tensor
    y: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    log_prob_old: torch.Tensor
    step_index: torch.Tensor
    cond: dict
    prompt_ids: torch.Tensor
    latents: torch.Tensor
    images: torch.Tensor | None = None
    rewards: torch.Tensor | None = None

    @property
    def step(self) -> GRPOStep:
        """The GRPOStep grpo_train_step takes (ValueError without rewards: set them with `with_rewards`)."""
        if self.rewards is None:
            raise ValueError(f"{OP}: the result has no rewards: pass reward= to rollout, or use "
                             "result.with_rewards(rewards)")
        return GRPOStep(x=self.x, y=self.y, sigma=self.sigma, sigma_next=self.sigma_next,
                        log_prob_old=self.log_prob_old, cond=self.cond, prompt_ids=self.prompt_ids,
                        rewards=self.rewards)

    def with_rewards(self, rewards: torch.Tensor) -> RolloutResult:
        """A copy holding `rewards` ([B] floats, e.g. from a reward model run outside the rollout)."""
        return dataclasses.replace(self, rewards=_rewards("rewards", rewards, self.x))


def _rewards(name: str, rewards, x: torch.Tensor) -> torch.Tensor:
    _checks.tensor(OP, name, rewards)
    if rewards.shape != x.shape[:1] or not rewards.is_floating_point():
        raise ValueError(f"{OP}: {name} must be a floating [B] = [{x.shape[0]}] tensor (one per sample), got shape "
                         f"{list(rewards.shape)}, dtype {rewards.dtype}")
    return rewards.detach().to(device=x.device, dtype=torch.float32)


def _check_args(adapter, prompts, group_size, prompt_ids, std_rule) -> tuple[int, int]:
    """(P, G) after the checks that need no model call."""
    if not isinstance(adapter, FlowAdapter):
        raise TypeError(f"{OP}: adapter must be a diffkern.flow.FlowAdapter, got {type(adapter).__name__}")
    G = _checks.integer(OP, "group_size", group_size)
    if G < 1:
        raise ValueError(f"{OP}: group_size must be >= 1, got {G}")
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, dict):
        sizes = {t.shape[0] for t in prompts.values() if isinstance(t, torch.Tensor) and t.dim()}
        if len(sizes) != 1:
            raise ValueError(f"{OP}: prompts given as a cond dict must hold batch-first [P, ...] tensors of one P, "
                             f"got batch sizes {sorted(sizes)}")
        P = sizes.pop()
    elif isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts):
        P = len(prompts)
    else:
        raise ValueError(f"{OP}: prompts must be a str, a non-empty list of str, or a cond dict of [P, ...] tensors, "
                         f"got {type(prompts).__name__}")
    if prompt_ids is not None:
        _checks.tensor(OP, "prompt_ids", prompt_ids)
        if prompt_ids.shape != (P,) or prompt_ids.is_floating_point() or prompt_ids.dtype == torch.bool:
            raise ValueError(f"{OP}: prompt_ids must be an integer [P] = [{P}] tensor (one id per prompt), got shape "
                             f"{list(prompt_ids.shape)}, dtype {prompt_ids.dtype}")
    if std_rule not in STD_RULES:
        raise ValueError(f"{OP}: std_rule must be 'wan' or 'sd3', got {std_rule!r}")
    return P, G


def _sde_noise(shape, generator, like: torch.Tensor) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor  # the pipelines' draw: a CPU generator serves a GPU too
    return randn_tensor(shape, generator=generator, device=like.device, dtype=like.dtype)


@torch.no_grad()
def rollout(adapter, prompts, group_size: int, sampler: IsoTimestepSampler | None = None,
            reward: Callable | None = None, *, decode: bool = False, negative_prompts=None,
            guidance_scale: float | None = None, prompt_ids: torch.Tensor | None = None, std_rule: str = "wan",
            std_coef: float | None = None, generator: torch.Generator | None = None, **encode_kwargs
            ) -> RolloutResult:
    """G = group_size rollouts of each of P prompts through `adapter`'s schedule sigmas [K + 1]: an Euler ODE step
    x + (sigma_{i+1} - sigma_i) v at every step i but one, k, where

        x_{k+1}, y, log_prob_old, _ = flow_sde_step(x_k, v, sigma_k, sigma_{k+1}, eps, std_rule, std_coef)
    (in float32, x_{k+1} then rounded to the latents' dtype); k is the sampler's draw for the prompt, shared by
    all its rollouts (Iso-Temporal Grouping). v = adapter.velocity(x, sigma, cond): classifier-free guidance
    as cond asks. Runs without grad; every step calls the transformer once on the B = P x G batch.

    Args:
        adapter: a diffkern.flow.FlowAdapter (its sigmas, velocity, init_noise, decode).
        prompts: a str or a list of P str, encoded once with adapter.encode(prompts, negative_prompts,
            guidance_scale, **encode_kwargs); or a cond dict of [P, ...] tensors (an adapter built from
            components). Each prompt's cond is repeated G times (samples prompt-major).
        group_size: G >= 1 rollouts per prompt.
        sampler: an IsoTimestepSampler over the adapter's K steps (keep one across updates); default
            IsoTimestepSampler(K) seeded from `generator` (or the global RNG): the first half of the schedule.
            Under torch.distributed every rank calls rollout: the sampler shares each prompt's k across ranks.
        reward: reward(samples, prompts) -> [B] floats, samples the final latents (or the images with decode),
            prompts the B samples' prompts (their str; their row of the cond dict when prompts is one).
        decode: decode the final latents with adapter.decode (images in [0, 1]; needs a vae).
        prompt_ids: [P] integer ids of the prompts (default 0..P-1); give ids unique over ranks when
            distributed (rollouts of one prompt on several ranks share its id).
        std_rule, std_coef: the SDE's noise rule (as flow_sde_step; the training loss must use the same).
        generator: draws the initial noise (adapter.init_noise, the pipeline's draw) then each SDE noise.
    Returns: a RolloutResult (shapes and dtypes there); result.step is the GRPOStep for grpo_train_step.
    Bad input: TypeError or ValueError naming the argument (adapter, prompts, group_size, prompt_ids, sampler,
        std_rule, reward's output).
    NaN policy: a NaN velocity makes its sample's latents, y and log_prob_old NaN; other samples are unaffected.
    """
    P, G = _check_args(adapter, prompts, group_size, prompt_ids, std_rule)
    sigmas = adapter.sigmas
    K = sigmas.shape[0] - 1
    if sampler is not None and not isinstance(sampler, IsoTimestepSampler):
        raise TypeError(f"{OP}: sampler must be an IsoTimestepSampler, got {type(sampler).__name__}")
    if sampler is not None and int(sampler.window.max()) >= K:
        raise ValueError(f"{OP}: sampler's window reaches step {int(sampler.window.max())} but the adapter has "
                         f"{K} steps: build it as IsoTimestepSampler({K}, ...)")
    texts = None
    if isinstance(prompts, dict):
        cond = prompts
    else:
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        cond = adapter.encode(texts, negative_prompts, guidance_scale=guidance_scale, **encode_kwargs)
    cond = {key: t.repeat_interleave(G, 0) if isinstance(t, torch.Tensor) else t for key, t in cond.items()}
    ids = (torch.arange(P) if prompt_ids is None else prompt_ids.to(torch.int64)).to(sigmas.device)
    ids = ids.repeat_interleave(G)
    B = P * G
    x = adapter.init_noise(B, generator)
    if sampler is None:  # seeded after the noise draw: that stays the pipeline's for the generator's seed
        seed = torch.randint(2**62, (1,), generator=generator,
                             device=generator.device if generator is not None else "cpu")
        sampler = IsoTimestepSampler(K, seed=int(seed))
    k = sampler.sample(ids)
    x_k, y = torch.empty_like(x), torch.empty(x.shape, dtype=torch.float32, device=x.device)
    log_prob = torch.empty(B, dtype=torch.float32, device=x.device)
    drawn = k.tolist()  # one host read of the draw, not one per step: the rows taking their SDE step at step i
    rows_at = {i: torch.tensor([b for b, j in enumerate(drawn) if j == i], device=x.device) for i in set(drawn)}
    for i in range(K):
        v = adapter.velocity(x, sigmas[i].expand(B), cond)
        x_next = euler_step(x, v, sigmas[i], sigmas[i + 1])
        rows = rows_at.get(i)
        if rows is not None:
            xs, vs = x[rows].to(torch.float32), v[rows].to(torch.float32)
            n = rows.shape[0]
            x_sde, y[rows], log_prob[rows], _ = flow_sde_step(
                xs, vs, sigmas[i].expand(n).contiguous(), sigmas[i + 1].expand(n).contiguous(),
                eps=_sde_noise(xs.shape, generator, xs), std_rule=std_rule, std_coef=std_coef)
            x_k[rows] = x[rows]
            x_next[rows] = x_sde.to(x_next.dtype)
        x = x_next
    images = adapter.decode(x) if decode else None
    result = RolloutResult(x=x_k, y=y, sigma=sigmas[k], sigma_next=sigmas[k + 1], log_prob_old=log_prob,
                           step_index=k, cond=cond, prompt_ids=ids, latents=x, images=images)
    if reward is None:
        return result
    per_sample = [texts[i // G] if texts is not None else i // G for i in range(B)]
    return result.with_rewards(_rewards("reward(samples, prompts)", reward(images if decode else x, per_sample), x))
