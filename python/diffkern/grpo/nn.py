"""FlashGRPOLoss: Flow-GRPO's one-step loss as a module, from rewards to a scalar (specs/grpo.md)."""
from __future__ import annotations

import torch

from .. import _checks
from . import distributed
from .op import grpo_iso_loss


class FlashGRPOLoss(torch.nn.Module):
    """GRPO advantages from rewards, TGR weights and the clipped one-step PPO loss, in one call.

    For the rollouts of this rank (each trained at its one SDE step, `IsoTimestepSampler` picking that
    step per prompt):
        A = advantages(rewards, prompt_ids)          group mean, global std, clipped (every rank's rewards)
        loss, stats = grpo_iso_loss(v, ..., A)       TGR mean of 1/lambda over every rank's samples
    Under torch.distributed both statistics are global (an all-gather of rewards and prompt ids, an
    all-reduce of two numbers); gradients stay local, so DDP's gradient averaging gives the global
    batch's gradient when every rank holds the same number of samples.

    Args (constructor): clip_eps, tgr, beta, std_rule, std_coef as in `diffkern.grpo_iso_loss`;
        global_std, adv_eps, adv_clip as `global_std`, `eps`, `clip` of `diffkern.grpo.advantages`;
        group: the process group of the statistics (None: the default group, if initialised).
    forward(v, sigma, sigma_next, log_prob_old, rewards=None, prompt_ids=None, *, advantages=None,
            x=None, x_next=None, y=None, v_ref=None, v_uncond=None, cfg_scale=None):
        v: [B, ...] velocity with grad; the stored step as y (recommended) or x and x_next; sigma,
        sigma_next, log_prob_old: [B]; rewards and prompt_ids [B] (or precomputed advantages [B]).
    Returns: (loss, stats): stats of grpo_iso_loss plus "advantages".
    Bad input: as grpo_iso_loss; rewards and prompt_ids must be [B] tensors (prompt_ids integer), else a
        TypeError/ValueError naming them. NaN/inf policy: a NaN reward makes its group's advantages NaN
        (propagated like `diffkern.grpo.advantages`); the rest as grpo_iso_loss.
    """
    _NAME = "FlashGRPOLoss"

    def __init__(self, clip_eps: float = 1e-3, tgr: bool = True, beta: float = 0.0, std_rule: str = "wan",
                 std_coef: float | None = None, global_std: bool = True, adv_eps: float = 1e-4,
                 adv_clip: float = 5.0, group=None):
        super().__init__()
        self.clip_eps, self.tgr, self.beta, self.std_rule, self.std_coef = clip_eps, tgr, beta, std_rule, std_coef
        self.global_std, self.adv_eps, self.adv_clip, self.group = global_std, adv_eps, adv_clip, group

    def forward(self, v, sigma, sigma_next, log_prob_old, rewards=None, prompt_ids=None, *, advantages=None,
                x=None, x_next=None, y=None, v_ref=None, v_uncond=None, cfg_scale=None):
        if (advantages is None) == (rewards is None or prompt_ids is None):
            raise ValueError("FlashGRPOLoss: give rewards and prompt_ids, or advantages (not both)")
        if advantages is None:
            B = _checks.tensor(self._NAME, "v", v).shape[:1]  # a 0-dim v is grpo_iso_loss's error to raise
            for name, t in (("rewards", rewards), ("prompt_ids", prompt_ids)):
                if B and _checks.tensor(self._NAME, name, t).shape != B:
                    raise ValueError(f"{self._NAME}: {name} must be [B] = {list(B)} (one per sample of v), got shape "
                                     f"{list(t.shape)}")
            advantages = distributed.advantages(rewards, prompt_ids, self.global_std, self.adv_eps, self.adv_clip,
                                                self.group)
        loss, stats = grpo_iso_loss(v, x, x_next, sigma, sigma_next, log_prob_old, advantages, self.clip_eps,
                                    self.tgr, self.beta, v_ref, cfg_scale, v_uncond, self.std_rule, self.std_coef,
                                    y=y, group=self.group)
        return loss, {**stats, "advantages": advantages.detach()}

    def extra_repr(self) -> str:
        return (f"clip_eps={self.clip_eps}, tgr={self.tgr}, beta={self.beta}, std_rule={self.std_rule!r}, "
                f"global_std={self.global_std}")
