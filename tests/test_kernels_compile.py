"""Every Triton launch configuration compiles for sm_90a (and each kernel's first candidate for sm_80) without
register spills.

No GPU is needed: triton.compile targets the architecture and ptxas -v reports the resources.
"""
import pytest
import torch

import diffkern
from diffkern.rmdm import triton_kernels as rmdm_triton
from diffkern.testing import aot
from diffkern.testing.aot import compile_spec, library_specs
from diffkern.testing.backends import forced

SPECS = library_specs()


# Every spec for sm_90a (the H100 the GPU check runs on); for sm_80 each kernel's first autotune candidate and
# the specs of untuned kernels (a later candidate that spills on an A100 is dropped by _autotune.pick at run time).
CASES = [(spec, arch) for spec in SPECS for arch in (80, 90) if arch == 90 or spec.tags.get("candidate", 0) == 0]


@pytest.mark.parametrize(("spec", "arch"), CASES, ids=lambda x: x.name if hasattr(x, "name") else str(x))
def test_compiles_without_spills(spec, arch):
    res = compile_spec(spec, arch)
    assert res.registers > 0
    assert (res.spill_stores, res.spill_loads, res.stack_bytes) == (0, 0, 0), res


# R-MDM's forward candidates for aligned 16-bit launches only (triton_kernels._WIDE), which an A100 may run too: on
# sm_80 as well, as an aligned launch specialises them (pointers, N and Kd 16-divisible, the other integers not).
WIDE = [spec for spec in SPECS if rmdm_triton.aligned_only(spec)]


@pytest.mark.parametrize("spec", WIDE, ids=lambda s: s.name)
def test_wide_forward_tiles_compile_without_spills_for_sm_80(spec):
    res = compile_spec(aot.launched(spec, 80, divisible=("N", "Kd")), 80)
    assert (res.spill_stores, res.spill_loads, res.stack_bytes) == (0, 0, 0), res


@pytest.mark.skipif(torch.cuda.is_available(), reason="about the interpreter, which runs only without a GPU")
def test_compiles_cold_after_interpreted_launches(tmp_path, monkeypatch):
    """Interpreted launches that call @triton.jit helpers leave triton.language as they found it, so a
    compile that cannot come from Triton's cache (as on a fresh CI machine) still works."""
    sources = [torch.randn(1, 3, 16) for _ in range(2)]
    with forced("triton"):
        diffkern.dar_route(sources, torch.randn(16), torch.ones(16))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    assert compile_spec(SPECS[0], 90).registers > 0
    assert any(tmp_path.iterdir()), "the compile was not cold"


def test_cold_compile_runs_ptxas_once(tmp_path, monkeypatch):
    """The resources of a cold compile come from the `ptxas -v` report Triton's own cubin step printed: no second
    ptxas run (a third of a small kernel's compile time)."""
    def no_second_run(*args, **kwargs):
        raise AssertionError(f"ptxas run again: {args}")

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(aot, "subprocess", type("NoSubprocess", (), {"run": staticmethod(no_second_run)}))
    assert compile_spec(SPECS[0], 90).registers > 0
