"""The DAR paper's three symptoms of a deep residual stream, measured per block on one batch.

For block i, let h_i be the input of its first sublayer (what its `norm1` receives): the residual
stream itself in a residual DiT, the routed input in a DAR DiT. Then
    amplitude_i = RMS(h_i)                                  (forward: does the stream grow with depth?)
    grad_rms_i  = RMS(dL/dh_i)                              (backward: do gradients fade toward the input?)
    cosine_i    = mean over tokens of cos(h_i, h_{i+1})     (do adjacent blocks see nearly the same input?)
with L the SiT velocity loss of `diffkern.dar.sit` at a fixed draw of (t, noise), so two models are
compared on the same problem.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _optional
from .sit import velocity_loss

SYMPTOMS = ("amplitude", "grad_rms", "cosine")


def _rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


def _default_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return velocity_loss(model, x, y, torch.Generator().manual_seed(0))


def _measure(model: nn.Module, batch, loss_fn) -> dict:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(b, "norm1") for b in blocks):
        raise ValueError(f"diagnose: model must have .blocks, each with .norm1 (a DiT), got {type(model).__name__}")
    inputs: list[torch.Tensor] = []
    handles = [b.norm1.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for b in blocks]
    was_training = model.training
    model.eval()  # no label dropout: the same batch means the same problem for every model
    try:
        loss = loss_fn(model, batch)
    finally:
        model.train(was_training)
        for h in handles:  # before backward: a recomputing (checkpointed) model runs its blocks again there
            h.remove()
    grads = torch.autograd.grad(loss, inputs)
    with torch.no_grad():
        cosine = [F.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()
                  for a, b in zip(inputs[:-1], inputs[1:])]
        return {"loss": loss.item(), "amplitude": [_rms(h) for h in inputs], "grad_rms": [_rms(g) for g in grads],
                "cosine": cosine}


def plot(results: dict, path: str) -> None:
    """Three panels (amplitude, gradient RMS, adjacent cosine) against block index, one line per model."""
    plt = _optional.pyplot("plots")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    titles = ("forward amplitude RMS(h_i)", "backward gradient RMS(dL/dh_i)", "cos(h_i, h_i+1)")
    for ax, key, title in zip(axes, SYMPTOMS, titles):
        for name, r in results.items():
            ax.plot(range(len(r[key])), r[key], marker="o", ms=3, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("block")
    axes[1].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def diagnose(models, batch, path: str | None = None, loss_fn=None) -> dict:
    """Per-block forward amplitude, backward gradient RMS and adjacent-block cosine (module docstring).

    Args:
        models: a DiT-like module (`.blocks[i].norm1`), or a dict name -> module to compare several
            (e.g. {"residual": baseline, "dar": dar_model}).
        batch: (x [B, C, H, W], y [B]) clean samples and labels, for the default loss.
        path: where to draw the PNG (optional).
        loss_fn: loss_fn(model, batch) -> scalar, replacing the SiT velocity loss at seed 0.
    Returns {name: {"loss": float, "amplitude": [depth], "grad_rms": [depth], "cosine": [depth - 1]}}
    (name "model" for a single module). Parameter gradients are left untouched; the model's train/eval
    mode is restored.
    """
    if isinstance(models, nn.Module):
        models = {"model": models}
    results = {name: _measure(m, batch, loss_fn or _default_loss) for name, m in models.items()}
    if path is not None:
        plot(results, path)
    return results
