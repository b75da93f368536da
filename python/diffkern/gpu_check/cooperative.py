"""Section 3: R-MDM's persistent kernel, whose programs meet at grid barriers (diffkern._cooperative).

On a GPU, at the Sudoku shape (B=1, T=81, d=256, K=2 blocks, L=4 iterations, 8 heads) and the program
counts the op picks on an H100, 64 (bf16, 32 per block) and 128 (fp32, 64 per block): LAUNCHES
back-to-back launches, every output bit-identical to the first (the kernel adds its partial sums in
program order), the first and the tiled kernel's each within the error model's tolerance of the
float64 oracle (so they differ by at most two tolerances), and the barrier counter back to [0, 0] after.
Then the fallback (diffkern._cooperative.LaunchRefused; a skip row where this build has none): a grid
that cannot be co-resident (more programs than the SMs hold threads for) is refused, by the occupancy
estimate and, with the estimate out of the way, by the driver, leaving the counter at [0, 0]; and the op,
on a device that keeps no program resident, returns the tiled kernel's states.
The dry run: the same checks in the interpreter (programs as threads) at 4 programs and 3 launches.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from .. import _cooperative
from ..bench import rmdm
from ..rmdm import reference, triton_kernels, triton_persistent
from ..testing.numerics import max_error, oracle_with_spread, tolerance
from .context import Row
from .correctness import _last_line

SECTION = "cooperative"
LAUNCHES = 1000
# (B, T, d, f, heads, K, n_iter), dtype, programs per block
GPU_CASES = (((1, 81, 256, 1024, 8, 2, 4), torch.bfloat16, 32), ((1, 81, 256, 1024, 8, 2, 4), torch.float32, 64))
DRY_CASES = (((2, 5, 6, 10, 2, 2, 3), torch.float32, 2),)
DRY_LAUNCHES = 3
# Seconds a check needs at most (a first compile of the kernels included); fewer left: a skip row.
RESERVE_S = 60.0
EPS = rmdm.EPS


def make(shape, dtype, device, seed=0):
    """x [B, T, d] and the K blocks' weights (flat), drawn in float64 on the CPU, then cast and moved."""
    B, T, d, f, heads, K, n_iter = shape
    g = torch.Generator().manual_seed(seed)
    weights = [((1.0 if name in ("ln1_w", "ln2_w") else 0.0) + 0.25 * torch.randn(s, generator=g, dtype=torch.float64))
               .to(device, dtype)
               for _ in range(K) for name, s in zip(reference.BLOCK_PARAMS, reference.param_shapes(d, f))]
    return torch.randn(B, T, d, generator=g, dtype=torch.float64).to(device, dtype), weights


def oracle_tolerance(shape, x, weights) -> tuple[torch.Tensor, float]:
    """The float64 states and the error model's tolerance for a kernel in x's dtype (the n of
    tests/test_rmdm_recurse.py: one block's chain of reductions, 5 d + T + f)."""
    B, T, d, f, heads, K, n_iter = shape

    def fn(x, *w):
        return reference.recurse(x, list(w), None, n_iter, heads, EPS)
    (oracle,), (spread,) = oracle_with_spread(fn, [x, *weights], 5 * d + T + f, x.dtype)
    plain = reference.recurse(x, weights, None, n_iter, heads, EPS)
    return oracle, tolerance(x.dtype, oracle, plain, spread)


def barrier_check(shape, dtype, pb: int, launches: int, device: torch.device) -> Row:
    """`launches` persistent launches on K * pb programs against the first one, the tiled kernel and the oracle."""
    B, T, d, f, heads, K, n_iter = shape
    x, weights = make(shape, dtype, device)
    oracle, tol = oracle_tolerance(shape, x, weights)
    tiled = triton_kernels.recurse_tiled(x, weights, None, n_iter, heads, EPS)
    sync = _cooperative.sync_buffer(device)
    first = triton_persistent.recurse_persistent(x, weights, None, n_iter, heads, EPS, pb)
    drift = torch.zeros((), dtype=torch.float32, device=device)
    for _ in range(launches - 1):
        out = triton_persistent.recurse_persistent(x, weights, None, n_iter, heads, EPS, pb)
        drift = torch.maximum(drift, (out.float() - first.float()).abs().max())
    metrics = {"programs": K * pb, "launches": launches, "drift": drift.item(), "counter": sync.tolist(),
               "persistent_err": max_error(first, oracle), "tiled_err": max_error(tiled, oracle),
               "persistent_vs_tiled": max_error(first, tiled), "tolerance": tol}
    problems = []
    if metrics["drift"] != 0.0:
        problems.append(f"launches differ from the first by up to {metrics['drift']:.3g}")
    if metrics["counter"] != [0, 0]:
        problems.append(f"barrier counter {metrics['counter']} after the launches, not [0, 0]")
    for what in ("persistent_err", "tiled_err"):
        if not metrics[what] <= tol:
            problems.append(f"{what} {metrics[what]:.3g} > tolerance {tol:.3g}")
    name = f"recurse persistent {K * pb} programs {str(dtype).removeprefix('torch.')} x{launches}"
    detail = "; ".join(problems) or (f"bit-identical over {launches} launches, counter [0, 0], vs tiled "
                                     f"{metrics['persistent_vs_tiled']:.3g} (2 x tol {2 * tol:.3g})")
    return Row(SECTION, name, "fail" if problems else "pass", detail, metrics)


def oversized_programs_per_block(device: torch.device, d: int) -> tuple[int, int]:
    """(K, pb): blocks and programs per block whose grid K * pb exceeds what the device's SMs can hold by
    threads alone (8-warp programs), so no cooperative launch can make it co-resident."""
    props = torch.cuda.get_device_properties(device)
    per_sm = props.max_threads_per_multi_processor // (32 * triton_persistent.config(d, 4 * d, 32, d)["num_warps"])
    return props.multi_processor_count * per_sm // d + 1, d


@contextlib.contextmanager
def _co_resident(programs):
    """diffkern._cooperative's occupancy estimate replaced by `programs` (a driver or MPS that holds fewer,
    or an estimate that lets the driver judge)."""
    real = _cooperative.co_resident_programs
    _cooperative.co_resident_programs = lambda compiled, props: programs
    try:
        yield
    finally:
        _cooperative.co_resident_programs = real


def refusal_check(device: torch.device, how: str) -> Row:
    """An oversized grid is refused with LaunchRefused, nothing runs, and the counter stays [0, 0]; by the
    occupancy estimate ("estimate"), or with the estimate out of the way by the driver itself ("driver":
    the check that Triton's error text on this stack is the one _cooperative recognises)."""
    d, heads = 256, 8
    K, pb = oversized_programs_per_block(device, d)
    shape = (1, 9, d, 4 * d, heads, K, 1)
    x, weights = make(shape, torch.float32, device)
    name = f"recurse persistent at {K * pb} programs refused ({how})"
    try:
        with _co_resident(1 << 30) if how == "driver" else contextlib.nullcontext():
            triton_persistent.recurse_persistent(x, weights, None, 1, heads, EPS, pb)
        torch.cuda.synchronize(device)
    except _cooperative.LaunchRefused as refused:
        counter = _cooperative.sync_buffer(device).tolist()
        return Row(SECTION, name, "pass" if counter == [0, 0] else "fail",
                   f"{_last_line(refused)}; barrier counter {counter}", {"programs": K * pb, "counter": counter})
    except Exception as error:  # noqa: BLE001 - a refusal _cooperative does not recognise
        return Row(SECTION, name, "fail", f"not a LaunchRefused: {_last_line(error)}", {"programs": K * pb})
    return Row(SECTION, name, "fail", "the launch ran: a grid beyond the SMs' threads cannot be co-resident")


def op_fallback_check(device: torch.device) -> Row:
    """The op at the Sudoku shape on a device that holds no program of the persistent kernel (as under
    MPS or a green context): the tiled kernel's states, bit for bit, with the counter [0, 0]."""
    shape, dtype, pb = GPU_CASES[0]
    B, T, d, f, heads, K, n_iter = shape
    x, weights = make(shape, dtype, device)
    tiled = triton_kernels.recurse_tiled(x, weights, None, n_iter, heads, EPS)
    with _co_resident(0), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = triton_kernels.recurse_fwd(x, weights, None, n_iter, heads, EPS)
    counter = _cooperative.sync_buffer(device).tolist()
    equal = torch.equal(out, tiled)
    warned = any("refused" in str(w.message) for w in caught)
    return Row(SECTION, "recurse falls back to the tiled kernel when refused", "pass" if equal and counter == [0, 0]
               else "fail", f"tiled result: {equal}, barrier counter {counter}, warned: {warned}",
               {"counter": counter, "warned": warned})


def fallback_rows(device: torch.device) -> list[Row]:
    if not hasattr(_cooperative, "LaunchRefused"):
        return [Row(SECTION, "recurse persistent fallback (not co-resident)", "skip",
                    "no cooperative fallback in this build (diffkern._cooperative.LaunchRefused)")]
    return [refusal_check(device, "estimate"), refusal_check(device, "driver"), op_fallback_check(device)]


def run(ctx) -> list[Row]:
    if ctx.dry_run or ctx.device.type != "cuda":
        return [barrier_check(shape, dtype, pb, DRY_LAUNCHES, ctx.device) for shape, dtype, pb in DRY_CASES] + [
            Row(SECTION, "recurse persistent fallback (not co-resident)", "skip",
                "needs a GPU: the interpreter runs any grid co-resident")]
    rows = []
    refused = getattr(_cooperative, "LaunchRefused", None) or ()
    for shape, dtype, pb in GPU_CASES:
        if ctx.time_left() < RESERVE_S:
            rows.append(Row(SECTION, f"recurse persistent {shape[5] * pb} programs", "skip", "out of time"))
            continue
        ctx.log(f"cooperative: {shape[5] * pb} programs, {LAUNCHES} launches")
        try:
            rows.append(barrier_check(shape, dtype, pb, LAUNCHES, ctx.device))
        except refused as error:  # a smaller GPU (an A100 has 108 SMs) cannot hold 128 of these programs
            rows.append(Row(SECTION, f"recurse persistent {shape[5] * pb} programs", "skip", _last_line(error)))
    if ctx.time_left() < RESERVE_S:
        return rows + [Row(SECTION, "recurse persistent fallback (not co-resident)", "skip", "out of time")]
    return rows + fallback_rows(ctx.device)
