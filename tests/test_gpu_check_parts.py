"""The CPU-checkable logic of gpu_check's cooperative, sanitizer, timing and registers sections: the report
parser, the launched-vs-AOT comparison on fake compiled-kernel records, the bars, and the cooperative
check in the interpreter (including the defects it must catch)."""
import json
import types

import pytest
import torch

from diffkern import _cooperative
from diffkern.bench import dar, grpo, ntrk
from diffkern.bench.workload import FWD
from diffkern.gpu_check import cooperative, registers, sanitizer, timed_ops, timing
from diffkern.gpu_check.timed_ops import SINKS, SINKS_GIVEN, calls
from diffkern.rmdm import triton_persistent
from diffkern.testing.aot import Resources, integer_arguments, jit_function, library_specs

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests (CPU tensors)")

CLEAN = """========= COMPUTE-SANITIZER
case dar_route q[37] bfloat16
cases done
========= ERROR SUMMARY: 0 errors
"""
OUT_OF_BOUNDS = """========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 2 bytes
=========     at route_fwd_kernel(diffkern::cuda::FwdArgs<__nv_bfloat16, 1>)+0x1a0 in dar_route.cu:150
=========     by thread (37,0,0) in block (0,0,0)
=========     Address 0x7f0000000102 is out of bounds
=========
========= ERROR SUMMARY: 3 errors
"""
RACE = """========= COMPUTE-SANITIZER
cases done
========= Error: Race reported between Write access at route_bwd_kernel+0x90 and Read access at route_bwd_kernel+0xb0
========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)
"""
REFUSED = """========= COMPUTE-SANITIZER
========= Error: Device not supported. Skipping.
"""


@pytest.mark.parametrize("text,status,errors", [(CLEAN, "pass", 0), (OUT_OF_BOUNDS, "fail", 3), (RACE, "fail", 1),
                                                (REFUSED, "skip", None)], ids=("clean", "oob", "race", "refused"))
def test_sanitizer_reports_are_parsed(text, status, errors):
    report = sanitizer.parse(text)
    row = sanitizer.verdict("memcheck", report)
    assert (row.status, report["errors"]) == (status, errors), row
    if status == "fail":
        assert report["first_problem"].startswith(("Invalid __global__ read", "Error: Race")), row.detail
    if status == "skip":
        assert "Device not supported" in row.detail


def test_a_clean_report_whose_cases_did_not_finish_fails():
    assert sanitizer.verdict("memcheck", sanitizer.parse(CLEAN.replace("cases done\n", ""))).status == "fail"
    assert sanitizer.verdict("memcheck", sanitizer.parse(CLEAN, returncode=-11)).status == "fail"


def _spec(kernel_name: str):
    specs = library_specs()
    return specs, next(s for s in specs if jit_function(s.kernel).__name__ == kernel_name)


def _fake_kernel(spec, maxnreg, n_regs, n_spills, extra_constants=None):
    """A stand-in JITFunction whose device cache holds one compiled configuration of `spec`."""
    fn = jit_function(spec.kernel)
    constants = {(fn.arg_names.index(k),): v for k, v in {**spec.constexprs, **(extra_constants or {})}.items()}
    source = types.SimpleNamespace(constants=constants, signature=dict(spec.signature))
    compiled = types.SimpleNamespace(src=source, n_regs=n_regs, n_spills=n_spills,
                                     metadata=types.SimpleNamespace(num_warps=spec.num_warps, maxnreg=maxnreg))
    return types.SimpleNamespace(__name__=fn.__name__, arg_names=fn.arg_names,
                                 device_caches={0: ({"key": compiled}, {}, None, None, None)})


def _aot(spec, spills=0):
    return Resources(spec.name, "sm_90a", spec.num_warps, 120, spills, spills, 0, 0)


@pytest.mark.parametrize("maxnreg_of_launch,n_spills,aot_spills,status", [
    ("spec", 0, 0, "pass"), (None, 0, 0, "fail"), ("spec", 8, 0, "fail"), ("spec", 0, 16, "fail")],
    ids=("as-checked", "no-maxnreg", "launch-spills", "aot-spills"))
def test_launched_kernels_are_compared_with_their_aot_spec(maxnreg_of_launch, n_spills, aot_spills, status):
    specs, spec = _spec("ntrk_step_kernel")
    maxnreg = spec.maxnreg if maxnreg_of_launch == "spec" else maxnreg_of_launch
    # the launch specialised an integer argument equal to 1 as well: the spec still describes it
    fake = _fake_kernel(spec, maxnreg, 118, n_spills, {integer_arguments(spec)[0]: 1})
    (launched,) = registers.launched_kernels(fake)
    match = registers.match_spec(launched, specs)
    assert match is spec
    row = registers.compare(launched, match, _aot(match, aot_spills))
    assert row.status == status, row.detail
    assert row.metrics["n_regs"] == 118 and row.metrics["aot_registers"] == 120


def test_a_launch_is_judged_without_its_aot_figures_when_they_were_not_compiled():
    specs, spec = _spec("ntrk_step_kernel")
    launched = registers.Launched("ntrk_step_kernel", dict(spec.constexprs), spec.num_warps, None, 90, 0)
    row = registers.compare(launched, spec, None)
    assert row.status == "fail" and "maxnreg None" in row.detail and "not compiled" in row.detail


def test_a_configuration_without_an_aot_spec_is_reported():
    specs, spec = _spec("ntrk_step_kernel")
    launched = registers.Launched("ntrk_step_kernel", dict(spec.constexprs), spec.num_warps + 64, spec.maxnreg, 90, 0)
    assert registers.match_spec(launched, specs) is None
    row = registers.compare(launched, None, None)
    assert row.status == "info" and "no AOT spec" in row.detail


CUOBJDUMP = """
Fatbin elf code:
================
arch = sm_90a
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN8diffkern4cuda16ntrk_step_kernelI6__halfEEvNS0_8StepArgsIT_EE:
  REG:32 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN8diffkern4cuda16route_fwd_kernelIfLi1EEEvNS0_7FwdArgsIT_XT0_EEE:
  REG:255 STACK:24 SHARED:64 LOCAL:24 CONSTANT[0]:900 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_cuobjdump_resource_usage_is_parsed():
    entries = registers.parse_resource_usage(CUOBJDUMP)
    assert [(e["arch"], registers._kernel_name(e["function"]), e["reg"], e["local"]) for e in entries] == [
        ("sm_90a", "ntrk_step_kernel", 32, 0), ("sm_90a", "route_fwd_kernel", 255, 24)]


def test_bars_are_met_or_not_from_the_measured_times():
    memory_bound = next(c for c in calls() if c.memory_bound)
    ms = {"eager": 3.0, "compile": 1.2}
    rows = timing.bar_rows(memory_bound, "fwd cuda", ms, 1.0, gbps=2600.0, peaks={"copy_gbps": 3000.0})
    assert [r.status for r in rows] == ["met", "met", "not met"]  # 3x eager, 87% of copy bandwidth, 1.2x compile
    sinks = next(c for c in calls() if c.workload is SINKS)
    rows = timing.bar_rows(sinks, "fwd triton", {"eager": 10.0, "sdpa_flash": 0.7}, 1.0, 100.0, {"copy_gbps": None})
    assert [r.status for r in rows] == ["met", "not met"]  # 10x eager; 1.43x flash > 1.3
    given = next(c for c in calls() if c.workload is SINKS_GIVEN)
    rows = timing.bar_rows(given, "fwd triton", {"eager": 10.0, "sdpa_flash": 0.9}, 1.0, 100.0, {"copy_gbps": None})
    assert [r.status for r in rows] == ["met", "met"]  # 10x eager; 1.11x flash
    no_peak = timing.bar_rows(memory_bound, "fwd cuda", {}, 1.0, 100.0, {"copy_gbps": None})
    assert [r.status for r in no_peak] == ["skip", "skip", "skip"]


SHAPE, DTYPE, PB = cooperative.DRY_CASES[0]


def test_the_cooperative_check_passes_in_the_interpreter():
    row = cooperative.barrier_check(SHAPE, DTYPE, PB, 3, torch.device("cpu"))
    assert row.status == "pass", row.detail
    assert row.metrics["programs"] == SHAPE[5] * PB and row.metrics["counter"] == [0, 0]


def _planted(monkeypatch, defect):
    real = triton_persistent.recurse_persistent
    n = {"calls": 0}

    def launch(*args):
        n["calls"] += 1
        out = real(*args)
        return defect(out, n["calls"])
    monkeypatch.setattr(triton_persistent, "recurse_persistent", launch)


def test_the_cooperative_check_catches_a_launch_that_differs(monkeypatch):
    _planted(monkeypatch, lambda out, i: out + (i == 2) * 1e-3)
    row = cooperative.barrier_check(SHAPE, DTYPE, PB, 3, torch.device("cpu"))
    assert row.status == "fail" and "differ from the first" in row.detail


def test_the_cooperative_check_catches_a_dirty_counter(monkeypatch):
    sync = _cooperative.sync_buffer(torch.device("cpu"))

    def dirty_after_last(out, i):
        if i == 3:
            sync[0] = 7
        return out
    _planted(monkeypatch, dirty_after_last)
    try:
        row = cooperative.barrier_check(SHAPE, DTYPE, PB, 3, torch.device("cpu"))
    finally:
        sync.zero_()
    assert row.status == "fail" and "counter [7, 0]" in row.detail


def test_dry_run_timing_rows_carry_every_calls_roofline():
    ctx = types.SimpleNamespace(dry_run=True, device=torch.device("cpu"))
    rows = timing.run(ctx)
    assert len(rows) == sum(len(c.passes) for c in calls())
    assert all(r.status == "skip" and r.metrics["roofline"]["h100_us"] > 0 for r in rows)
    assert {r.name.rsplit(" ", 1)[-1] for r in rows} == {FWD, "fwd+bwd"}


TINY = {"dar_route": dar._case(3, 2, 5, 40), "dar_gather": timed_ops._gather_case(3, 2, 2, 5, 40),
        "grpo_iso_loss_y": grpo._case(2, (37,)), "ntrk_tilted_step": ntrk._case(2, (4, 8, 8), tile=16),
        "sink_attention": timed_ops._sink_case(1, 2, 24, 9, 16),
        "sink_attention_given": timed_ops._sink_case(1, 2, 24, 9, 16)}


def test_the_gpu_timing_path_builds_its_rows_with_a_stand_in_timer(monkeypatch):
    """_time_call's GPU code (inputs, every candidate, both passes, rates and bars) on tiny CPU cases in the
    interpreter, each candidate called once by a timer that reports 1 ms."""
    monkeypatch.setattr(timing, "bench_ms", lambda fn, small: (fn(), (1.0, "stand-in"))[1])
    ctx = types.SimpleNamespace(device=torch.device("cpu"), time_left=lambda: 0.0, peaks={"copy_gbps": 1.0})
    for call in calls():
        if call.workload.name in TINY and call.case == call.workload.full_cases[0]:
            tiny = types.SimpleNamespace(workload=call.workload, case=TINY[call.workload.name], passes=call.passes,
                                         memory_bound=call.memory_bound, name=call.name, backends=lambda: ("triton",))
            rows = timing._time_call(ctx, tiny, "default")
            info = [r for r in rows if r.status == "info"]
            assert len(info) == len(call.passes), [r.name for r in rows]
            expected = {"eager"} | ({"sdpa_flash"} if call.workload in (SINKS, SINKS_GIVEN) else set())
            assert all(set(r.metrics["ms"]) == {"diffkern[triton]"} | expected for r in info)
            assert all(r.metrics["compile_mode"] == "skipped (time)" for r in info)
            assert all(r.status in ("met", "not met", "skip") for r in rows if r.status != "info")


def test_timing_reports_the_autotune_choices(monkeypatch):
    """After its timings the section lists every launch configuration diffkern._autotune chose, one info row each
    with the candidates' times, json-serialisable for gpu_check.json."""
    from diffkern import _autotune
    small, large = _autotune.Config({"BLOCK": 1024}, 4), _autotune.Config({"BLOCK": 2048}, 4)
    monkeypatch.setattr(_autotune, "_choices", {})
    assert [(r.name, r.status) for r in timing.autotune_rows()] == [("autotune", "info")]
    entry = {"config": large, "ms": {small: 0.02, large: 0.01}, "source": "timed", "dropped": {}, "device": "H100",
             "capability": (9, 0)}
    monkeypatch.setattr(_autotune, "_choices", {("ntrk_step_kernel", ("bfloat16", True, 4096), 0): entry})
    [row] = timing.autotune_rows()
    assert row.status == "info" and row.name == "autotune ntrk_step_kernel ('bfloat16', True, 4096)"
    assert row.detail.startswith(f"ntrk_step_kernel ('bfloat16', True, 4096) on H100: {large.describe()} (timed; ")
    assert row.metrics["ms"] == {small.describe(): 0.02, large.describe(): 0.01}
    json.dumps(row.metrics)
