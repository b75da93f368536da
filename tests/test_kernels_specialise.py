"""Every kernel compiles for sm_90a as a real launch specialises it, not only as its AOT spec declares it.

Triton's launcher turns an integer argument equal to 1 into the constexpr 1 (so `M.to(tl.int64)` meets a
Python int), and marks integers that are multiples of 16 and 16-byte-aligned pointers divisible by 16
(which changes vectorisation, hence registers). Neither the interpreter nor the AOT specs specialise, so
each kernel's first spec is compiled here once per integer argument equal to 1, once with every integer a
multiple of 16, and once with neither, through Triton's own launcher code (diffkern.testing.aot.launched).
One spec per kernel (its first) keeps this to ~180 compiles: code behind a constexpr branch that spec does
not take is compiled specialised by no test.

The specs that declare some widths 16-divisible (R-MDM's tiled kernels, at d = 512) stand for launches at those
widths. The autotuner offers the same candidates at any width (except the aligned-only ones), so each of those
specs also compiles as a launch at widths that are not multiples of 16: a candidate that spilled there would be
dropped at run time (diffkern._autotune), unseen.
"""
import pytest

from diffkern.rmdm import triton_kernels as rmdm_triton
from diffkern.testing.aot import compile_spec, integer_arguments, launched, library_specs

ARCH = 90
SPECS = library_specs()
FIRST_SPECS = {}
for spec in SPECS:
    FIRST_SPECS.setdefault(spec.kernel, spec)
VARIANTS = [(spec, one, divisible) for spec in FIRST_SPECS.values()
            for one, divisible in [(None, False), (None, True), *((name, False) for name in integer_arguments(spec))]]


@pytest.mark.parametrize(("spec", "one", "divisible"), VARIANTS,
                         ids=[f"{s.name}-{o or ('divisible' if d else 'aligned')}" for s, o, d in VARIANTS])
def test_launch_specialisation_compiles_without_spills(spec, one, divisible):
    res = compile_spec(launched(spec, ARCH, one=one, divisible=divisible), ARCH)
    assert (res.spill_stores, res.spill_loads, res.stack_bytes) == (0, 0, 0), res


AT_ANY_WIDTH = [spec for spec in SPECS if any(name in spec.attrs for name in integer_arguments(spec))
                and not rmdm_triton.aligned_only(spec)]


@pytest.mark.parametrize("spec", AT_ANY_WIDTH, ids=lambda s: s.name)
def test_candidates_compile_without_spills_at_widths_not_16_divisible(spec):
    res = compile_spec(launched(spec, ARCH), ARCH)
    assert (res.spill_stores, res.spill_loads, res.stack_bytes) == (0, 0, 0), res
