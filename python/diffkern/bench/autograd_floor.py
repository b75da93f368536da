"""The autograd floor of a training step: what torch.autograd.grad costs around an op that does no work.

A training step timed as `torch.autograd.grad(op(*inputs), leaves, dout)` (diffkern.bench.workload.step_call)
pays, besides the op's kernels, for recording the op's node in the forward and for the engine running it:
torch.autograd.grad's Python, the graph task, the captures, the graph's release. `floor_call` is exactly that
around an empty torch.autograd.Function of the op's arity: its forward returns a view of a latent-sized tensor
allocated once, its backward hands the incoming gradient to every input that needs one; no tensor data is read or
written.

With a machine-limit yardstick's forward and backward sweeps run inside the Function (diffkern.bench.cpu_gap: the
fused NoiseTilt step), the engine's work runs with the caches as the sweeps leave them, as it does around the op's
own kernels. That matters on this 2-core machine: the NoiseTilt step's autograd overhead is ~13 us of CPU time with
warm caches (tiny tensors) and ~80-90 us between the kernels' 28 MB of sweeps (B=4 FLUX, 1 thread; perf samples
spread over the engine, torch.autograd.grad's Python and glibc malloc, while the kernels' own samples are the same
under the engine and with the op's node applied by hand).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

GRAD, PER_SAMPLE, NONE = "grad", "per_sample", "none"


def _nothing() -> None:
    return None


class _Empty(torch.autograd.Function):
    """forward(out, needs, work, *inputs) -> a view of `out`, after work[0](); backward: work[1](), then the
    incoming gradient for every input in `needs`, None for the others."""

    @staticmethod
    def forward(ctx, out, needs, work, *inputs):
        work[0]()
        ctx.needs, ctx.work = needs, work
        return out.view_as(out)

    @staticmethod
    def backward(ctx, dx):
        ctx.work[1]()
        return (None, None, None, *(dx if need else None for need in ctx.needs))


def floor_call(shape: Sequence[int], kinds: Sequence[str], forward: Callable[[], object] = _nothing,
               backward: Callable[[], object] = _nothing) -> Callable[[], object]:
    """One call: torch.autograd.grad of an empty autograd Function over inputs of `kinds`, returning a tensor of
    `shape`, with respect to its GRAD inputs; `forward()` runs inside the Function's forward and `backward()` inside
    its backward (a yardstick's forward and backward sweeps: the engine's work then runs with the caches as those
    leave them, as it does around the op's own kernels).

    Args:
        shape: the op's output shape [B, ...] (float32); every GRAD input is a leaf of this shape requiring grad.
        kinds: one per op input, in order: GRAD (a latent-sized input the step differentiates), PER_SAMPLE (a [B]
            tensor without grad, such as a per-sample scale) or NONE (an optional input left out).
    Returns:
        A callable doing one empty step; it returns the gradients (each the incoming gradient itself).
    Bad input: ValueError naming the argument (an empty or non-positive shape, an unknown kind, no GRAD input).
    """
    shape = tuple(int(n) for n in shape)
    if not shape or any(n <= 0 for n in shape):
        raise ValueError(f"floor_call: shape must be a non-empty tuple of positive sizes, got {shape}")
    if any(k not in (GRAD, PER_SAMPLE, NONE) for k in kinds) or GRAD not in kinds:
        raise ValueError(f"floor_call: kinds must each be {GRAD!r}, {PER_SAMPLE!r} or {NONE!r}, at least one "
                         f"{GRAD!r}, got {list(kinds)}")
    # never read: empty, so the floor's own pages are never faulted in
    make = {GRAD: lambda: torch.empty(shape).requires_grad_(True), PER_SAMPLE: lambda: torch.empty(shape[:1]),
            NONE: lambda: None}
    inputs = tuple(make[k]() for k in kinds)
    leaves = tuple(x for x, k in zip(inputs, kinds) if k == GRAD)
    needs = tuple(k == GRAD for k in kinds)
    out, dout = torch.empty(shape), torch.empty(shape)
    work = (forward, backward)

    def call():
        return torch.autograd.grad(_Empty.apply(out, needs, work, *inputs), leaves, dout)
    return call
