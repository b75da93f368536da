"""Flow-GRPO's batch statistics over every rank (specs/grpo.md "Advantages", "Rollout and ITG", "TGR").

Every function works in a single process as well: without an initialised torch.distributed process
group (or with group=None and no default group), the "global batch" is the local one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _checks, _dtypes


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and (group is not None or dist.get_world_size() > 1)


def all_gather_cat(t: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """The concatenation over ranks (rank order) of a 1-d tensor whose length may differ per rank, and
    where this rank's part starts in it."""
    if not _distributed(group):
        return t, 0
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([t.numel()], device=t.device), group=group)
    sizes = [int(s) for s in sizes]
    padded = t.new_zeros(max(sizes))
    padded[:t.numel()] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sum(sizes[:rank])


def global_mean(t: torch.Tensor, group=None) -> torch.Tensor:
    """mean(t) over every element on every rank (the TGR normaliser)."""
    if not _distributed(group):
        return t.mean()
    total = torch.stack([t.sum(), torch.ones_like(t).sum()])
    dist.all_reduce(total, group=group)
    return total[0] / total[1]


def _check_ids(op: str, prompt_ids) -> None:
    """prompt_ids is a 1-d integer tensor: ids are compared exactly, never truncated from floats."""
    _checks.tensor(op, "prompt_ids", prompt_ids)
    if prompt_ids.is_floating_point() or prompt_ids.is_complex() or prompt_ids.dtype == torch.bool:
        raise ValueError(f"{op}: prompt_ids must be an integer tensor (ids are compared exactly, never truncated), "
                         f"got {_dtypes.name(prompt_ids.dtype)}")
    if prompt_ids.dim() != 1:
        raise ValueError(f"{op}: prompt_ids must be [n], got shape {list(prompt_ids.shape)}")


def advantages(rewards: torch.Tensor, prompt_ids: torch.Tensor, global_std: bool = True, eps: float = 1e-4,
               clip: float = 5.0, group=None) -> torch.Tensor:
    """GRPO advantages of this rank's rollouts, from the rewards of every rank.

        A_i = (R_i - mean of R over prompt_ids == prompt_ids[i], all ranks) / (std + eps), clipped to [-clip, clip]
    std is the (population) std of every reward of the global batch (global_std=True) or of the prompt's
    group. A prompt's rollouts may sit on several ranks.

    Args:
        rewards: [n] float rewards of this rank's rollouts; prompt_ids: [n] integer prompt ids.
    Returns: [n] advantages in float32 (float64 for float64 rewards).
    """
    _checks.tensor("advantages", "rewards", rewards)
    if not rewards.is_floating_point():
        raise ValueError(f"advantages: rewards must be a floating tensor, got {_dtypes.name(rewards.dtype)}")
    _check_ids("advantages", prompt_ids)
    if rewards.dim() != 1 or prompt_ids.shape != rewards.shape:
        raise ValueError(f"advantages: rewards and prompt_ids must be [n] tensors of one length, got shapes "
                         f"{list(rewards.shape)} and {list(prompt_ids.shape)}")
    acc = _dtypes.acc(rewards.dtype)
    all_r, start = all_gather_cat(rewards.to(acc), group)
    all_ids, _ = all_gather_cat(prompt_ids.to(torch.int64), group)
    _, group_of = torch.unique(all_ids, return_inverse=True)
    n_groups = int(group_of.max()) + 1 if group_of.numel() else 0
    count = torch.zeros(n_groups, dtype=acc, device=all_r.device).index_add_(0, group_of, torch.ones_like(all_r))
    mean = torch.zeros_like(count).index_add_(0, group_of, all_r) / count
    centred = all_r - mean[group_of]
    if global_std:
        std = all_r.std(correction=0)
    else:
        var = torch.zeros_like(count).index_add_(0, group_of, centred * centred) / count
        std = var.sqrt()[group_of]
    a = (centred / (std + eps)).clamp(-clip, clip)
    return a[start:start + rewards.numel()]


class IsoTimestepSampler:
    """Iso-Temporal Grouping: one SDE step index per prompt, shared by all its rollouts on every rank.

    Steps come from `window` (default: the first half of a num_steps schedule). Within one call the
    distinct prompts of the global batch get the window's steps in equal shares (up to one), in a
    random order: uniform over the window across the batch. Rank 0 draws and broadcasts the draw.
    """

    def __init__(self, num_steps: int = 20, window: range | None = None, seed: int = 0, group=None):
        num_steps = _checks.integer("IsoTimestepSampler", "num_steps", num_steps)
        self.window = torch.tensor(list(range(num_steps // 2) if window is None else window), dtype=torch.int64)
        if self.window.numel() == 0 or self.window.min() < 0 or self.window.max() >= num_steps:
            raise ValueError(f"IsoTimestepSampler: window must be a non-empty range inside [0, {num_steps}), "
                             f"got {window}")
        self.generator = torch.Generator().manual_seed(seed)
        self.group = group

    def sample(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """[n] step indices for this rank's rollouts, given their [n] prompt ids (an integer tensor)."""
        _check_ids("IsoTimestepSampler.sample", prompt_ids)
        ids = prompt_ids.to(torch.int64)
        all_ids, _ = all_gather_cat(ids, self.group)
        unique = torch.unique(all_ids)
        n, w = unique.numel(), self.window.numel()
        shares = self.window[torch.randperm(w, generator=self.generator)].repeat((n + w - 1) // w)[:n]
        steps = shares[torch.randperm(n, generator=self.generator)].to(ids.device)
        if _distributed(self.group):
            src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
            dist.broadcast(steps, src=src, group=self.group)
        return steps[torch.searchsorted(unique, ids)]
