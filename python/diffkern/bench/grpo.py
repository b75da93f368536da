"""Flow-GRPO's training loss (specs/grpo.md) described for the harness: Wan2.1 480x832 81-frame latents.

One case: B=8 samples of 16x21x60x104 = 2,096,640 elements, each at its own step of the first half of
the 20-step schedule, no CFG or KL. Two workloads, one per form of the stored step:
  grpo_iso_loss    x and x_next (fwd reads v, x, x_next; bwd reads them again and writes dv: 7 passes)
  grpo_iso_loss_y  y = x_next - a x (fwd reads v, y; bwd reads them again and writes dv: 5 passes)
Each is measured against its own inputs read once and dv written once: 4 passes for the pair (the
issue's minimum), 3 for y. The issue's bar, <= 1.3x its minimum of 4 passes, is 1.3 * 4/3 = 1.73x the
y form's own minimum; the y form moves 5/3 = 1.67x of its own, 1.25x the issue's. The eager and
compiled references compute the same form as diffkern. The call differentiates v only: the stored
rollout tensors travel in a `Rollout`, which the harness does not treat as an input.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _dtypes
from ..grpo import grpo_iso_loss, reference
from ..grpo.triton_kernels import aot_specs
from . import grpo_model
from .workload import BWD, CPU_BARS, FULL_RUN, FWD, STEP, Bar, Case, Workload

WAN_LATENT = (16, 21, 60, 104)


@dataclass(frozen=True)
class Rollout:
    """What a rollout stored for training (not differentiated): x and x_next, or y."""
    x: torch.Tensor | None
    x_next: torch.Tensor | None
    y: torch.Tensor | None
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    log_prob_old: torch.Tensor
    advantages: torch.Tensor


def _case(B: int, latent: tuple) -> Case:
    D = 1
    for n in latent:
        D *= n
    return Case(f"B={B} D={D}", dict(B=B, D=D, latent="x".join(map(str, latent))), B)


def _make_args(case: Case, dtype: torch.dtype, device: str, residual: bool):
    B, D = case.params["B"], case.params["D"]
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        if device == "meta":
            return torch.empty(shape, dtype=dtype, device=device)
        return torch.randn(shape, generator=gen).to(dtype=dtype, device=device)

    sigmas = reference.flow_sigmas()
    steps = torch.arange(B) % 10
    sigma, sigma_next = sigmas[steps].float().to(device), sigmas[steps + 1].float().to(device)
    x, v = randn(B, D), randn(B, D)
    x_next, y, log_prob, _ = reference.flow_sde_step(x, v, sigma, sigma_next, randn(B, D), 0, reference.WAN_STD_COEF)
    # ratios just around 1: a few samples fall outside the clip range
    delta = torch.linspace(-2e-3, 2e-3, B, device=device)
    advantages = torch.linspace(-1.0, 1.0, B, device=device)
    step = (None, None, y) if residual else (x, x_next, None)
    return randn(B, D), Rollout(*step, sigma, sigma_next, log_prob - delta, advantages)


def _call(loss):
    def call(v, r: Rollout):
        return loss(v, r.x, r.x_next, r.sigma, r.sigma_next, r.log_prob_old, r.advantages, y=r.y)[0]
    return call


def _min_bytes(case: Case, itemsize: int, residual: bool) -> dict:
    """fwd: read v and x, x_next (or y); fwd+bwd: read them once and write dv (bwd's share is writing dv)."""
    n = case.params["B"] * case.params["D"] * itemsize
    return {FWD: (2 if residual else 3) * n, BWD: n}


# The issue's traffic bar is 1.3x its minimum, 4 passes (read x, v, x_next, write dv); in units of a
# form's own minimum that is 1.3 * 4 / (its passes).
ISSUE_MIN_PASSES, TRAFFIC_BAR = 4, 1.3


def _workload(residual: bool) -> Workload:
    def spec_used(spec, case: Case, dtype: torch.dtype) -> bool:
        """The Wan rule's log-prob kernels of this form without CFG or KL, and the finalize kernel."""
        if spec.tags.get("std_rule") != 0:
            return False
        if spec.kernel.__name__ == "finalize_kernel":
            return True
        return (spec.tags.get("dtype") == _dtypes.name(dtype) and "backward" in spec.tags
                and spec.constexprs["HAS_X"] != residual and not spec.constexprs["HAS_CFG"]
                and not spec.constexprs["HAS_REF"])

    def modeled(case: Case, dtype: torch.dtype) -> dict:
        return {**grpo_model.loss_counts(workload, case, dtype, has_x=not residual),
                "note": "grpo_model (the kernels' grid and the loss's aten glue counted on meta tensors, tested equal "
                        "to the interpreter's counts on small shapes); the full run counts the case."}

    workload = Workload(
        name="grpo_iso_loss_y" if residual else "grpo_iso_loss",
        title=f"Flow-GRPO one-step loss (grpo_iso_loss, stored step {'y' if residual else 'x, x_next'})",
        full_cases=(_case(8, WAN_LATENT),),
        quick_cases=(_case(2, (4, 3, 8, 13)),),
        make_args=lambda case, dtype, device: _make_args(case, dtype, device, residual),
        diffkern=_call(grpo_iso_loss),
        reference=_call(reference.grpo_iso_loss_reference),
        min_bytes=lambda case, itemsize: _min_bytes(case, itemsize, residual),
        aot_specs=aot_specs,
        spec_used=spec_used,
        cuda_sources=("grpo.cu",),
        cuda_warps="8 (finalize: 4)",
        bars=(
            Bar(f"fused fwd+bwd traffic <= {TRAFFIC_BAR}x the issue's minimum (read x, v, x_next, write dv)"
                + (f" = {TRAFFIC_BAR * ISSUE_MIN_PASSES / 3:.3f}x this form's (read v, y, write dv)" if residual else ""),
                "traffic", "diffkern_over_min", "<=", TRAFFIC_BAR * ISSUE_MIN_PASSES / (3 if residual else 4),
                (STEP,)),
            Bar("eager/diffkern traffic >= 3x", "traffic", "eager_over_diffkern", ">=", 3.0, (STEP,)),
            *CPU_BARS,
        ),
        modeled_counts=modeled,
        counted_in=lambda case: FULL_RUN,  # 17M elements a tensor: minutes in the interpreter
    )
    return workload


WORKLOADS = (_workload(residual=True), _workload(residual=False))
