"""diffkern's modeled GPU traffic: its Triton kernels run in the interpreter, in child processes.

The interpreter must be switched on (TRITON_INTERPRET=1) before triton is imported, so the counting
runs in `python -m diffkern.bench.interpreted` (one child per case, as many at once as there are
cores); the parent stays a normal process for the timings. Per case and pass it counts:
  triton.*  bytes the kernels' active lanes load and store, launches (TritonMonitor), also per kernel;
  glue.*    the aten ops the op runs around its kernels (host-side reductions, autograd's zero grads),
            counted like the eager reference (AtenTraffic).
For a workload with CUDA C++ kernels, the same passes run on the cuda backend in the host-execution
harness, which counts the distinct global bytes each launch touches (cuda.*, with its glue.*).
Every case is counted whole, at its real shape, in the runs its workload counts it in (`counted_in`; see
diffkern.bench.mode: the default run leaves minutes-long counts and the CUDA C++ kernels to the full run);
in the others it takes the workload's model (`modeled_counts`: tested equal to the interpreter's counts),
or has no figures.
Scaling a count from token slices is not exact here: the launchers size their grids from the problem
(the DAR backward groups token tiles per program to keep an H100's SMs busy), so a small slice
launches a differently shaped grid from the whole.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch.utils._pytree import tree_leaves

from . import counts
from .mode import Mode
from .workload import BWD, FWD, Workload, grad_leaves, registered, requiring_grad


def interpreter_env() -> dict:
    """The environment of a counting child: the Triton interpreter on, the tests' NaN-fill debug switch off."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("DIFFKERN_DEBUG_FILL", None)
    return env


def _count_in_child(workload: str, case: str, quick: bool, dtype: str, cuda: bool) -> dict:
    env = interpreter_env()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "counts.json")
        cmd = [sys.executable, "-m", "diffkern.bench.interpreted", "--workload", workload, "--case", case,
               "--dtype", dtype, "--out", out] + ["--quick"] * quick + ["--no-cuda"] * (not cuda)
        run = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if run.returncode != 0:
            return {"case": case, "error": f"the interpreter child exited with status {run.returncode}: "
                                           f"{run.stderr.strip()[-2000:]}"}
        with open(out) as f:
            return json.load(f)


def _done(result: dict) -> Future:
    future: Future = Future()
    future.set_result(result)
    return future


def _modeled(workload: Workload, case, dtype: str) -> Future | None:
    """A done future holding the case's modeled counts, or None when the workload has no model of it."""
    model = workload.modeled_counts(case, getattr(torch, dtype))
    if model is None:
        return None
    return _done({"case": case.name, "tokens": case.tokens, "counts": {FWD: model[FWD], BWD: model[BWD]},
                  "modeled": model["note"]})


def _not_counted(case) -> Future:
    return _done({"case": case.name, "not_counted": "its interpreter count takes minutes and no tested model covers "
                                                    "it: counted in the full run (make bench FULL=1)"})


def start(mode: Mode, dtype: str, jobs: int, log) -> dict[str, list[Future]]:
    """Starts counting every case of every workload that `mode` counts, `jobs` children at a time (the others
    take their workload's model, if it has one); returns the futures. `log` hears of each count as it ends."""
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    futures: dict[str, list[Future]] = {}
    for w in registered():
        futures[w.name] = []
        for c in w.cases(mode.quick):
            if mode.counts(w, c):
                future = pool.submit(_count_in_child, w.name, c.name, mode.quick, dtype, mode.count_cuda)
                future.add_done_callback(lambda f, label=f"{w.name} {c.name}": log(f"{label}: traffic {_status(f)}"))
            else:
                future = _modeled(w, c, dtype) or _not_counted(c)
            futures[w.name].append(future)
    pool.shutdown(wait=False)
    return futures


def _status(future: Future) -> str:
    result = future.result()
    if "error" in result:
        return "count failed"
    return f"counted in the interpreter in {result['interpreter_seconds']:.0f} s" + (
        f" (+ {result['harness_seconds']:.0f} s in the CUDA harness)" if "harness_seconds" in result else "")


def collect(futures: dict[str, list[Future]]) -> dict[str, list[dict]]:
    """Waits for the children: per workload, one entry per case (counts, or the error that stopped them)."""
    return {name: [f.result() for f in fs] for name, fs in futures.items()}


def _flat(mon, glue) -> dict[str, int]:
    return counts.flat(mon.by_kernel(), counts.aten_glue(glue))


def _count(fn):
    from diffkern.testing.triton_monitor import TritonMonitor

    from .aten_traffic import AtenTraffic
    with AtenTraffic(descend=("diffkern",)) as glue, TritonMonitor(check_bounds=False) as mon:
        out = fn()
    return out, _flat(mon, glue.traffic)


# Elements of the tensors among a case's arguments above which its CUDA kernels are not run in the
# harness, which moves ~0.5M elements a second on one core: the full DAR n=57 case (134M) is skipped;
# n=18 (42M) and Flow-GRPO (17M in v, a few times that in its rollout) take minutes each.
HARNESS_MAX_ELEMENTS = 2**26


def _count_cuda(fn):
    """The cuda backend's kernels run in the host harness: distinct global bytes per launch (its model)."""
    from diffkern.testing import cuda_harness

    from .aten_traffic import AtenTraffic
    with AtenTraffic(descend=("diffkern",)) as glue, cuda_harness.traffic() as kernels:
        out = fn()
    return out, {"cuda.bytes": kernels.bytes, "cuda.launches": kernels.launches,
                 "glue.bytes_read": glue.traffic.bytes_read, "glue.bytes_written": glue.traffic.bytes_written,
                 "glue.kernels": glue.traffic.kernels}


def _passes(workload: Workload, case, dtype: torch.dtype, backend: str, count) -> dict:
    """Counts of one forward and one backward (torch.autograd.grad: no gradient accumulation) of `case`."""
    import diffkern
    args = requiring_grad(workload.make_args(case, dtype, "cpu"))
    with diffkern.backend(backend):
        out, fwd = count(lambda: workload.diffkern(*args))
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        _, bwd = count(lambda: torch.autograd.grad(out, grad_leaves(args), dout))
    return {FWD: fwd, BWD: bwd}


def count_case(workload: Workload, case, dtype: torch.dtype, cuda: bool = True) -> dict:
    """Triton counts of `case` and, for a workload with CUDA kernels (if `cuda`), the harness's counts of them."""
    start_s = time.perf_counter()
    result = {"case": case.name, "tokens": case.tokens, "counts": _passes(workload, case, dtype, "triton", _count)}
    result["interpreter_seconds"] = time.perf_counter() - start_s
    if not workload.cuda_sources:
        return result
    if not cuda:
        result["cuda_skipped"] = "the default run leaves the host harness to the full run (make bench FULL=1)"
        return result
    elements = sum(t.numel() for t in tree_leaves(workload.make_args(case, dtype, "meta")) if isinstance(t, torch.Tensor))
    if elements > HARNESS_MAX_ELEMENTS:
        result["cuda_skipped"] = f"{elements} input elements: beyond the harness's {HARNESS_MAX_ELEMENTS}"
        return result
    from diffkern.testing import cuda_harness
    cuda_harness.load()
    start_s = time.perf_counter()
    result["cuda_counts"] = _passes(workload, case, dtype, "cuda", _count_cuda)
    result["harness_seconds"] = time.perf_counter() - start_s
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", required=True)
    parser.add_argument("--case", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-cuda", action="store_true", help="count the Triton kernels only")
    args = parser.parse_args(argv)
    from diffkern import _triton
    if not _triton.interpreting():
        sys.exit("diffkern.bench.interpreted needs TRITON_INTERPRET=1 in its environment (use `start`)")
    torch.set_num_threads(1)  # one child per core
    workload = next(w for w in registered() if w.name == args.workload)
    result = count_case(workload, workload.case(args.case, args.quick), getattr(torch, args.dtype), not args.no_cuda)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
