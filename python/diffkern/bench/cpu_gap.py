"""Issue 19's table: the CPU rows that lost to torch.compile (the DAR stack, the GRPO loss, NoiseTilt's steps and
the R-MDM training step), each at 2 threads and 1 thread, judged on its bars or on this machine's limit.

One line per (row, case, pass, threads): eager, torch.compile and diffkern's C++ kernel timed interleaved by
diffkern.bench.cpu.case_rows, with the row's machine-limit yardsticks (diffkern.bench.machine) as more
candidates in the same rounds, so a slow spell of a shared machine lands on all of them alike. Per thread count:
torch.set_num_threads(n), and every torch.compile is redone (case_rows resets dynamo): Inductor's C++ fixes its
OpenMP thread count when it compiles. The pinned torch (requirements-dev.txt) keys its on-disk FX graph cache on
that count, so the cache never hands back code compiled for the other one (older torch did: pytorch#160812).

The limit a row may be held to when a ratio misses (the issue's escape clause):
  bandwidth  memory-bound rows: the op's minimal bytes / diffkern's time, over the fastest of a STREAM copy,
             triad and read (a sum) moving the same bytes (the same working set, so cache-resident cases meet
             cache bandwidth); for a pass that returns new latent-sized tensors, over the fastest copy and triad
             into outputs each call allocates, as the op's own are; for a row given its op's pass structure (the
             NoiseTilt fused step), over the fastest of the same arrays streamed in the same sweeps (plain or
             streaming stores, diffkern.bench.machine.pass_calls), which any implementation of those passes pays;
             its training step over the same sweeps run as an empty autograd Function of the op's arity (the
             forward's sweeps in its forward, the backward's in its backward: diffkern.bench.autograd_floor),
             which any autograd op pays
  GEMM       GEMM-bound rows: the op's matrix-product FLOPs (Workload.flops) / diffkern's time, over torch.mm/bmm
             running one block evaluation's products at the op's shapes
  none       the DAR stack at B=1, T=8 is overhead-bound (57 small routing ops): met or not met.
Verdict: "met" (every bar of the line), "at machine limit (NN% of bandwidth|GEMM)" (a ratio missed, the
fraction >= 80%), else "not met".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import cpu, dar_stack, grpo, ntrk, rmdm
from .bars import _OPS
from .machine import (FRESH_KERNELS, PASS_KERNELS, STREAM_KERNELS, gemm_call, gemm_flops, pass_bytes, pass_calls,
                      stream_bytes, stream_calls)
from .mode import MODES, Mode
from .timer import threads as torch_threads
from .workload import BWD, EVERY_RUN, FWD, STEP, Bar, Case, Workload

THREADS = (2, 1)
LIMIT_FRACTION = 0.8
FLOOR = "+autograd"  # a pass yardstick run as an empty autograd Function of the op's arity (bandwidth_limit)
PASS_FLOOR_KERNELS = tuple(k + FLOOR for k in PASS_KERNELS)
DTYPE, ITEMSIZE = torch.float32, 4
TITLE = ("The CPU rows that lose to torch.compile: the DAR stack, GRPO, NoiseTilt and the R-MDM training step "
         "(issue 19)")


def _in_pass(per_pass: dict, p: str) -> float:
    """A {fwd, bwd} figure for one timed pass: fwd alone, or fwd + bwd for a training step."""
    return per_pass[FWD] + (per_pass[BWD] if p == STEP else 0)


@dataclass(frozen=True)
class Limit:
    """What a row may be held to instead of its ratios. work(case, pass): the bytes or FLOPs the op must move or do;
    yardsticks(case, pass) -> {name: (callable, work per call)}: this machine doing the same work at full speed.
    The limit is the fastest matching yardstick's rate (the others are reported beside it)."""
    kind: str
    unit: str  # of the rates, in units of 1e9 (GB/s, GFLOP/s)
    work: Callable[[Case, str], float]
    yardsticks: Callable[[Case, str], dict[str, tuple[Callable[[], object], float]]]
    matching: Callable[[str], tuple[str, ...]] | None = None  # pass -> the yardsticks the limit is over (None: all)


def bandwidth_limit(min_bytes: Callable[[Case, int], dict], fresh_passes: tuple[str, ...] = (),
                    passes: Callable[[Case], tuple[int, dict]] | None = None,
                    floor: Callable[[Case, Callable, Callable], Callable[[], object]] | None = None) -> Limit:
    """Memory-bound: min_bytes(case, itemsize) -> {fwd, bwd} bytes; STREAM copy, triad and read of that working
    set, or, in `fresh_passes` (the passes whose op returns new latent-sized tensors), the copy and triad into
    outputs each call allocates (diffkern.bench.machine: the page faults an out-of-place op pays). Every
    kernel is timed either way; the limit is taken over the ones the pass matches.
    passes(case) -> (elements per array, {fwd, bwd} -> the op's (arrays read, arrays written) per sweep): the op's
    own pass structure, streamed by diffkern.bench.machine.pass_calls (plain and streaming stores), is then the
    limit instead (the STREAM kernels are still timed and reported, in the fraction of the fastest yardstick).
    floor(case, forward, backward) -> an empty autograd step of the op's arity running forward() in its forward and
    backward() in its backward (diffkern.bench.autograd_floor.floor_call): with `passes`, the training step is held
    to the pass yardsticks run that way, the forward's sweeps then the backward's (PASS_FLOOR_KERNELS: the same
    bytes plus what any autograd op pays around them); the bare pass yardsticks are still timed and reported."""
    def work(case: Case, p: str) -> float:
        return _in_pass(min_bytes(case, ITEMSIZE), p)

    def yardsticks(case: Case, p: str):
        n = int(work(case, p))
        moved = stream_bytes(n, DTYPE)
        out = {k: (fn, moved[k]) for k, fn in stream_calls(n, DTYPE).items()}
        if passes is not None:
            numel, per_pass = passes(case)
            sweeps = [*per_pass[FWD], *(per_pass[BWD] if p == STEP else ())]
            out.update({k: (fn, pass_bytes(sweeps, numel)) for k, fn in pass_calls(sweeps, numel).items()})
            if floor is not None and p == STEP:
                fwd, bwd = pass_calls(per_pass[FWD], numel), pass_calls(per_pass[BWD], numel)
                out.update({k + FLOOR: (floor(case, fwd[k], bwd[k]), pass_bytes(sweeps, numel)) for k in PASS_KERNELS})
        return out

    def matching(p: str) -> tuple[str, ...]:
        if passes is not None:
            return PASS_FLOOR_KERNELS if floor is not None and p == STEP else PASS_KERNELS
        return FRESH_KERNELS if p in fresh_passes else STREAM_KERNELS
    return Limit("bandwidth", "GB/s", work, yardsticks, matching)


def gemm_limit(workload: Workload, block_gemms: Callable[[Case], dict]) -> Limit:
    """GEMM-bound: workload.flops(case) -> {fwd, bwd}; block_gemms(case) -> {fwd, bwd}: the products of one block
    evaluation, run by torch.mm/bmm."""
    def yardsticks(case: Case, p: str):
        gemms = [*block_gemms(case)[FWD], *(block_gemms(case)[BWD] if p == STEP else ())]
        return {"gemm": (gemm_call(gemms, DTYPE), gemm_flops(gemms))}
    return Limit("GEMM", "GFLOP/s", lambda case, p: _in_pass(workload.flops(case), p), yardsticks)


def eager_bar(target: float, passes=(FWD, STEP)) -> Bar:
    return Bar(f">= {target:g}x eager", "cpu", "eager_over_diffkern", ">=", target, passes)


def compile_bar(target: float, passes=(FWD, STEP)) -> Bar:
    return Bar(f">= {target:g}x compile", "cpu", "compile_over_diffkern", ">=", target, passes)


@dataclass(frozen=True)
class Row:
    """One row of the issue's table: a workload (its cases by name), the bars, the limit (None: none applies).
    in_default(case): whether the default run times the case (None: the workload's own `timed_in`)."""
    title: str
    workload: Workload
    bars: tuple[Bar, ...]
    limit: Limit | None
    in_default: Callable[[Case], bool] | None = field(default=None)

    @property
    def passes(self) -> tuple[str, ...]:
        return tuple(p for p in (FWD, STEP) if any(p in b.passes for b in self.bars))

    def cases(self, mode: Mode) -> tuple[Case, ...]:
        """The cases `mode` times."""
        if mode.time_all:
            return self.workload.cases(mode.quick)
        pick = self.in_default or (lambda c: self.workload.timed_in(c) == EVERY_RUN)
        return tuple(c for c in self.workload.cases(mode.quick) if pick(c))


_GRPO = {w.name: w for w in grpo.WORKLOADS}
ROWS = (
    # the chunked stack (S=4, DARRouter's and the DiT's default) in the default run; its first compile, and the
    # full scheme's, take minutes with Inductor's cache cold
    Row("DAR whole stack", dar_stack.STACK, (eager_bar(3.0), compile_bar(1.0)), None,
        lambda case: case.params["S"] is not None),
    Row("GRPO loss (stored y)", _GRPO["grpo_iso_loss_y"], (compile_bar(1.0),),
        bandwidth_limit(_GRPO["grpo_iso_loss_y"].min_bytes, (STEP,))),
    Row("GRPO loss (stored x, x_next)", _GRPO["grpo_iso_loss"], (compile_bar(1.0),),
        bandwidth_limit(_GRPO["grpo_iso_loss"].min_bytes, (STEP,))),
    # the fused step's outputs come from the CPU output cache (no page faults): held to its own passes (fwd: read 3
    # latents, write 1; bwd: read 1, write 2) streamed into preallocated outputs, its training step to those passes
    # run as an empty autograd Function of its arity
    Row("NTRK fused step", ntrk.STEP_WORKLOAD, (eager_bar(3.0), compile_bar(1.0)),
        bandwidth_limit(ntrk.STEP_WORKLOAD.min_bytes, passes=ntrk.step_passes, floor=ntrk.step_floor)),
    Row("NTRK tilted step (2OS project + step)", ntrk.TILTED_WORKLOAD, (eager_bar(3.0), compile_bar(1.0)),
        bandwidth_limit(ntrk.TILTED_WORKLOAD.min_bytes, (FWD, STEP))),
    Row("R-MDM training step", rmdm.RECURSE, (eager_bar(1.5, (STEP,)),), gemm_limit(rmdm.RECURSE, rmdm.block_gemms)),
)


def verdict(values: dict, bars: Sequence[Bar], fraction: float | None, kind: str | None) -> str:
    """"met" if values[bar.metric] meets every bar; else "at machine limit (NN% of kind)" if the limit fraction is
    at least LIMIT_FRACTION; else "not met"."""
    if all(_OPS[b.op](values[b.metric], b.target) for b in bars):
        return "met"
    if fraction is not None and fraction >= LIMIT_FRACTION:
        return f"at machine limit ({fraction:.0%} of {kind})"
    return "not met"


def judge(row: Row, case: Case, r: dict, works: dict | None) -> dict:
    """One table line from a cpu.case_rows row (with the limit's yardstick times, when the row has a limit)."""
    bars = [b for b in row.bars if r["pass"] in b.passes and b.where(case)]
    line = {"row": row.title, "workload": row.workload.name, "case": case.name, "pass": r["pass"],
            **{k: r[k] for k in ("eager_ms", "compile_ms", "diffkern_ms", "eager_over_diffkern",
                                 "compile_over_diffkern", "compile_first_call_s", "timings")},
            "bars": [b.text for b in bars], "limit": None, "fraction": None}
    if row.limit is not None:
        rates = {k: w / (r[f"{k}_ms"] * 1e-3) for k, w in works.items()}
        matching = row.limit.matching(r["pass"]) if row.limit.matching else tuple(rates)
        best = max(matching, key=rates.get)
        achieved = row.limit.work(case, r["pass"]) / (r["diffkern_ms"] * 1e-3)
        line.update(limit=row.limit.kind, limit_unit=row.limit.unit, limit_yardstick=best, limit_rate=rates[best],
                    yardstick_rates=rates, achieved_rate=achieved, fraction=achieved / rates[best],
                    strict_fraction=achieved / max(rates.values()))
    line["verdict"] = verdict(line, bars, line["fraction"], line["limit"])
    return line


def case_lines(row: Row, case: Case, threads: int, warmup: int, rounds: int, min_sample_s: float, log) -> list[dict]:
    """Every pass of one case at the current thread count, judged."""
    works: dict[str, dict] = {}

    def extra(p: str) -> dict:
        sticks = row.limit.yardsticks(case, p)
        works[p] = {k: w for k, (_, w) in sticks.items()}
        return {k: fn for k, (fn, _) in sticks.items()}

    rows = cpu.case_rows(row.workload, case, DTYPE, warmup, rounds, min_sample_s, log, passes=row.passes,
                         extra=extra if row.limit is not None else None)
    return [{**judge(row, case, r, works.get(r["pass"])), "threads": threads} for r in rows]


def measure(mode: Mode, threads: Sequence[int] = THREADS, rows: Sequence[Row] = ROWS,
            log=None, cases: Sequence[str] | None = None) -> tuple[list[dict], dict]:
    """(lines, wall seconds per thread count): every row's cases that `mode` times (and whose name contains one of
    `cases`, if given), with its samples, at each thread count; the thread count is restored after."""
    log = log or (lambda msg: print(f"cpu_gap: {msg}", file=sys.stderr, flush=True))
    lines, seconds = [], {}
    for n in threads:
        with torch_threads(n):
            start = time.perf_counter()
            for row in rows:
                for case in row.cases(mode):
                    if cases is not None and not any(c in case.name for c in cases):
                        continue
                    try:
                        lines += case_lines(row, case, n, mode.warmup, mode.rounds, mode.min_sample_s,
                                            lambda msg, n=n: log(f"{n} thread(s): {msg}"))
                    except Exception as error:  # noqa: BLE001 - reported in the table, other cases go on
                        lines.append({"row": row.title, "workload": row.workload.name, "case": case.name,
                                      "pass": "", "threads": n, "error": repr(error), "verdict": "error"})
            seconds[n] = time.perf_counter() - start
    return lines, seconds


def _order(lines: list[dict]) -> list[dict]:
    """Table order: (row, case) as first measured, then pass, then threads (most first), so a case's thread counts
    sit side by side."""
    first: dict = {}
    for i, x in enumerate(lines):
        first.setdefault((x["row"], x["case"]), i)
    return sorted(lines, key=lambda x: (first[x["row"], x["case"]], x["pass"] != FWD, -x["threads"]))


def _limit_cells(x: dict) -> list[str]:
    if x["limit"] is None:
        return ["none (overhead-bound)", "", "", ""]
    return [f"{x['limit']}: {x['limit_rate'] / 1e9:.3g} {x['limit_unit']} ({x['limit_yardstick']})",
            f"{x['achieved_rate'] / 1e9:.3g} {x['limit_unit']}", f"{x['fraction']:.0%}", f"{x['strict_fraction']:.0%}"]


def markdown(lines: list[dict], seconds: dict, mode: Mode, rows: Sequence[Row] = ROWS) -> str:
    out = [f"## {TITLE}", "",
           f"CPU float32; for each thread count torch.set_num_threads(n) and torch.compile recompiled for n threads. "
           f"Median of {mode.rounds} samples per candidate; eager, torch.compile, "
           "diffkern and the row's machine-limit yardsticks taken round-robin in one process. Machine limit: "
           "bandwidth = the row's minimal bytes / diffkern's time over the fastest of a STREAM copy, triad and read "
           "(sum) moving the same bytes at the same threads into preallocated outputs, or, for a pass that returns new "
           "latent-sized tensors (the GRPO loss's dv, the tilted step's projection), the fastest copy and triad into "
           "outputs the call allocates (copy_fresh, triad_fresh: the page faults and zeroing every out-of-place op "
           "pays on this machine's allocator), or, for the NoiseTilt fused step, its own sweeps over the same arrays "
           "(fwd: read 3 latents, write 1; bwd: read 1, write 2; plain or streaming stores, outputs allocated once: "
           "diffkern.bench.machine.pass_calls), its training step's sweeps run as an empty autograd Function of the "
           "op's arity (+autograd: diffkern.bench.autograd_floor, what any autograd op pays); the next column holds "
           "diffkern against the fastest yardstick of all, preallocated ones included; GEMM = the op's "
           "matrix-product FLOPs / diffkern's time over torch.mm/bmm running one block evaluation's products at the "
           "op's shapes and threads. Verdict: met "
           f"(every bar), at machine limit (a bar missed, diffkern at >= {LIMIT_FRACTION:.0%} of the limit), not "
           "met.", "",
           "| row | case | pass | threads | eager ms | torch.compile ms | diffkern ms | eager/diffkern | "
           "compile/diffkern | bars | machine limit | diffkern at | fraction | of the fastest yardstick | verdict |",
           "|" + "---|" * 15]
    for x in _order([x for x in lines if "error" not in x]):
        out.append("| " + " | ".join([
            x["row"], x["case"], x["pass"], str(x["threads"]), f"{x['eager_ms']:.3g}", f"{x['compile_ms']:.3g}",
            f"{x['diffkern_ms']:.3g}", f"{x['eager_over_diffkern']:.2f}x", f"{x['compile_over_diffkern']:.2f}x",
            ", ".join(x["bars"]), *_limit_cells(x), f"**{x['verdict']}**"]) + " |")
    out.append("")
    out += [f"- {x['row']}, {x['case']}, {x['threads']} thread(s): **failed**: `{x['error']}`"
            for x in lines if "error" in x]
    counts = {v: sum(x["verdict"].startswith(v) for x in lines)
              for v in ("met", "at machine limit", "not met", "error")}
    out.append("Lines: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n) + ".")
    if not mode.time_all:
        left = [f"{r.title} {c.name}" for r in rows for c in r.workload.cases(mode.quick) if c not in r.cases(mode)]
        if left:
            out.append(f"Timed in the full run only (make bench FULL=1): {'; '.join(left)}.")
    out.append("Section wall time: " + ", ".join(f"{n} thread(s) {s:.0f} s" for n, s in seconds.items()) + ".")
    return "\n".join(out) + "\n"


def select(titles: Sequence[str] | None) -> tuple[Row, ...]:
    """The rows whose title contains any of `titles` (case-insensitive; None: every row); ValueError if none does."""
    if titles is None:
        return ROWS
    picked = tuple(r for r in ROWS if any(t.lower() in r.title.lower() for t in titles))
    if not picked:
        raise ValueError(f"rows: no row title contains any of {list(titles)}; titles: {[r.title for r in ROWS]}")
    return picked


def report(quick: bool, out: str | None, mode: Mode | None = None, threads: Sequence[int] = THREADS,
           rows: Sequence[Row] = ROWS, cases: Sequence[str] | None = None) -> str:
    """The harness's REPORT_MODULES entry: measures `rows` (their cases named by `cases`, if given) at `threads` in
    `mode` (the harness's run; None: the quick run if `quick`, else the full one), writes cpu_gap.json / cpu_gap.md
    to `out` (if given) and returns the Markdown."""
    mode = mode or MODES["quick" if quick else "full"]
    lines, seconds = measure(mode, threads, rows, cases=cases)
    md = markdown(lines, seconds, mode, rows)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "cpu_gap.json"), "w") as f:
            json.dump({"mode": mode.name, "threads": list(threads), "lines": lines,
                       "seconds": seconds}, f, indent=1, default=str)
        with open(os.path.join(out, "cpu_gap.md"), "w") as f:
            f.write(md)
    return md


def main(argv=None) -> None:
    """`python -m diffkern.bench.cpu_gap [--quick | --default] [--out DIR] [--rows TEXT ...] [--cases TEXT ...]
    [--threads N ...]`: the section alone, printed (default: every row's full cases, the full run's samples, 2 and 1
    threads)."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    runs = ap.add_mutually_exclusive_group()
    runs.add_argument("--quick", action="store_true")
    runs.add_argument("--default", action="store_true", help="the cases and samples of the default make bench")
    ap.add_argument("--out", default=None, help="folder for cpu_gap.json and cpu_gap.md")
    ap.add_argument("--rows", nargs="+", default=None, metavar="TEXT",
                    help="only the rows whose title contains one of these (case-insensitive), e.g. NTRK 'DAR whole'")
    ap.add_argument("--cases", nargs="+", default=None, metavar="TEXT",
                    help="only the cases whose name contains one of these (case-sensitive), e.g. S=4 B=4")
    ap.add_argument("--threads", type=int, nargs="+", default=list(THREADS))
    args = ap.parse_args(argv)
    mode = MODES["quick"] if args.quick else MODES["default"] if args.default else MODES["full"]
    print(report(mode.quick, args.out, mode, args.threads, select(args.rows), args.cases))


if __name__ == "__main__":
    main()
