"""Issue 19's report section (diffkern.bench.cpu_gap) and the machine limits it judges by (diffkern.bench.machine):
the verdict and the limit fraction on constructed numbers, the yardsticks' byte and FLOP accounting, and a sanity
check of the measurements (positive, finite: no timing thresholds). The section's run itself is in the harness's
quick run (tests/test_bench.py)."""
import gc
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffkern.bench import cpu_gap, machine, rmdm, roofline
from diffkern.bench.mode import MODES
from diffkern.bench.workload import FWD, STEP, grad_leaves, requiring_grad

EAGER3, COMPILE1 = cpu_gap.eager_bar(3.0), cpu_gap.compile_bar(1.0)


@pytest.mark.parametrize("eager, compiled, fraction, kind, want", [
    (3.5, 1.2, None, None, "met"),                              # no limit applies: the ratios alone
    (3.0, 1.0, 0.1, "bandwidth", "met"),                        # bars are inclusive; a low fraction does not matter
    (2.0, 1.2, None, None, "not met"),                          # no limit to fall back on
    (2.0, 1.2, 0.85, "bandwidth", "at machine limit (85% of bandwidth)"),
    (3.5, 0.9, 0.8, "GEMM", "at machine limit (80% of GEMM)"),
    (3.5, 0.9, 0.79, "GEMM", "not met"),
])
def test_verdict_on_constructed_numbers(eager, compiled, fraction, kind, want):
    values = {"eager_over_diffkern": eager, "compile_over_diffkern": compiled}
    assert cpu_gap.verdict(values, (EAGER3, COMPILE1), fraction, kind) == want


def _cpu_row(p, **ms):
    return {"pass": p, "eager_ms": ms["eager"], "compile_ms": ms["compile"], "diffkern_ms": ms["diffkern"],
            "eager_over_diffkern": ms["eager"] / ms["diffkern"],
            "compile_over_diffkern": ms["compile"] / ms["diffkern"],
            "compile_first_call_s": 1.0, "timings": {}, **{f"{k}_ms": v for k, v in ms.items()}}


def _row(title):
    return next(r for r in cpu_gap.ROWS if r.title == title)


def test_bandwidth_fraction_is_minimal_bytes_over_the_fastest_yardstick():
    row = _row("NTRK tilted step (2OS project + step)")
    case = row.workload.full_cases[0]
    n = case.params["B"] * case.params["N"] * 4
    works = {"copy": 100.0, "triad": 150.0, "read": 100.0, "copy_fresh": 100.0, "triad_fresh": 150.0}
    # triad_fresh: 150 B / 2 ms is the fastest yardstick writing into new outputs, as the step does (its projection
    # returns a new tensor); the step moves fwd 4n + bwd 2n (dmu is dx itself)
    ms = dict(copy=1.0, triad=1.0, read=2.0, copy_fresh=4.0, triad_fresh=2.0)
    r = _cpu_row(STEP, eager=10.0, compile=3.0, diffkern=6 * n / 75.0 / 0.9, **ms)
    line = cpu_gap.judge(row, case, r, works)
    assert line["limit"] == "bandwidth" and line["limit_yardstick"] == "triad_fresh"
    assert line["fraction"] == pytest.approx(0.9) and line["strict_fraction"] == pytest.approx(0.45)
    assert line["verdict"] == "at machine limit (90% of bandwidth)"


def test_the_fused_step_is_held_to_its_own_passes_into_preallocated_outputs():
    """ntrk_step's outputs and its fused backward's come from the CPU output cache, so they fault in no pages: the
    pass yardstick (read 3 latents and write 1, then read 1 and write 2; outputs allocated once) judges the forward,
    and the same passes run as an empty autograd Function of the op's arity judge the training step, moving the
    step's minimal bytes; the bare passes and the STREAM kernels are timed beside them."""
    row = _row("NTRK fused step")
    case = row.workload.full_cases[0]
    n = case.params["B"] * case.params["N"] * 4
    for p, latents, held_to in ((FWD, 4, machine.PASS_KERNELS), (STEP, 7, cpu_gap.PASS_FLOOR_KERNELS)):
        assert row.limit.matching(p) == held_to
        sticks = row.limit.yardsticks(case, p)
        assert {k: w for k, (_, w) in sticks.items() if k in held_to} == \
            {k: latents * n for k in held_to} == {k: row.limit.work(case, p) for k in held_to}
        assert set(machine.STREAM_KERNELS) | set(machine.PASS_KERNELS) <= set(sticks)
    assert not set(cpu_gap.PASS_FLOOR_KERNELS) & set(row.limit.yardsticks(case, FWD))


def test_a_floor_yardstick_runs_its_sweeps_as_an_empty_autograd_step():
    """passes+autograd: the pass yardstick's sweeps in an empty autograd Function (diffkern.bench.autograd_floor),
    whose gradients are the incoming gradient itself for mu, w and eps."""
    row = _row("NTRK fused step")
    case = row.workload.quick_cases[0]
    sticks = row.limit.yardsticks(case, STEP)
    for k in machine.PASS_KERNELS:
        grads = sticks[k + cpu_gap.FLOOR][0]()
        assert len(grads) == 3 and grads[0] is grads[1] is grads[2]
        assert grads[0].shape == (case.params["B"], case.params["N"])


@pytest.mark.parametrize("offset", (0, 1, 3))
@pytest.mark.parametrize("reads, writes", ((1, 1), (3, 1), (1, 2), (4, 3)))
def test_stream_pass_writes_the_sum_of_its_reads_with_either_store(reads, writes, offset):
    """Every output = the sum of the inputs, bit for bit the torch sum in the same order, with plain and streaming
    stores, on outputs whose start is not 16-byte aligned (offset elements into their storage: the streaming path's
    plain head) and sizes that leave a tail past the last block of 4."""
    n = 16384 * 2 + 7
    gen = torch.Generator().manual_seed(reads * 10 + writes)
    ins = [torch.randn(n, generator=gen) for _ in range(reads)]
    want = ins[0].clone()
    for x in ins[1:]:
        want += x
    for nontemporal in (False, True):
        for alike in (True, False):  # outputs aligned alike (streamed after a plain head), or not (all plain)
            shifts = [offset + (0 if alike else j) for j in range(writes)]
            outs = [torch.full((n + k,), float("nan"))[k:] for k in shifts]
            torch.ops.diffkern.stream_pass(ins, outs, nontemporal)
            assert all(torch.equal(o, want) for o in outs)


def test_the_pass_yardsticks_count_every_array_once_and_run():
    """pass_bytes counts each array of each pass once; the yardsticks and torch's version of the same passes run and
    give positive, finite rates (no timing thresholds)."""
    passes = ((3, 1), (1, 2))
    assert machine.pass_bytes(passes, 100) == 4 * 100 * 7
    calls = {**machine.pass_calls(passes, 100), "torch": machine.torch_pass_call(passes, 100)}
    assert set(calls) == {*machine.PASS_KERNELS, "torch"}
    rates = machine.pass_rates(passes, 100, threads=1, warmup=1, rounds=2, min_sample_s=0.001)
    assert set(rates) == set(calls) and all(v > 0 and math.isfinite(v) for v in rates.values())


def test_bad_passes_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="numel"):
        machine.pass_calls(((1, 1),), 0)
    with pytest.raises(ValueError, match="passes"):
        machine.pass_calls(((5, 1),), 10)
    x, y = torch.zeros(4), torch.zeros(4)
    with pytest.raises(ValueError, match=r"stream_pass: writes\[0\] must be a contiguous float32"):
        torch.ops.diffkern.stream_pass([x], [y.double()], False)
    with pytest.raises(ValueError, match=r"stream_pass: reads\[1\] must be .* of 4 elements"):
        torch.ops.diffkern.stream_pass([x, torch.zeros(5)], [y], False)
    with pytest.raises(ValueError, match="stream_pass: reads must hold 1 to 4"):
        torch.ops.diffkern.stream_pass([x] * 5, [y], False)
    with pytest.raises(ValueError, match="stream_pass: writes must hold 1 to 3"):
        torch.ops.diffkern.stream_pass([x], [], False)


def test_a_pass_without_new_latent_outputs_is_held_to_preallocated_bandwidth():
    """The GRPO loss's forward returns per-sample statistics only: the preallocated yardsticks judge it."""
    row = _row("GRPO loss (stored y)")
    case = row.workload.full_cases[0]
    works = {"copy": 100.0, "triad": 150.0, "read": 100.0, "copy_fresh": 100.0, "triad_fresh": 150.0}
    r = _cpu_row(FWD, eager=10.0, compile=3.0, diffkern=3.5, copy=1.0, triad=1.0, read=2.0, copy_fresh=4.0,
                 triad_fresh=2.0)
    line = cpu_gap.judge(row, case, r, works)
    assert line["limit_yardstick"] == "triad" and line["fraction"] == line["strict_fraction"]


def test_gemm_fraction_is_the_ops_flops_over_the_librarys_rate():
    row = _row("R-MDM training step")
    case = row.workload.full_cases[0]
    block = sum(g.flops for p in (FWD, "bwd") for g in rmdm.block_gemms(case)[p])
    # the library does one block evaluation's products (fwd and bwd) in 1 ms: the step's K L = 8 of them in 8 ms
    for diffkern_ms, verdict in ((40.0, "not met"), (9.0, "at machine limit (89% of GEMM)")):
        r = _cpu_row(STEP, eager=10.0, compile=10.0, diffkern=diffkern_ms, gemm=1.0)
        line = cpu_gap.judge(row, case, r, {"gemm": block})
        assert line["fraction"] == pytest.approx(8.0 / diffkern_ms)
        assert line["bars"] == [">= 1.5x eager"] and line["verdict"] == verdict


def test_a_row_without_a_limit_is_met_or_not_met():
    row = _row("DAR whole stack")
    case = row.workload.full_cases[1]
    slow = cpu_gap.judge(row, case, _cpu_row(FWD, eager=9.0, compile=3.0, diffkern=3.5), None)
    fast = cpu_gap.judge(row, case, _cpu_row(FWD, eager=9.0, compile=3.0, diffkern=2.9), None)
    assert (slow["limit"], slow["fraction"], slow["verdict"]) == (None, None, "not met")
    assert fast["verdict"] == "met"


def test_recurse_flops_are_every_matrix_product_of_the_eager_block_and_its_backward():
    """Against torch's FLOP counter on the eager block with math attention (whose products are bmm's it counts)."""
    case = rmdm.RECURSE.quick_cases[0]
    args = requiring_grad(rmdm._make_args(case, torch.float64, "cpu"))
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd:
            out = rmdm.eager_recurse(*args)
        with FlopCounterMode(display=False) as bwd:
            torch.autograd.grad(out, grad_leaves(args), torch.ones_like(out))
    assert rmdm.RECURSE.flops(case) == {FWD: fwd.get_total_flops(), "bwd": bwd.get_total_flops()}
    assert rmdm.RECURSE.flops(case)[FWD] == roofline.recurse_flops(case.params)[FWD]


def test_every_row_has_a_case_in_every_run_and_the_default_run_names_the_rest():
    for row in cpu_gap.ROWS:
        assert row.cases(MODES["quick"]) == row.workload.quick_cases
        assert row.cases(MODES["full"]) == row.workload.full_cases
        default = row.cases(MODES["default"])
        assert default and all(c in row.workload.full_cases for c in default)
    md = cpu_gap.markdown([], {2: 1.0, 1: 1.0}, MODES["default"])
    assert "full L=56 B=1 T=8 d=1152" in md and "B=64 T=81" in md and md.startswith(f"## {cpu_gap.TITLE}")


def test_stream_yardsticks_move_the_bytes_they_count():
    nbytes = 3000
    moved = machine.stream_bytes(nbytes)
    calls = machine.stream_calls(nbytes)
    outs = {k: fn() for k, fn in calls.items()}
    assert moved["copy"] == 2 * 4 * outs["copy"].numel() and moved["triad"] == 3 * 4 * outs["triad"].numel()
    assert moved["copy_fresh"] == 2 * 4 * outs["copy_fresh"].numel()
    assert moved["triad_fresh"] == 3 * 4 * outs["triad_fresh"].numel()
    assert torch.equal(outs["copy_fresh"], outs["copy"]) and torch.equal(outs["triad_fresh"], outs["triad"])
    again = {k: calls[k]() for k in machine.FRESH_KERNELS}
    assert all(again[k].data_ptr() != outs[k].data_ptr() for k in machine.FRESH_KERNELS)  # a new output per call
    assert moved["read"] == 4 * 750 and outs["read"].numel() == 1
    assert all(0 < moved[k] <= nbytes for k in (*machine.STREAM_KERNELS, *machine.FRESH_KERNELS))


def test_backward_products_of_a_gemm_are_its_two_gradients():
    g = machine.Gemm(3, 5, 7, 11)
    assert g.flops == 2 * 3 * 5 * 7 * 11
    assert [(b.m, b.n, b.k) for b in g.backward()] == [(5, 11, 7), (11, 7, 5)]
    assert all(b.flops == g.flops for b in g.backward())


def test_measured_limits_are_positive_and_finite():
    rates = machine.bandwidth(1 << 16, threads=1, warmup=1, rounds=2, min_sample_s=0.001)
    assert set(rates) == {*machine.STREAM_KERNELS, *machine.FRESH_KERNELS, "best", "best_fresh"}
    assert rates["best"] == max(rates[k] for k in machine.STREAM_KERNELS)
    assert rates["best_fresh"] == max(rates[k] for k in machine.FRESH_KERNELS)
    flops = machine.gemm_throughput([machine.Gemm(1, 16, 8, 4), machine.Gemm(2, 8, 8, 8)], threads=1, warmup=1,
                                    rounds=2, min_sample_s=0.001)
    assert all(v > 0 and math.isfinite(v) for v in [*rates.values(), flops])


def test_bad_sizes_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="nbytes"):
        machine.stream_calls(0)
    with pytest.raises(ValueError, match="gemms"):
        machine.gemm_call([])


def test_the_timer_leaves_the_garbage_collector_as_it_found_it():
    """The rounds run with every older object frozen (a collection after a large torch.compile takes most of a
    second); after them nothing stays frozen and collection is on."""
    from diffkern.bench.timer import time_interleaved
    seen = []
    time_interleaved({"probe": lambda: seen.append(gc.get_freeze_count())}, 1, 2, 0.0)
    assert seen[0] == 0 and all(n > 0 for n in seen[1:])  # the warmup call runs before the freeze
    assert gc.get_freeze_count() == 0 and gc.isenabled()


def test_rows_are_selected_by_title_and_an_unknown_title_is_refused():
    assert cpu_gap.select(None) == cpu_gap.ROWS
    assert [r.title for r in cpu_gap.select(["ntrk fused", "DAR whole"])] == ["DAR whole stack", "NTRK fused step"]
    with pytest.raises(ValueError, match="rows: no row title contains"):
        cpu_gap.select(["no such row"])


def test_stream_pass_under_fullgraph_compile_and_refusing_nothing_to_autograd():
    """The yardstick op traces whole (its fake: outputs written in place, nothing returned) and writes the same
    sums compiled as eager; it is registered non-differentiable, so inputs that require grad run it unrecorded."""
    gen = torch.Generator().manual_seed(3)
    ins = [torch.randn(1001, generator=gen) for _ in range(3)]
    want = ins[0] + ins[1] + ins[2]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def run(a, b, c, out):
        torch.ops.diffkern.stream_pass([a, b, c], [out], False)
        return out * 1.0

    got = run(*ins, torch.zeros(1001))
    assert torch.equal(got, want)
    out = torch.zeros(1001)
    torch.ops.diffkern.stream_pass([ins[0].requires_grad_(), ins[1], ins[2]], [out], True)
    assert torch.equal(out, want) and out.grad_fn is None
