"""Accuracy criteria shared by every op test: a stated error model, not a tuned constant.

The model. A kernel reads its inputs exactly, accumulates in float32 (float64 for float64 inputs) and
rounds each output once to the output dtype. A reduction of n terms computed in a unit roundoff u, in
any order, blocking or thread split, returns the exact sum of the terms each perturbed by a relative
theta_j with |theta_j| <= n u (worst case) and, with high probability, ~sqrt(n) u (Higham & Mary's
probabilistic bound). Pushed back to the inputs, the kernel's result is the exact function of inputs
perturbed relatively by about sqrt(n) u each. So its forward error is the oracle's response to such a
perturbation — which carries the condition of the quantity (a softmax over large logits, a difference
of nearly equal terms, L recursions of a block) without a per-op formula:

    spread = max over S seeded samples of |f(x (1 + sqrt(n + 16) u r)) - f(x)|,  r ~ N(0, 1) per element,

f the float64 oracle, n the fan-in of one output (the number of input elements its longest chain of
reductions sums over; 16 more roundings allow for the elementwise steps around it: rsqrt, exp, products).
An input that enters no reduction has n = 0: only those elementwise roundings. An input the kernel reads
exactly and uses only through per-sample scalars that it and the plain computation form alike (a sigma,
whose perturbation the cancellation in sigma_next - sigma would amplify although both compute that
difference exactly; a stored log-probability) has n = None: it is not perturbed.
The tolerance on the elementwise maximum error is

    tol = MARGIN * spread + 2 |plain - oracle| + ULP[dtype] * max|oracle|

- MARGIN * spread: the accumulation error in any summation order (tests/test_error_model.py: the
  kernels sit at <= 0.1 of the whole tolerance, a dropped term or an off-by-one read at >= 26x of it);
- 2 |plain - oracle|: flash-attention's rule, the plain PyTorch computation in the low precision — it
  covers intermediates the op rounds to the input dtype as the reference does;
- one unit in the last place of the output dtype: the final rounding (bf16 stores truncate under the
  Triton interpreter, so a whole ulp, not half).
None of the three depends on the machine, the thread count or the summation order.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

MARGIN = 2.0
SAMPLES = 3
# Unit roundoff of the accumulation and one ulp (relative) of each output dtype.
ACC_UNIT_ROUNDOFF = {torch.float64: 2.0**-53}
ULP = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def acc_unit_roundoff(dtype: torch.dtype) -> float:
    """u of the accumulation a kernel uses for `dtype` inputs (float32 for every 16/32-bit dtype)."""
    return ACC_UNIT_ROUNDOFF.get(dtype, 2.0**-24)


def max_error(x: torch.Tensor, oracle: torch.Tensor) -> float:
    return (x.detach().cpu().double() - oracle.detach().cpu().double()).abs().max().item() if x.numel() else 0.0


def _flat(outputs) -> list:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _perturb(x, rel: float, g: torch.Generator | None, device="cpu"):
    """x on `device` in float64 (nested lists kept), each element times (1 + rel r), r ~ N(0, 1) drawn on
    the CPU (the same r on every device); rel = 0 gives the plain float64 copy. The requires_grad flag is
    kept, for oracles that differentiate."""
    if isinstance(x, (list, tuple)):
        return type(x)(_perturb(t, rel, g, device) for t in x)
    if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
        return x
    y = x.detach().to(device, torch.float64)
    if rel:
        y = y * (1 + rel * torch.randn(y.shape, generator=g, dtype=torch.float64).to(device))
    return y.requires_grad_(x.requires_grad)


def oracle_with_spread(fn: Callable, inputs: Sequence, n: int | Sequence[int | None], dtype: torch.dtype,
                       seed: int = 0, device: torch.device | str = "cpu"):
    """(outputs, spreads): fn(*inputs) in float64 and, per output, the model's spread (module docstring).

    fn: the float64 oracle, returning a tensor or a sequence of tensors (None entries allowed);
    inputs: its arguments (tensors, nested lists of tensors, or anything else passed through), copied to
    float64 on `device` (keeping requires_grad) before fn sees them (the CPU by default; a GPU's float64
    oracle serves real model shapes faster);
    n: the fan-in of one output, or one per input (None: not perturbed); dtype: the kernel's input dtype
    (which accumulation it uses).
    Every perturbation is seeded, so the tolerance is the same on every run.
    """
    outputs = _flat(fn(*_perturb(inputs, 0.0, None, device)))
    fan_in = [n] * len(inputs) if isinstance(n, int) else list(n)
    assert len(fan_in) == len(inputs), "one fan-in per input"
    rel = [0.0 if m is None else math.sqrt(m + 16) * acc_unit_roundoff(dtype) for m in fan_in]
    g = torch.Generator().manual_seed(seed)
    spreads = [0.0] * len(outputs)
    for _ in range(SAMPLES):
        perturbed = [_perturb(x, r, g, device) for x, r in zip(inputs, rel)]
        for i, (y, p) in enumerate(zip(outputs, _flat(fn(*perturbed)))):
            if y is not None and y.numel():
                spreads[i] = max(spreads[i], max_error(p, y))
    return [y.detach() if y is not None else None for y in outputs], spreads


def tolerance(dtype: torch.dtype, oracle: torch.Tensor, plain: torch.Tensor, spread: float) -> float:
    scale = oracle.abs().max().item() if oracle.numel() else 0.0
    return MARGIN * spread + 2 * max_error(plain, oracle) + ULP[dtype] * scale


def assert_close_to_oracle(actual: torch.Tensor, oracle: torch.Tensor, plain: torch.Tensor, what: str,
                           spread: float) -> None:
    """Checks max|actual - oracle| <= tolerance(...) (module docstring) and that `actual` has no NaN.

    actual: the kernel's output; oracle: the float64 reference; plain: the reference computed in the
    low precision; spread: from oracle_with_spread. Outputs start as NaN in tests, so a NaN here is an
    element the kernel never wrote (or a NaN the reference does not have).
    """
    assert actual.shape == oracle.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: NaN in output (an element was never written?)"
    err, tol = max_error(actual, oracle), tolerance(actual.dtype, oracle, plain, spread)
    assert err <= tol, (f"{what}: max error {err:.3e} > tolerance {tol:.3e} (model spread {spread:.3e}, "
                        f"plain {actual.dtype} error {max_error(plain, oracle):.3e})")
