"""Every kernel compiles for sm_90a as a real launch specialises it, not only as its AOT spec declares it.

Triton's launcher turns an integer argument equal to 1 into the constexpr 1 (so `M.to(tl.int64)` meets a
Python int), and marks integers that are multiples of 16 and 16-byte-aligned pointers divisible by 16
(which changes vectorisation, hence registers). Neither the interpreter nor the AOT specs specialise, so
each kernel's first spec is compiled here once per integer argument equal to 1, once with every integer a
multiple of 16, and once with neither, through Triton's own launcher code (diffkern.testing.aot.launched).
One spec per kernel (its first) keeps this to ~150 compiles: code behind a constexpr branch that spec does
not take is compiled specialised by no test.
"""
import pytest

from diffkern.testing.aot import compile_spec, integer_arguments, launched, library_specs

ARCH = 90
FIRST_SPECS = {}
for spec in library_specs():
    FIRST_SPECS.setdefault(spec.kernel, spec)
VARIANTS = [(spec, one, divisible) for spec in FIRST_SPECS.values()
            for one, divisible in [(None, False), (None, True), *((name, False) for name in integer_arguments(spec))]]


@pytest.mark.parametrize(("spec", "one", "divisible"), VARIANTS,
                         ids=[f"{s.name}-{o or ('divisible' if d else 'aligned')}" for s, o, d in VARIANTS])
def test_launch_specialisation_compiles_without_spills(spec, one, divisible):
    res = compile_spec(launched(spec, ARCH, one=one, divisible=divisible), ARCH)
    assert (res.spill_stores, res.spill_loads, res.stack_bytes) == (0, 0, 0), res
