"""Classifier-free guidance as the pipelines combine the two predictions, with a per-sample scale."""
from __future__ import annotations

import torch


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values [B] viewed as [B, 1, ...] to broadcast against `like` [B, ...], in like's dtype and device."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, *[1] * (like.dim() - 1))


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uncond + scale (cond - uncond), scale [B] per sample: the pipelines' guidance formula, term for term, so
    a scale exact in the prediction's dtype (7.0, 3.5, 5.0, ...) gives the pipeline's bits."""
    return uncond + per_sample(scale, uncond) * (cond - uncond)


def per_sample_scale(batch: int, value: float, device) -> torch.Tensor:
    """A float32 [batch] tensor of `value`: how cond carries a per-sample scale."""
    return torch.full((batch,), float(value), dtype=torch.float32, device=device)
