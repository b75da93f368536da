"""The shipped CUDA kernels (csrc/cuda/*.cu) compile for sm_80 and sm_90a without register spills.

Compiled as the real build compiles them (setup.py's half/bf16 flags, -O3), with ptxas -v; each kernel's
registers are printed (pytest -s) for the benchmark report.
"""
from pathlib import Path

import pytest

from diffkern.testing import nvcc

ROOT = Path(__file__).resolve().parents[1]
KERNELS = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
INPUTS = [*sorted((ROOT / "csrc" / "cuda").glob("*.h")), *sorted((ROOT / "csrc" / "cuda").glob("*.cuh")),
          *sorted((ROOT / "csrc" / "include" / "diffkern").glob("*.h"))]
FLAGS = ["-std=c++20", "-O3", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc' / 'include'}",
         "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__"]


@pytest.mark.skipif(nvcc.find_nvcc() is None, reason="nvcc is not installed")
def test_cuda_kernels_compile_for_sm80_and_sm90a_without_spills():
    reports = nvcc.ptxas_reports(nvcc.find_nvcc(), KERNELS, INPUTS, ROOT / "build", FLAGS)
    kernels = {k for path in KERNELS for k in nvcc.kernel_names(path)}
    assert {"route_fwd_kernel", "route_bwd_kernel", "route_reduce_kernel"} <= kernels
    for line in nvcc.check_no_spills(kernels, reports):
        print(line)
