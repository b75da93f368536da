"""Accuracy criteria shared by every op test.

flash-attention's rule: a kernel's error against the float64 oracle may be at most twice the error of
the plain PyTorch computation run in the same low precision, plus a small per-dtype floor (relative
to the oracle's magnitude) for the cases where that plain computation happens to be exact.
"""
from __future__ import annotations

import torch

# Per-dtype floor, relative to max|oracle|: about one ulp of the dtype (bf16 stores truncate under the
# Triton interpreter, so a whole ulp must be allowed there).
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def max_error(x: torch.Tensor, oracle: torch.Tensor) -> float:
    return (x.detach().cpu().double() - oracle.detach().cpu().double()).abs().max().item() if x.numel() else 0.0


def assert_close_to_oracle(actual: torch.Tensor, oracle: torch.Tensor, plain: torch.Tensor, what: str = "") -> None:
    """Checks |actual - oracle| <= 2 |plain - oracle| + FLOOR[dtype] * max(1, max|oracle|), elementwise maxima.

    actual: the kernel's output; oracle: float64 reference; plain: reference computed in actual's dtype.
    NaN anywhere in `actual` fails (outputs start as NaN in tests, so an unwritten element is caught).
    """
    assert actual.shape == oracle.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: NaN in output (an element was never written?)"
    scale = max(1.0, oracle.abs().max().item()) if oracle.numel() else 1.0
    err, plain_err = max_error(actual, oracle), max_error(plain, oracle)
    tol = 2 * plain_err + FLOOR[actual.dtype] * scale
    assert err <= tol, f"{what}: max error {err:.3e} > tolerance {tol:.3e} (plain {actual.dtype} error {plain_err:.3e})"
