"""bench/roofline.py: the byte and FLOP formulas on hand-derivable cases, the matmul FLOPs against
torch.utils.flop_counter, and the minimal bytes against the interpreter's counts of the Triton kernels."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import diffkern
from diffkern.bench import dar, grpo, interpreted, ntrk, rmdm
from diffkern.bench.roofline import H100_BF16_FLOPS, H100_HBM_BYTES_PER_S, Roofline, roofline
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
