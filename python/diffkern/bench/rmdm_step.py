"""Where an R-MDM training step's time goes on the CPU, and how close it is to the GEMM library's limit.

`python -m diffkern.bench.rmdm_step [--threads 1 2] [--batch 1 64] [--rounds 7]` prints, per thread count and
case of diffkern.bench.rmdm (RECURSE: Sudoku, d=256, 8 heads, MLP 1024, K=2 blocks, L=4 iterations), medians of
interleaved samples (diffkern.bench.timer.time_interleaved, all in one process) of:
  * the training step (forward + torch.autograd.grad of every input) of eager PyTorch, torch.compile (Inductor;
    recompiled per thread count), diffkern (the training pair keeping the forward's activations, the default) and
    diffkern with recompute=True (the backward re-running each iteration: the step before the training pair);
  * its phases: diffkern's forward (rmdm_recurse_keep) alone, and the rest of the step (backward: step - forward;
    no activations are held between calls, so both reuse the op's buffers as a training loop does);
  * "mm floor": the step's GEMMs (diffkern.bench.rmdm.block_gemms, K L block evaluations) run by torch.mm /
    torch.bmm (diffkern.bench.machine.gemm_call) at the same shapes and thread count, timed alone: the time the
    GEMM library needs for the step's FLOPs (RECURSE.flops, held to torch's FLOP counter by the tests).
and the GEMM efficiency of each candidate, (mm floor) / (its step time): above 1 means its GEMMs run faster than
the library's at these shapes. An eager step with efficiency e bounds any step doing the same GEMMs at the
library's speed to 1/e times eager (the issue's 1.5x bar needs e <= 0.67 or GEMMs faster than the library's).
"""
from __future__ import annotations

import argparse

import torch

from ..rmdm import op
from ..rmdm.reference import N_PARAMS
from . import rmdm
from .machine import gemm_call
from .timer import time_interleaved
from .workload import BWD, FWD, requiring_grad, step_call


def _gemm_floor(case):
    """One step's products (forward and backward of K L block evaluations) by torch.mm / torch.bmm."""
    gemms = rmdm.block_gemms(case)
    once = gemm_call([*gemms[FWD], *gemms[BWD]])

    def run():
        for _ in range(case.params["K"] * case.params["L"]):
            once()
    return run


def case_row(B: int, threads: int, rounds: int) -> dict:
    """Medians (ms) and ratios of one case at one thread count (see the module docstring)."""
    torch.set_num_threads(threads)
    case = rmdm._case(B, 81, 256)
    x, weights = rmdm._make_args(case, torch.float32, "cpu")
    gx, gw = requiring_grad((x, weights))
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    blocks = [gw[k:k + N_PARAMS] for k in range(0, len(gw), N_PARAMS)]

    def dk(recompute):
        return lambda x_, w_: op.recurse(blocks, x_, rmdm.L, heads=rmdm.HEADS, eps=rmdm.EPS, recompute=recompute)
    torch._dynamo.reset()  # Inductor's C++ fixes its OpenMP thread count when it compiles
    compiled = torch.compile(rmdm.eager_recurse, dynamic=False)
    fns = {name: step_call(fn, (gx, gw), dout) for name, fn in
           (("eager", rmdm.eager_recurse), ("compile", compiled), ("diffkern", dk(None)),
            ("diffkern recompute", dk(True)))}
    fns["compile"]()
    fns["diffkern fwd"] = lambda: torch.ops.diffkern.rmdm_recurse_keep(x, weights, None, rmdm.L, rmdm.HEADS, rmdm.EPS)
    fns["mm floor"] = _gemm_floor(case)
    t = {k: v.median_s * 1e3 for k, v in time_interleaved(fns, 2, rounds, 0.2).items()}
    t["diffkern bwd (step - fwd)"] = t["diffkern"] - t["diffkern fwd"]
    flops = sum(rmdm.RECURSE.flops(case).values())
    return {"case": case.name, "threads": threads, "ms": t, "step_gflop": flops / 1e9,
            "eager/diffkern": t["eager"] / t["diffkern"], "compile/diffkern": t["compile"] / t["diffkern"],
            "eager/diffkern recompute": t["eager"] / t["diffkern recompute"],
            "gemm_efficiency": {k: t["mm floor"] / t[k] for k in ("eager", "compile", "diffkern", "diffkern recompute")},
            "mm floor GFLOP/s": flops / t["mm floor"] / 1e6, "diffkern GFLOP/s": flops / t["diffkern"] / 1e6}


def main(argv=None) -> None:
    """Prints one row per (threads, batch) with medians in ms, the ratios and the GEMM efficiencies."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    for threads in args.threads:
        for B in args.batch:
            r = case_row(B, threads, args.rounds)
            print(f"{r['case']}, {threads} thread(s), step {r['step_gflop']:.2f} GFLOP: "
                  + ", ".join(f"{k} {v:.2f} ms" for k, v in r["ms"].items()), flush=True)
            print(f"  eager/diffkern {r['eager/diffkern']:.2f}x, compile/diffkern {r['compile/diffkern']:.2f}x, "
                  f"eager/(diffkern recompute) {r['eager/diffkern recompute']:.2f}x; GEMM efficiency (mm floor / "
                  "step): " + ", ".join(f"{k} {v:.2f}" for k, v in r["gemm_efficiency"].items())
                  + f"; mm floor {r['mm floor GFLOP/s']:.1f} GFLOP/s, diffkern {r['diffkern GFLOP/s']:.1f} GFLOP/s",
                  flush=True)


if __name__ == "__main__":
    main()
