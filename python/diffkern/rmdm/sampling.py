"""Samplers of a masked diffusion model with T outer steps (specs/rmdm.md "Sampling").

Both start from the prompt with every other position [MASK] and, at step i (t = 1 - i/T -> s = t - 1/T),
run the denoiser (with `n_iter` = L_s recursive iterations) and reveal some masked positions. Revealed
tokens and prompt tokens are never changed again (SUBS), and after T steps nothing is masked.
  ancestral: MDLM's reverse step for alpha_t = 1 - t: each masked position is revealed with probability
             (alpha_s - alpha_t) / (1 - alpha_t) = (t - s) / t, its token drawn from softmax(logits);
  topk:      confidence-ordered unmasking on a linear schedule: after step i, round(s * n_answer)
             positions stay masked; the most confident masked positions (max softmax) are revealed with
             their argmax token.
"""
from __future__ import annotations

import torch

from .. import _checks


@torch.no_grad()
def sample(model, x_prompt: torch.Tensor, prompt: torch.Tensor, steps: int, n_iter: int | None = None,
           method: str = "topk", generator: torch.Generator | None = None) -> torch.Tensor:
    """Tokens [B, T]: the prompt kept, every other position filled after `steps` denoising steps.

    x_prompt: [B, T] tokens (read only where `prompt`); prompt: bool [B, T]; n_iter: L_s (model.L by default).
    """
    if method not in ("topk", "ancestral"):
        raise ValueError(f"sample: method must be 'topk' or 'ancestral', got {method!r}")
    if _checks.integer("sample", "steps", steps) < 1:
        raise ValueError(f"sample: steps must be >= 1, got {steps}")
    for name, t in (("x_prompt", x_prompt), ("prompt", prompt)):
        if _checks.tensor("sample", name, t).is_floating_point() or t.is_complex():
            raise ValueError(f"sample: {name} must be an integer or bool tensor, got {t.dtype}")
    if prompt.shape != x_prompt.shape:
        raise ValueError(f"sample: prompt has shape {list(prompt.shape)} but x_prompt has shape {list(x_prompt.shape)}")
    z = torch.where(prompt, x_prompt, torch.full_like(x_prompt, model.mask_id))
    n_answer = (~prompt).sum(-1)
    for i in range(steps):
        t, s = 1 - i / steps, 1 - (i + 1) / steps
        masked = z == model.mask_id
        logits = model(z, torch.full((z.shape[0],), t, device=z.device), n_iter=n_iter).float()
        probs = torch.softmax(logits, -1)
        if method == "ancestral":
            token = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(z.shape)
            reveal = torch.rand(z.shape, generator=generator, device=z.device) < (t - s) / t
        else:
            confidence, token = probs.max(-1)
            confidence = confidence.masked_fill(~masked, -1.0)
            keep_masked = torch.round(s * n_answer.double()).long()
            n_reveal = (masked.sum(-1) - keep_masked).clamp(min=0)
            rank = confidence.argsort(-1, descending=True).argsort(-1)
            reveal = rank < n_reveal[:, None]
        z = torch.where(masked & reveal, token, z)
    return z
