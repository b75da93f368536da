"""Where NoiseTilt's fused training step spends its CPU time, against the yardstick cpu_gap holds it to (issue 19):
`python -m diffkern.bench.ntrk_parts [--case B=4] [--threads 1] [--rounds 11]`.

Two tables, each timed round-robin in one process, in the calling thread's CPU time (timer.time_interleaved with
time.thread_time: a descheduled spell of a loaded machine is left out; at 1 thread torch runs the kernels on the
calling thread, so that is the whole step):

Parts of one step of the case (per call), beside the yardstick's. A sample lasts 0.2 s: a candidate whose arrays the
one before it evicted from the caches runs its first two or three calls up to ~1.4x slower (B=1, 1 thread, loaded
machine), which a 0.2 s sample dilutes to ~1%; the pieces of diffkern's step share their arrays, the yardsticks each
have their own.
  step               torch.autograd.grad of diffkern.ntrk_step(mu, 0.3, w, 0.5, eps=eps), mu, w and eps leaves: the
                     benchmark's diffkern step
  op step            the same through torch.ops.diffkern.ntrk_step with [B] sigma and rho (no public wrapper)
  kernels            ntrk_step then ntrk_step_bwd called directly (no autograd); fwd kernel, bwd kernel: each alone
  passes[_nt]        the yardstick's sweeps (diffkern.bench.machine.pass_calls: plain or streaming stores), with
                     "+autograd" run inside an empty autograd Function of the op's arity (cpu_gap's limit), and the
                     forward's and the backward's sweep alone
The step less its kernels is what autograd, the wrapper and the op calls add; passes+autograd less passes is what
the yardstick's empty Function adds.

Overhead with cold caches (per call, median): the same pieces on tiny tensors (B=4, 64 entries each), each timed right
after the case's sweeps have run (plain stores), and again right after itself (warm). On the 2-core machine, loaded
by other sessions, the sweeps multiply the engine's and Python's cost about 4x (their code and data are evicted), so
an extra Python or dispatcher call costs tens of microseconds inside a B=4 step, not one or two.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from .. import _ops
from ..ntrk.api import ntrk_step
from . import machine, ntrk
from .timer import threads as torch_threads
from .timer import time_interleaved
from .workload import FWD, BWD, requiring_grad, step_call

SIGMA, RHO = ntrk.SIGMA, ntrk.RHO
TINY = (4, 64)


def _pieces(case, seed: int = 0) -> dict[str, Callable[[], object]]:
    """The step of `case`, its parts and the yardstick's sweeps, as callables (inputs allocated here)."""
    mu, w, eps = ntrk.STEP_WORKLOAD.make_args(case, torch.float32, "cpu")
    leaves = requiring_grad((mu, w, eps))
    dout = torch.randn(mu.shape, generator=torch.Generator().manual_seed(seed + 1))
    sigma, rho = torch.full(mu.shape[:1], SIGMA), torch.full(mu.shape[:1], RHO)
    op = _ops.ops

    def op_step():
        return torch.autograd.grad(op.ntrk_step(leaves[0], sigma, leaves[1], rho, leaves[2], None), leaves, dout)

    def fwd_kernel():
        return op.ntrk_step(mu, sigma, w, rho, eps, None)

    def bwd_kernel():
        return op.ntrk_step_bwd(dout, sigma, rho, True, True)

    def kernels():
        fwd_kernel()
        return bwd_kernel()

    numel, per = ntrk.step_passes(case)
    both = machine.pass_calls([*per[FWD], *per[BWD]], numel, seed)
    fwd, bwd = machine.pass_calls(per[FWD], numel, seed), machine.pass_calls(per[BWD], numel, seed)
    out = {"step": step_call(lambda *a: ntrk_step(a[0], SIGMA, a[1], RHO, eps=a[2]), leaves, dout),
           "op step": op_step, "kernels": kernels, "fwd kernel": fwd_kernel, "bwd kernel": bwd_kernel}
    for k in machine.PASS_KERNELS:
        out.update({k: both[k], f"{k}+autograd": ntrk.step_floor(case, fwd[k], bwd[k]), f"fwd {k}": fwd[k],
                    f"bwd {k}": bwd[k]})
    return out


def parts(case, rounds: int = 11, min_sample_s: float = 0.2) -> dict[str, float]:
    """{piece: median CPU seconds per call} of _pieces(case), interleaved."""
    t = time_interleaved(_pieces(case), 3, rounds, min_sample_s, clock=time.thread_time)
    return {k: v.median_s for k, v in t.items()}


def cold_overhead(case, rounds: int = 11, calls: int = 20) -> dict[str, tuple[float, float]]:
    """{piece: (median seconds warm, median seconds right after the case's plain sweeps)} of the tiny pieces."""
    numel, per = ntrk.step_passes(case)
    sweeps = machine.pass_calls([*per[FWD], *per[BWD]], numel)["passes"]
    tiny = ntrk._case(TINY[0], TINY[1:])
    pieces = {k: v for k, v in _pieces(tiny).items() if k in ("step", "op step", "kernels", "passes+autograd")}
    times: dict = {(k, cold): [] for k in pieces for cold in (False, True)}
    for _ in range(rounds):
        for (k, cold), xs in times.items():
            for _ in range(calls):
                (sweeps if cold else pieces[k])()
                start = time.perf_counter()
                pieces[k]()
                xs.append(time.perf_counter() - start)
    return {k: (statistics.median(times[k, False]), statistics.median(times[k, True])) for k in pieces}


def main(argv=None) -> None:
    """`python -m diffkern.bench.ntrk_parts [--case TEXT] [--threads N] [--rounds N]`: both tables, printed."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--case", default="B=4", help="a case of the fused step whose name contains this (B=4, B=1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--quick", action="store_true", help="the workload's quick case (a smoke test)")
    args = ap.parse_args(argv)
    cases = ntrk.STEP_WORKLOAD.cases(args.quick)
    case = next((c for c in cases if args.case in c.name), cases[0]) if not args.quick else cases[0]
    with torch_threads(args.threads):
        t = parts(case, args.rounds, 0.005 if args.quick else 0.2)
        cold = cold_overhead(case, args.rounds, 2 if args.quick else 20)
    print(f"ntrk_step training step, {case.name}, {args.threads} thread(s), CPU time per call (median of "
          f"{args.rounds}, round-robin):")
    for k, v in t.items():
        print(f"  {k:22s} {v * 1e6:9.1f} us  ({v / t['step']:.0%} of step)")
    print(f"tiny pieces {list(TINY)}, per call, warm / right after the case's plain sweeps:")
    for k, (warm, after) in cold.items():
        print(f"  {k:22s} {warm * 1e6:7.1f} / {after * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
