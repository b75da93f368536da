"""Every Triton launch configuration compiles for sm_80 and sm_90a without register spills.

No GPU is needed: triton.compile targets the architecture and ptxas -v reports the resources.
"""
import pytest

from diffkern.dar import triton_kernels as dar_kernels
from diffkern.testing.aot import compile_spec

SPECS = [*dar_kernels.aot_specs()]


@pytest.mark.parametrize("arch", (80, 90))
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_compiles_without_spills(spec, arch):
    res = compile_spec(spec, arch)
    assert res.registers > 0
    assert (res.spill_stores, res.spill_loads, res.stack_bytes) == (0, 0, 0), res
