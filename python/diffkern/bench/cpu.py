"""CPU wall time: the eager reference, torch.compile of it (Inductor CPU), and diffkern's C++ kernel.

Forward is timed under no_grad (inference); a training step is forward plus torch.autograd.grad of
every input (no gradient accumulation, so no zeroing between calls). The three candidates of one
pass are timed interleaved (timer.time_interleaved), and compile time (the compiled function's first
call) is reported apart from the run time.
"""
from __future__ import annotations

import gc

import torch

from .. import _dtypes, _registry
from .timer import first_call_seconds, time_interleaved
from .workload import FWD, STEP, Workload, forward_call, requiring_grad, step_call


def case_rows(workload: Workload, case, dtype: torch.dtype, warmup: int, rounds: int,
              min_sample_s: float, log=print, passes=(FWD, STEP), extra=None) -> list[dict]:
    """Rows for one case: each of `passes` (fwd, fwd+bwd) with the three candidates' median times and ratios.

    extra(pass) -> {name: callable}: more callables timed interleaved with the three in that pass (a
    yardstick, such as diffkern.bench.machine's); the row gets each one's median as `<name>_ms`."""
    args = workload.make_args(case, dtype, "cpu")
    grad_args = requiring_grad(args)
    torch._dynamo.reset()
    compiled = torch.compile(workload.reference, dynamic=False)
    with torch.no_grad():
        expected = workload.reference(*args)
        with _registry.backend("cpu"):
            got = workload.diffkern(*args)
        max_abs_err = (got.double() - expected.double()).abs().max().item()
    dout = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).to(expected.dtype)
    candidates = {"eager": workload.reference, "compile": compiled, "diffkern": workload.diffkern}
    calls = {FWD: lambda fn: forward_call(fn, args), STEP: lambda fn: step_call(fn, grad_args, dout)}
    timed = {p: {k: calls[p](fn) for k, fn in candidates.items()} for p in passes}
    rows = []
    for p, fns in timed.items():
        log(f"{workload.name}: cpu timing {case.name} {p}")
        compile_s = first_call_seconds(fns["compile"])
        # diffkern's C++ kernels forced around the rounds, not inside each diffkern call: entering the override costs
        # ~1.3 us a call with warm caches and ~19 us right after a latent-sized sweep (NoiseTilt's step, 1 thread),
        # which eager and torch.compile do not pay; forcing "cpu" reroutes nothing on CPU tensors, so the other
        # candidates run as they would without it
        with _registry.backend("cpu"):
            t = time_interleaved({**fns, **(extra(p) if extra else {})}, warmup, rounds, min_sample_s)
        dk = t["diffkern"].median_s
        rows.append({"case": case.name, "pass": p, "dtype": _dtypes.name(dtype),
                     **{f"{k}_ms": v.median_s * 1e3 for k, v in t.items()},
                     "eager_over_diffkern": t["eager"].median_s / dk,
                     "compile_over_diffkern": t["compile"].median_s / dk,
                     "compile_first_call_s": compile_s,
                     "max_abs_err_vs_eager": max_abs_err if p == FWD else None,
                     "timings": {k: v.as_dict() for k, v in t.items()}})
    del args, grad_args, timed, candidates, compiled
    gc.collect()
    return rows


def rows(workload: Workload, cases, dtype: torch.dtype, warmup: int, rounds: int,
         min_sample_s: float, log=print) -> list[dict]:
    """Rows for each of `cases` (of `workload`); a case that fails is one row with its error."""
    out = []
    for case in cases:
        try:
            out += case_rows(workload, case, dtype, warmup, rounds, min_sample_s, log)
        except Exception as error:  # noqa: BLE001 - reported in the table, other cases go on
            out.append({"case": case.name, "pass": STEP, "error": repr(error)})
            log(f"{workload.name}: cpu timing {case.name} failed")
    return out
