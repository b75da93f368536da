"""The shipped CUDA kernels (csrc/cuda/*.cu) compile for sm_80 and sm_90a without register spills.

Compiled as the real build compiles them (setup.py's half/bf16 flags, -O3), with ptxas -v; each kernel's
registers are printed (pytest -s). The benchmark report lists the same figures.
"""
import pytest

from diffkern.testing import nvcc


@pytest.mark.skipif(nvcc.find_nvcc() is None, reason="nvcc is not installed")
def test_cuda_kernels_compile_for_sm80_and_sm90a_without_spills():
    reports = nvcc.shipped_reports(nvcc.find_nvcc())
    kernels = {k for path in (nvcc.ROOT / "csrc" / "cuda").glob("*.cu") for k in nvcc.kernel_names(path)}
    assert {"route_fwd_kernel", "route_bwd_kernel", "route_reduce_kernel"} <= kernels
    assert {"sde_step_kernel", "log_prob_fwd_kernel", "log_prob_bwd_kernel", "finalize_kernel"} <= kernels
    assert "ntrk_step_kernel" in kernels
    for line in nvcc.check_no_spills(kernels, reports):
        print(line)
