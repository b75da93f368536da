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
    return gpu_meta(dtype, "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32")


# The precisions fp32 products compile with on a GPU (torch's "highest" matmul precision, then "high"/"medium"):
# the AOT specs compile both.
FP32_PRECISIONS = ("tf32x3", "tf32")


def gpu_meta(dtype: torch.dtype, fp32_precision: str = "tf32x3") -> dict:
    """The constexprs of `dtype`'s products as a GPU compiles them, fp32 inputs at `fp32_precision` (one of
    FP32_PRECISIONS); for 16-bit inputs PRECISION is unused."""
    assert fp32_precision in FP32_PRECISIONS, fp32_precision
    return {"DOT_F32": dtype == torch.float32, "PRECISION": fp32_precision}


def precision_tags(dtype: torch.dtype, fp32_precision: str) -> dict:
    """An AOT spec's tag for its products' precision: fp32 inputs only (16-bit ones have one)."""
    return {"precision": fp32_precision} if dtype == torch.float32 else {}


@triton.jit
def dot(a, b, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b accumulated in fp32: fp32 operands at PRECISION when DOT_F32, else `a` cast to b's dtype."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return tl.dot(a.to(b.dtype), b)
