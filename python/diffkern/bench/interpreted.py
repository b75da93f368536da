"""diffkern's modeled GPU traffic: its Triton kernels run in the interpreter, in child processes.

The interpreter must be switched on (TRITON_INTERPRET=1) before triton is imported, so the counting
runs in `python -m diffkern.bench.interpreted` children (as many as there are cores, each counting case after
case as the parent hands them out over its stdin: torch and Triton are imported once a child, not once a case);
the parent stays a normal process for the timings. Per case and pass it counts:
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
import queue
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future

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


class _Child:
    """A counting child: `count(workload, case)` sends it one case (a JSON line on its stdin) and returns the entry
    it writes back (a JSON line on its stdout); a child that dies is replaced for the next case."""

    def __init__(self, quick: bool, dtype: str, cuda: bool):
        self.cmd = [sys.executable, "-m", "diffkern.bench.interpreted", "--dtype", dtype] + ["--quick"] * quick + \
            ["--no-cuda"] * (not cuda)
        self.proc = None

    def count(self, workload: str, case: str) -> dict:
        if self.proc is None:
            self.stderr = tempfile.TemporaryFile(mode="w+")
            self.proc = subprocess.Popen(self.cmd, env=interpreter_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self.stderr, text=True)
        try:
            self.proc.stdin.write(json.dumps({"workload": workload, "case": case}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if line:
            return json.loads(line)
        status = self.proc.wait()
        self.stderr.seek(0)
        error = self.stderr.read().strip()[-2000:]
        self.stderr.close()
        self.proc = None
        return {"case": case, "error": f"the interpreter child exited with status {status}: {error}"}

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait()
            self.stderr.close()


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
    """Starts counting every case of every workload that `mode` counts, in `jobs` children, each taking the next
    case as it finishes one (the others take their workload's model, if it has one); returns the futures. `log`
    hears of each count as it ends."""
    futures: dict[str, list[Future]] = {}
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for w in registered():
        futures[w.name] = []
        for c in w.cases(mode.quick):
            if mode.counts(w, c):
                future: Future = Future()
                future.add_done_callback(lambda f, label=f"{w.name} {c.name}": log(f"{label}: traffic {_status(f)}"))
                todo.put((w.name, c.name, future))
            else:
                future = _modeled(w, c, dtype) or _not_counted(c)
            futures[w.name].append(future)

    def serve(child: _Child) -> None:
        try:
            while True:
                try:
                    workload, case, future = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    future.set_result(child.count(workload, case))
                except Exception as error:  # noqa: BLE001 - the entry says why (a child that cannot start)
                    future.set_result({"case": case, "error": f"the interpreter child failed: {error!r}"})
        finally:
            child.close()
    for _ in range(max(1, min(jobs, todo.qsize()))):
        threading.Thread(target=serve, args=(_Child(mode.quick, dtype, mode.count_cuda),), daemon=True).start()
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
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-cuda", action="store_true", help="count the Triton kernels only")
    args = parser.parse_args(argv)
    from diffkern import _triton
    if not _triton.interpreting():
        sys.exit("diffkern.bench.interpreted needs TRITON_INTERPRET=1 in its environment (use `start`)")
    torch.set_num_threads(1)  # one child per core
    # The entries go back on the original stdout; anything else the counting prints goes to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    workloads = {w.name: w for w in registered()}
    for line in sys.stdin:
        ask = json.loads(line)
        workload = workloads[ask["workload"]]
        result = count_case(workload, workload.case(ask["case"], args.quick), getattr(torch, args.dtype),
                            not args.no_cuda)
        replies.write(json.dumps(result) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
