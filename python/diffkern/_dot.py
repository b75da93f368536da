"""How the Triton kernels' matrix products run: on tensor cores in the inputs' 16-bit dtype, or in fp32.

One policy for every kernel that calls `tl.dot` (the sinks attention kernels, R-MDM's recursion):
  * bf16 / fp16 inputs: the fp32 left operand (a probability tile, a normalised activation) is cast to the
    right operand's storage dtype and the product accumulates in fp32 on the tensor cores, as
    flash-attention does;
  * fp32 inputs on a GPU: "tf32x3" (three tf32 products, about fp32 accurate, on the tensor cores) while
    `torch.get_float32_matmul_precision()` is "highest" (PyTorch's default), plain "tf32" after
    `torch.set_float32_matmul_precision("high")` or "medium", the flag users already set for cuBLAS;
  * under the interpreter (TRITON_INTERPRET=1) every product runs with fp32 operands in "ieee": a bf16
    `tl.dot` gives garbage there (../shared/TRITON_ON_CPU.md), so the tests run the same kernels through
    this fp32 switch and the 16-bit variants are proven by compiling them for sm_80/sm_90a.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _triton


def dot_meta(dtype: torch.dtype, interpreting: bool | None = None) -> dict:
    """The constexprs DOT_F32 and PRECISION a kernel's `dot` calls take for inputs of `dtype`; `interpreting`
    None: as this process runs them, False: as a GPU does (what the roofline's peaks follow)."""
    if _triton.interpreting() if interpreting is None else interpreting:
        return {"DOT_F32": True, "PRECISION": "ieee"}
    if dtype != torch.float32:
        return {"DOT_F32": False, "PRECISION": "tf32x3"}  # PRECISION unused on the 16-bit path
    return {"DOT_F32": True, "PRECISION": "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"}


@triton.jit
def dot(a, b, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b accumulated in fp32: fp32 operands at PRECISION when DOT_F32, else `a` cast to b's dtype."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return tl.dot(a.to(b.dtype), b)
