"""Flash-GRPO's training step on a stored rollout step: recompute the velocity with grad, the loss, backward.

The model is seen through a velocity callable, `velocity(x, sigma, cond) -> v` (diffusers' flow matching:
x_sigma = (1 - sigma) x0 + sigma noise, v = noise - x0, classifier-free guidance applied inside), so the same
step trains a plain module, a peft LoRA model, or one wrapped in DistributedDataParallel or FSDP2's
`fully_shard`: the wrapper's gradient averaging over ranks gives the global batch's gradient when every rank
holds the same number of samples, and FlashGRPOLoss makes the advantages and the TGR mean global.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from .nn import FlashGRPOLoss

Velocity = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


@dataclasses.dataclass
class GRPOStep:
    """What a rollout stores of each sample's one SDE step (specs/grpo.md), batch first, B samples.

    x: [B, ...] the latents x_k before the SDE step, in the transformer's own layout (SD3 [B, C, H, W],
        FLUX packed [B, N, 64], Wan [B, C, F, H, W]); any float dtype (the loss runs in y's dtype).
    y: [B, ...] x's shape: flow_sde_step's residual target x_{k+1} - a x_k (its second output), float32
        recommended (the paper computes log p in fp32).
    sigma, sigma_next: [B] float32/float64, sigma_k and sigma_{k+1} of each sample's step (t == sigma).
    log_prob_old: [B] float32, flow_sde_step's log_prob of y under the rollout policy.
    cond: the conditioning the velocity takes, a dict of batch-first [B, ...] tensors (what the adapter's
        `encode` returns: prompt embeddings, pooled embeddings, negative ones for guidance, ...).
    prompt_ids, rewards: [B] integer prompt ids and float rewards (advantages computed over every rank),
        or advantages: [B] float, precomputed; give one or the other.
    v_ref: optional [B, ...] reference-policy velocity at (x, sigma, cond) for the KL term (else the
        training step computes it with its ref_velocity).
    """
    x: torch.Tensor
    y: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    log_prob_old: torch.Tensor
    cond: dict = dataclasses.field(default_factory=dict)
    prompt_ids: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    v_ref: torch.Tensor | None = None

    def __post_init__(self):
        B = self.x.shape[:1] if isinstance(self.x, torch.Tensor) and self.x.dim() else None
        if B is None:
            raise ValueError(f"GRPOStep: x must be a [B, ...] tensor, got {_describe(self.x)}")
        for name, want in (("y", self.x.shape), ("sigma", B), ("sigma_next", B), ("log_prob_old", B),
                           ("prompt_ids", B), ("rewards", B), ("advantages", B), ("v_ref", self.x.shape)):
            t = getattr(self, name)
            if t is None and name not in ("y", "sigma", "sigma_next", "log_prob_old"):
                continue
            if not isinstance(t, torch.Tensor) or t.shape != want:
                raise ValueError(f"GRPOStep: {name} must be a {list(want)} tensor, got {_describe(t)}")
        if not isinstance(self.cond, dict):
            raise ValueError(f"GRPOStep: cond must be a dict of [B, ...] tensors, got {type(self.cond).__name__}")
        for key, t in self.cond.items():
            if isinstance(t, torch.Tensor) and t.shape[:1] != B:
                raise ValueError(f"GRPOStep: cond[{key!r}] must be batch first, [{B[0]}, ...], got {_describe(t)}")
        if (self.advantages is None) == (self.rewards is None or self.prompt_ids is None):
            raise ValueError("GRPOStep: give rewards and prompt_ids, or advantages (not both)")

    def select(self, rows) -> GRPOStep:
        """The samples `rows` (an index, slice or index tensor into the batch): one rank's share, or a micro-batch."""
        pick = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        pick = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in pick.items()}
        pick["cond"] = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in self.cond.items()}
        return GRPOStep(**pick)


def _describe(t) -> str:
    return f"shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def grpo_train_step(velocity: Velocity, batch: GRPOStep, loss_fn: FlashGRPOLoss, *,
                    ref_velocity: Velocity | None = None, gradient_checkpointing: bool = False
                    ) -> tuple[torch.Tensor, dict]:
    """One GRPO backward on the stored steps of this rank: v = velocity(x, sigma, cond) with grad, the loss,
    loss.backward(). The caller steps (and zeroes) its optimizer; calls accumulate gradients like backward.

        v = velocity(batch.x, batch.sigma, batch.cond)                 cast to y's dtype (the loss's precision)
        loss, stats = loss_fn(v, sigma, sigma_next, log_prob_old, rewards, prompt_ids | advantages, y=y, v_ref)
    v_ref (only when loss_fn.beta > 0): batch.v_ref, else ref_velocity(x, sigma, cond) without grad (for
    a peft model, e.g. a call under `model.disable_adapter()`).

    Args:
        velocity: the policy's velocity callable (see the module docstring); its parameters get gradients.
        batch: this rank's GRPOStep (B samples). loss_fn: the FlashGRPOLoss (clip, tgr, beta, std_rule of the
            rollout's flow_sde_step; its group makes the statistics global).
        gradient_checkpointing: run the velocity under torch.utils.checkpoint (non-reentrant): its activations
            are recomputed in the backward instead of stored (one more forward, the memory of a large DiT).
    Returns: (loss, stats): the 0-dim loss (detached, after the backward) and FlashGRPOLoss's statistics
        (approx_kl, clip_fraction, ratio_mean, weights, advantages).
    Bad input: ValueError when beta > 0 and neither batch.v_ref nor ref_velocity is given, or when the
        velocity's output is not x's shape; the loss's own checks otherwise. NaN/inf policy: as FlashGRPOLoss
        (a NaN velocity of a sample makes the loss NaN).
    """
    if not isinstance(batch, GRPOStep):
        raise TypeError(f"grpo_train_step: batch must be a GRPOStep, got {type(batch).__name__}")
    v_ref = None
    if loss_fn.beta > 0:
        v_ref = batch.v_ref
        if v_ref is None:
            if ref_velocity is None:
                raise ValueError(f"grpo_train_step: loss_fn.beta = {loss_fn.beta} > 0 needs the reference velocity: "
                                 "give batch.v_ref or ref_velocity")
            with torch.no_grad():
                v_ref = ref_velocity(batch.x, batch.sigma, batch.cond)
        v_ref = v_ref.detach().to(batch.y.dtype).contiguous()
    if gradient_checkpointing:
        v = checkpoint(velocity, batch.x, batch.sigma, batch.cond, use_reentrant=False)
    else:
        v = velocity(batch.x, batch.sigma, batch.cond)
    if not isinstance(v, torch.Tensor) or v.shape != batch.x.shape:
        raise ValueError(f"grpo_train_step: velocity(x, sigma, cond) must return x's shape {list(batch.x.shape)}, "
                         f"got {_describe(v)}")
    loss, stats = loss_fn(v.to(batch.y.dtype).contiguous(), batch.sigma, batch.sigma_next, batch.log_prob_old,
                          batch.rewards, batch.prompt_ids, advantages=batch.advantages, y=batch.y, v_ref=v_ref)
    loss.backward()
    return loss.detach(), stats
