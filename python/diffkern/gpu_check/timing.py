"""Section 6, timings: every op at its real shapes, diffkern (each GPU backend) against eager PyTorch,
torch.compile and, for the sinks, SDPA's flash backend on the same q, k, v; bf16.

Each call is timed with triton.testing.do_bench (CUDA events, L2 flushed, median), or, where the
roofline predicts under SMALL_CALL_S on an H100 (launch overhead would dominate), with
do_bench_cudagraph on a side stream, falling back to do_bench when the capture fails (the row says so).
torch.compile runs in "max-autotune" only when MAX_AUTOTUNE_LEFT_S are left when the section starts,
else in the default mode (each row names the mode). Achieved GB/s and TFLOP/s come from the roofline
(diffkern.bench.roofline: minimal bytes, formula FLOPs), each also as a fraction of the peaks the env
section measured. The issue's bars follow each call as "met" / "not met" rows:
  every op >= 1.5x eager; the memory-bound ops (DAR route, GRPO step and loss, NTRK step, 2OS project)
  >= 80% of the measured copy bandwidth and >= 1.5x torch.compile; sink attention (selecting in the call, and
  with the keys given) <= 1.3x SDPA flash.
The dry run builds the same case list with its rooflines, each row "skip: timings need CUDA".
After the timings, one "autotune" info row per launch configuration diffkern._autotune chose in this run
(kernel, shape key, configuration, each candidate's median ms, candidates dropped for spilling).
"""
from __future__ import annotations

import contextlib
import gc

import torch

from ..bench.roofline import roofline
from ..bench.workload import STEP, forward_call, requiring_grad, step_call
from .context import Row
from .correctness import _last_line
from .timed_ops import SINKS, SINKS_GIVEN, TimedCall, calls

SECTION = "timing"
DTYPE = torch.bfloat16
SMALL_CALL_S = 50e-6
MAX_AUTOTUNE_LEFT_S = 1800.0
# Seconds kept for the sections after this one (registers), and for one more torch.compile.
RESERVE_S, COMPILE_S = 45.0, 30.0
# do_bench's warmup and repetition ms; do_bench_cudagraph unrolls rep / (one call's time) calls into one graph,
# so it keeps Triton's default 20 ms (thousands of microsecond calls to capture, not tens of thousands).
WARMUP_MS, REP_MS, GRAPH_REP_MS = 25, 100, 20
EAGER_BAR, COMPILE_BAR, BANDWIDTH_BAR, FLASH_BAR = 1.5, 1.5, 0.8, 1.3


def bench_ms(fn, small: bool) -> tuple[float, str]:
    """Median ms of fn() and how it was timed ("cudagraph", "do_bench", or do_bench after a failed capture)."""
    from triton.testing import do_bench, do_bench_cudagraph

    fn()  # compiles (Triton JIT, torch.compile) outside the timed region
    torch.cuda.synchronize()
    method = "do_bench"
    if small:
        try:
            with torch.cuda.stream(torch.cuda.Stream()):
                return do_bench_cudagraph(fn, rep=GRAPH_REP_MS, return_mode="median"), "cudagraph"
        except Exception as error:  # noqa: BLE001 - noted in the row, timed without the graph
            torch.cuda.synchronize()
            method = f"do_bench (cudagraph capture failed: {_last_line(error)})"
    return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"), method


def _sdpa_flash(q, k, v, *_):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _candidates(call: TimedCall, compile_mode: str | None) -> dict:
    """name -> (function, context it runs under)."""
    import diffkern
    out = {f"diffkern[{b}]": (call.workload.diffkern, lambda b=b: diffkern.backend(b)) for b in call.backends()}
    out["eager"] = (call.workload.reference, contextlib.nullcontext)
    if compile_mode is not None:
        torch._dynamo.reset()
        mode = None if compile_mode == "default" else compile_mode
        out["compile"] = (torch.compile(call.workload.reference, mode=mode, dynamic=False), contextlib.nullcontext)
    if call.workload in (SINKS, SINKS_GIVEN):
        out["sdpa_flash"] = (_sdpa_flash, contextlib.nullcontext)
    return out


def _bar(call: TimedCall, label: str, what: str, value: float | None, ok) -> Row:
    if value is None:
        return Row(SECTION, f"{call.name} {label}: {what}", "skip", "not measured")
    return Row(SECTION, f"{call.name} {label}: {what}", "met" if ok(value) else "not met", f"{value:.3g}",
               {"value": value})


def bar_rows(call: TimedCall, label: str, ms: dict, diffkern_ms: float, gbps: float, peaks: dict) -> list[Row]:
    """The issue's bars for one timed (call, pass, backend): `ms` every candidate's median ms."""
    rows = [_bar(call, label, f"eager/diffkern >= {EAGER_BAR}x", ms["eager"] / diffkern_ms if "eager" in ms else None,
                 lambda r: r >= EAGER_BAR)]
    if call.memory_bound:
        copy = peaks.get("copy_gbps")
        rows.append(_bar(call, label, f">= {BANDWIDTH_BAR:.0%} of measured copy bandwidth",
                         gbps / copy if copy else None, lambda r: r >= BANDWIDTH_BAR))
        rows.append(_bar(call, label, f"compile/diffkern >= {COMPILE_BAR}x",
                         ms["compile"] / diffkern_ms if "compile" in ms else None, lambda r: r >= COMPILE_BAR))
    if call.workload in (SINKS, SINKS_GIVEN):
        rows.append(_bar(call, label, f"diffkern/SDPA flash <= {FLASH_BAR}x",
                         diffkern_ms / ms["sdpa_flash"] if "sdpa_flash" in ms else None, lambda r: r <= FLASH_BAR))
    return rows


def backend_rows(call: TimedCall, p: str, name: str, ms: dict, how: dict, roof, peaks: dict) -> list[Row]:
    """The info row of candidate `name` (a diffkern backend) in pass `p` (its time, achieved rates and their
    fractions of the measured peaks, the other candidates' times), then its bar rows."""
    achieved = roof.achieved(ms[name] * 1e-3)
    copy, matmul = (achieved[a] / peaks[k] if peaks.get(k) else None
                    for a, k in (("gbps", "copy_gbps"), ("tflops", "bf16_tflops")))
    rates = (f"{achieved['gbps']:.0f} GB/s" + (f" ({copy:.0%} of copy)" if copy else "") + ", "
             f"{achieved['tflops']:.1f} TFLOP/s" + (f" ({matmul:.0%} of bf16 matmul)" if matmul else ""))
    others = ", ".join(f"{k} {v:.4g} ms" for k, v in ms.items() if not k.startswith("diffkern"))
    label = f"{p} {name.removeprefix('diffkern[').rstrip(']')}"
    row = Row(SECTION, f"{call.name} {label}", "info", f"{ms[name]:.4g} ms, {rates}; {others}",
              {"ms": ms, **how, "roofline": roof.as_dict(), **achieved, "copy_gbps_of_peak": copy,
               "bf16_tflops_of_peak": matmul})
    return [row, *bar_rows(call, label, ms, ms[name], achieved["gbps"], peaks)]


def _time_call(ctx, call: TimedCall, compile_mode: str) -> list[Row]:
    """Every candidate in every pass of `call` in bf16; torch.compile only while the time left allows it."""
    roof = roofline(call.workload, call.case, DTYPE.itemsize)
    args = call.workload.make_args(call.case, DTYPE, ctx.device)
    grad_args = requiring_grad(args) if STEP in call.passes else None
    with_compile = compile_mode if ctx.time_left() > RESERVE_S + COMPILE_S * len(call.passes) else None
    candidates = _candidates(call, with_compile)
    rows = []
    for p in call.passes:
        dout = None
        if p == STEP:
            with torch.no_grad():
                dout = torch.randn_like(call.workload.reference(*args))
        ms, methods = {}, {}
        for name, (fn, context) in candidates.items():
            timed = forward_call(fn, args) if p != STEP else step_call(fn, grad_args, dout)
            with context():
                ms[name], methods[name] = bench_ms(timed, roof[p].h100_s() < SMALL_CALL_S)
        for name in (n for n in ms if n.startswith("diffkern")):
            rows += backend_rows(call, p, name, ms, {"timed_by": methods, "compile_mode": with_compile or
                                                     "skipped (time)"}, roof[p], ctx.peaks)
    del args, grad_args, candidates
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def _roofline_rows(call: TimedCall, status: str, detail: str) -> list[Row]:
    roof = roofline(call.workload, call.case, DTYPE.itemsize)
    return [Row(SECTION, f"{call.name} {p}", status,
                f"{detail}; roofline {roof[p].h100_s() * 1e6:.3g} us on an H100 ({roof[p].bound()}-bound)",
                {"roofline": roof[p].as_dict(), "backends": list(call.backends())}) for p in call.passes]


def autotune_rows() -> list[Row]:
    """One info row per configuration diffkern._autotune chose in this process (diffkern._autotune.chosen())."""
    from .. import _autotune
    choices = _autotune.chosen()
    if not choices:
        return [Row(SECTION, "autotune", "info", "no kernel was tuned (DIFFKERN_AUTOTUNE=0, or no tuned launch ran)")]
    return [Row(SECTION, f"autotune {c['kernel']} {c['key']}", "info", line, c)
            for c, line in zip(choices, _autotune.summary(choices))]


def run(ctx) -> list[Row]:
    """One info row per (call, pass, backend) with its times and achieved rates, then its bar rows; then the
    autotune choices."""
    timed = calls()
    if ctx.dry_run or ctx.device.type != "cuda":
        return [r for call in timed for r in _roofline_rows(call, "skip", "timings need CUDA")]
    compile_mode = "max-autotune" if ctx.time_left() > MAX_AUTOTUNE_LEFT_S else "default"
    rows = [Row(SECTION, "torch.compile mode", "info", compile_mode)]
    for call in timed:
        if ctx.time_left() < RESERVE_S:
            rows += _roofline_rows(call, "skip", "out of time")
            continue
        ctx.log(f"timing {call.name}")
        try:
            rows += _time_call(ctx, call, compile_mode)
        except Exception as error:  # noqa: BLE001 - one call failing must not hide the others' times
            rows.append(Row(SECTION, call.name, "fail", _last_line(error)))
            gc.collect()
            torch.cuda.empty_cache()
    return rows + autotune_rows()
