"""The roofline of every kernel a call launches: its launches, bytes, FLOPs and predicted H100 time.

Input: one pass's counts in diffkern.bench.counts' format, counted in the interpreter or modeled from the launch
geometry. Per kernel (its launches summed):
  bytes      bytes_loaded + bytes_stored of its active lanes (a re-read counts again: no caches)
  flops      2 m n k over every tl.dot its programs run, at the dots' block shapes (TritonMonitor)
  precision  what its dots run at on a GPU for the inputs' dtype (diffkern._dot's policy: bf16/fp16, tf32,
             tf32x3; "-" for a kernel without dots)
  h100_us    max(bytes / 3.35 TB/s, flops / the precision's H100 peak), in us; from the summed bytes and flops,
             so for a kernel whose launches differ in shape it is a lower bound of the launches' own sum
  bound      which roof sets that time
The aten ops diffkern runs around its kernels are one more row ("aten glue": their kernels, their bytes; their
FLOPs are not counted, so that row's time is the bytes', and a total's FLOPs are its kernels'). The op's total
is the sum over every row (launches one after the other) and stands beside the op-level minimum
(diffkern.bench.roofline: each input read once, each output written once, the formula's FLOPs at the bf16 peak).
"""
from __future__ import annotations

import torch

from .roofline import Roofline, dot_peak, dot_precision, roofline
from .traffic import source
from .workload import BWD, FWD, STEP, Workload

GLUE = "aten glue"
TOTAL = "total"


def kernels(counts: dict) -> dict[str, dict]:
    """{kernel name: {launches, programs, bytes_loaded, bytes_stored[, flops]}} from `kernel.<name>.<stat>` keys."""
    out: dict[str, dict] = {}
    for key, value in counts.items():
        if key.startswith("kernel."):
            name, stat = key[len("kernel."):].rsplit(".", 1)
            out.setdefault(name, {})[stat] = value
    return out


def _row(name: str, launches: int, nbytes: int, flops: int | None, dtype: torch.dtype) -> dict:
    """One kernel's figures; flops None: not counted (the time is then the bytes')."""
    precision = dot_precision(dtype) if flops else "-"
    roof = Roofline(flops, nbytes, dot_peak(dtype)) if flops else Roofline(0, nbytes)
    return dict(kernel=name, launches=launches, bytes=nbytes, flops=flops, precision=precision,
                h100_us=roof.h100_s() * 1e6, bound=roof.bound())


def pass_rows(counts: dict, dtype: torch.dtype) -> list[dict]:
    """A row per kernel of one pass's counts (sorted by name), then the aten glue row where there is glue."""
    rows = [_row(name, k["launches"], k["bytes_loaded"] + k["bytes_stored"], k.get("flops"), dtype)
            for name, k in sorted(kernels(counts).items())]
    if counts.get("glue.kernels"):
        rows.append(_row(GLUE, counts["glue.kernels"], counts["glue.bytes_read"] + counts["glue.bytes_written"],
                         None, dtype))
    return rows


def total(rows: list[dict], minimum: Roofline | None) -> dict:
    """The op's total over `rows` (launches one after the other; FLOPs: the rows' that are counted) beside its
    op-level minimum roofline, if any."""
    out = dict(kernel=TOTAL, launches=sum(r["launches"] for r in rows), bytes=sum(r["bytes"] for r in rows),
               flops=sum(r["flops"] or 0 for r in rows), h100_us=sum(r["h100_us"] for r in rows))
    if minimum is not None:
        out.update(min_h100_us=minimum.h100_s() * 1e6, min_bound=minimum.bound(),
                   over_min=out["h100_us"] / (minimum.h100_s() * 1e6))
    return out


def rows(workload: Workload, quick: bool, counted: list[dict], dtype: torch.dtype) -> list[dict]:
    """Per case: per pass (fwd, bwd) a row per kernel and the total; fwd+bwd its total alone. Every row says its
    source (counted or modeled); a case without counts is one row saying why."""
    by_case = {c["case"]: c for c in counted}
    out = []
    for case in workload.cases(quick):
        entry = by_case.get(case.name, {"error": "not counted"})
        if "counts" not in entry:
            reason = {k: entry[k] for k in ("error", "not_counted") if k in entry} or {"error": "no counts"}
            out.append({"case": case.name, "pass": STEP, **reason})
            continue
        try:
            minimum = roofline(workload, case, dtype.itemsize)
        except KeyError:
            minimum = None
        passes = {p: pass_rows(entry["counts"][p], dtype) for p in (FWD, BWD)}
        for p, per_kernel in passes.items():
            for r in [*per_kernel, total(per_kernel, None if minimum is None else minimum[p])]:
                out.append({"case": case.name, "pass": p, "source": source(entry), **r})
        step = total(passes[FWD] + passes[BWD], None if minimum is None else minimum[STEP])
        out.append({"case": case.name, "pass": STEP, "source": source(entry), **step})
    return out


NOTE = ("Per kernel, its launches summed: bytes = its active lanes' loads and stores (TritonMonitor in the "
        "interpreter, or the workload's tested model of those counts); FLOPs = 2 m n k of every tl.dot its programs "
        "run, at block shape; predicted H100 time = max(bytes / 3.35 TB/s, FLOPs / the H100's dense peak at the "
        "precision its dots run on a GPU for this dtype: bf16/fp16 990, tf32 495, tf32x3 165, fp32 67 TFLOP/s). "
        "aten glue = the aten ops diffkern runs around its kernels (their FLOPs not counted: a total's FLOPs are its "
        "kernels'). total = every row's time added (launches back to back, no overlap, no launch latency); op "
        "minimum = the op-level roofline (each input read once, each output written once, the formula's FLOPs at "
        "990 TFLOP/s). The CUDA C++ kernels are not in this table (the harness counts their bytes per pass, in the "
        "traffic table).")
