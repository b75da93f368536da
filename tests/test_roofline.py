"""bench/roofline.py: the byte and FLOP formulas on hand-derivable cases, the matmul FLOPs against
torch.utils.flop_counter, and the minimal bytes against the interpreter's counts of the Triton kernels;
bench/kernel_roofline.py: the per-kernel table's arithmetic."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import diffkern
from diffkern.bench import counts, dar, grpo, interpreted, kernel_roofline, ntrk, rmdm
from diffkern.bench.roofline import H100_BF16_FLOPS, H100_DOT_FLOPS, H100_HBM_BYTES_PER_S, Roofline, roofline
from diffkern.bench.workload import BWD, FWD, STEP
from diffkern.gpu_check import timed_ops
from diffkern.testing.triton_monitor import TritonMonitor

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests (CPU tensors)")


def test_ntrk_step_by_hand():
    """B=2, N=3, bf16: reads mu, w, eps and writes x (4 x 6 x 2 bytes), 4 FLOPs an element; bwd reads dx
    and writes dw and deps (dmu is dx itself), 2 FLOPs an element."""
    r = roofline(ntrk.STEP_WORKLOAD, ntrk._case(2, (3,)), 2)
    assert (r[FWD].flops, r[FWD].bytes) == (24, 48)
    assert (r[BWD].flops, r[BWD].bytes) == (12, 36)
    assert (r[STEP].flops, r[STEP].bytes) == (36, 84)
    assert r[FWD].h100_s() == 48 / H100_HBM_BYTES_PER_S and r[FWD].bound() == "memory"


def test_dar_route_by_hand():
    """n=2 sources of B=1, T=1, d=4 in fp32: fwd reads 2 sources + q [1, 4] + gain [4] and writes h."""
    r = roofline(dar.ROUTE, dar._case(2, 1, 1, 4), 4)
    assert r[FWD].bytes == 4 * (2 * 4 + 4 + 4 + 4) and r[FWD].flops == 6 * 2 * 4
    assert r[BWD].flops == 14 * 2 * 4


def test_dar_gather_by_hand():
    """n=2 sources and a=3 addends of B=1, T=1, d=4 in fp32: routing over 3 (the sources and c) plus the 2
    additions forming c; fwd reads 5 stream tensors + q + gain and writes h and c."""
    r = roofline(timed_ops.GATHER, timed_ops._gather_case(2, 3, 1, 1, 4), 4)
    assert r[FWD].flops == 6 * 3 * 4 + 2 * 4 and r[BWD].flops == 14 * 3 * 4
    assert r[FWD].bytes == 4 * (5 * 4 + 4 + 4 + 2 * 4) and r[BWD].bytes == 4 * (4 + 5 * 4 + 4 + 4)


def test_a_compute_bound_call_is_timed_by_its_flops():
    r = Roofline(flops=2 * H100_BF16_FLOPS, bytes=1.0)
    assert r.h100_s() == 2.0 and r.bound() == "compute"
    assert r.achieved(4.0) == {"gbps": 0.25e-9, "tflops": H100_BF16_FLOPS / 2e12}


def test_recurse_flops_equal_the_flop_counter_on_the_eager_block():
    """The products of K blocks x L iterations: F.linear's addmm and SDPA's (its math form, whose bmm the
    counter sees on the CPU), as torch counts them."""
    case = rmdm._case(2, 9, 32)
    x, weights = rmdm._make_args(case, torch.float32, "cpu")
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        rmdm.eager_recurse(x, weights)
    assert roofline(rmdm.RECURSE, case, 4)[FWD].flops == counter.get_total_flops()


def test_sink_attention_flops_equal_one_attention():
    case = timed_ops._sink_case(B=1, H=2, n_query=24, n_text=9, d=16)
    q, k, v, _ = timed_ops._sink_args(case, torch.float32, "cpu")
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, k, v)
    assert roofline(timed_ops.SINKS, case, 4)[FWD].flops == counter.get_total_flops()


def test_sink_mass_flops_equal_the_references_scores():
    case = timed_ops._sink_case(B=1, H=2, n_query=24, n_text=9, d=16)
    q, k, v, n = timed_ops._sink_args(case, torch.float32, "cpu")
    with FlopCounterMode(display=False) as counter:
        timed_ops.MASS.reference(q, k, v, n)
    assert roofline(timed_ops.MASS, case, 4)[FWD].flops == counter.get_total_flops()


def test_ntrk_step_kernel_moves_the_minimum_plus_its_per_sample_scalars():
    """The fused step's counted bytes are the roofline's plus sigma and rho ([B] float32 each)."""
    B, case = 2, ntrk._case(2, (5, 13))
    counts = interpreted.count_case(ntrk.STEP_WORKLOAD, case, torch.bfloat16, cuda=False)["counts"][FWD]
    kernel = counts["triton.bytes_loaded"] + counts["triton.bytes_stored"]
    assert kernel == roofline(ntrk.STEP_WORKLOAD, case, 2)[FWD].bytes + 2 * B * 4


BOUNDED = ((dar.ROUTE, dar._case(3, 2, 5, 37)), (grpo.WORKLOADS[0], grpo._case(2, (3, 37))),
           (grpo.WORKLOADS[1], grpo._case(2, (3, 37))))


@pytest.mark.parametrize("workload,case", BOUNDED, ids=lambda x: getattr(x, "name", ""))
def test_the_minimum_bounds_what_the_kernels_move(workload, case):
    counted = interpreted.count_case(workload, case, torch.bfloat16, cuda=False)["counts"]
    r = roofline(workload, case, 2)
    for p in (FWD, BWD):
        assert r[p].bytes <= counted[p]["triton.bytes_loaded"] + counted[p]["triton.bytes_stored"] + \
            counted[p]["glue.bytes_read"] + counted[p]["glue.bytes_written"]


def test_flow_sde_step_minimum_bounds_its_kernels():
    case = grpo._case(3, (37,))
    args = timed_ops.SDE_STEP.make_args(case, torch.bfloat16, "cpu")
    with diffkern.backend("triton"), TritonMonitor() as mon:
        timed_ops.SDE_STEP.diffkern(*args)
    assert roofline(timed_ops.SDE_STEP, case, 2)[FWD].bytes <= mon.bytes_loaded + mon.bytes_stored


def test_every_timed_call_has_a_roofline():
    for call in timed_ops.calls():
        r = roofline(call.workload, call.case, 2)
        assert all(r[p].bytes > 0 and r[p].h100_s() > 0 for p in call.passes), call.name


def test_kernel_table_times_each_kernel_at_its_dot_precision_and_adds_them_up():
    """Hand-made counts of one bf16 pass: a compute-bound kernel (bf16 peak), a memory-bound one without dots,
    and aten glue; the total adds the three times and stands beside the op minimum."""
    fwd = counts.flat({"mm_kernel": counts.kernel(8, 3_000_000, 1_000_000, launches=2, flops=990_000_000_000),
                       "copy_kernel": counts.kernel(4, 6_700_000, 3_350_000)},
                      counts.glue([("sum", 335_000, 0), ("mul", 0, 0)]))
    rows = kernel_roofline.pass_rows(fwd, torch.bfloat16)
    assert [(r["kernel"], r["launches"], r["bytes"], r["flops"], r["precision"], r["bound"]) for r in rows] == [
        ("copy_kernel", 1, 10_050_000, 0, "-", "memory"),
        ("mm_kernel", 2, 4_000_000, 990_000_000_000, "bf16", "compute"),
        (kernel_roofline.GLUE, 2, 335_000, None, "-", "memory")]
    assert [r["h100_us"] for r in rows] == pytest.approx([3.0, 1000, 0.1])
    minimum = Roofline(flops=0, bytes=3.35e6)
    total = kernel_roofline.total(rows, minimum)
    assert (total["launches"], total["bytes"], total["flops"]) == (5, 14_385_000, 990_000_000_000)
    assert total["h100_us"] == pytest.approx(3.0 + 1000 + 0.1)
    assert (total["min_h100_us"], total["min_bound"]) == (pytest.approx(1.0), "memory")
    assert total["over_min"] == pytest.approx(total["h100_us"])


def test_fp32_dots_run_at_the_precision_torch_asks_for_on_a_gpu():
    """An fp32 case's products: tf32x3 under torch's default matmul precision, tf32 once it is "high"."""
    fwd = counts.flat({"mm_kernel": counts.kernel(1, 0, 0, flops=165_000_000)}, counts.glue([]))
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        (row,) = kernel_roofline.pass_rows(fwd, torch.float32)
        assert (row["precision"], row["h100_us"]) == ("tf32x3", pytest.approx(1.0))
        torch.set_float32_matmul_precision("high")
        (row,) = kernel_roofline.pass_rows(fwd, torch.float32)
        assert (row["precision"], row["h100_us"]) == ("tf32", pytest.approx(1e6 * 165e6 / H100_DOT_FLOPS["tf32"]))
    finally:
        torch.set_float32_matmul_precision(before)


def test_kernel_table_of_a_counted_case_and_of_a_case_without_counts():
    """A DAR case counted in the interpreter: a row per kernel and a total per pass (fwd+bwd: fwd's and bwd's
    added), its bytes the traffic table's; a case without counts is one row saying why."""
    case = dar._case(3, 2, 5, 37)
    entry = interpreted.count_case(dar.ROUTE, case, torch.bfloat16, cuda=False)
    workload = dataclasses.replace(dar.ROUTE, quick_cases=(case, dar._case(2, 1, 3, 8)))
    rows = kernel_roofline.rows(workload, True, [entry], torch.bfloat16)
    by = {(r["case"], r["pass"], r.get("kernel")): r for r in rows}
    assert by[(case.name, FWD, "route_fwd_kernel")]["flops"] == 0
    for p in (FWD, BWD):
        c = entry["counts"][p]
        total = by[(case.name, p, kernel_roofline.TOTAL)]
        assert total["bytes"] == sum(c[k] for k in ("triton.bytes_loaded", "triton.bytes_stored", "glue.bytes_read",
                                                    "glue.bytes_written"))
        assert total["launches"] == c["triton.launches"] + c["glue.kernels"]
        assert total["min_h100_us"] == pytest.approx(roofline(dar.ROUTE, case, 2)[p].h100_s() * 1e6)
        assert total["over_min"] >= 1
    step = by[(case.name, STEP, kernel_roofline.TOTAL)]
    totals = [by[(case.name, p, kernel_roofline.TOTAL)]["h100_us"] for p in (FWD, BWD)]
    assert step["h100_us"] == pytest.approx(sum(totals))
    assert all(r["source"] == "counted" for r in rows if r["case"] == case.name)
    (missing,) = [r for r in rows if r["case"] != case.name]
    assert missing == {"case": dar._case(2, 1, 3, 8).name, "pass": STEP, "error": "not counted"}
