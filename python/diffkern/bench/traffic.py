"""Modeled GPU memory traffic: diffkern's kernels against the minimum and against the eager reference.

All three figures are counts, not measurements: the minimum from the op's formula (each input read
once, each output written once), diffkern's from its Triton kernels run in the interpreter
(`interpreted`; each row says its source: "counted", or "modeled" from the workload's tested model of those
counts), the eager
reference's from its aten ops (`aten_traffic`, on meta tensors at the full shape). Where an op has CUDA C++ kernels, their count from the host harness is shown beside Triton's. Modeled time = bytes / H100 HBM3 bandwidth: a lower bound for a memory-bound op, not a timing.
"""
from __future__ import annotations

import torch

from .aten_traffic import AtenTraffic
from .roofline import H100_HBM_BYTES_PER_S
from .workload import BWD, FWD, STEP, Workload, grad_leaves, requiring_grad



def eager_counts(workload: Workload, case, dtype: torch.dtype) -> dict:
    """The reference's forward and its backward through autograd, as eager aten kernels."""
    args = requiring_grad(workload.make_args(case, dtype, "meta"))
    with AtenTraffic() as fwd:
        out = workload.reference(*args)
    dout = torch.empty_like(out)
    with AtenTraffic() as bwd:
        torch.autograd.grad(out, grad_leaves(args), dout)
    return {FWD: fwd.traffic, BWD: bwd.traffic}


def _diffkern(counts: dict) -> tuple[int, int, int]:
    """(kernel bytes, glue bytes, launches) of one pass."""
    kernel = counts["triton.bytes_loaded"] + counts["triton.bytes_stored"]
    glue = counts["glue.bytes_read"] + counts["glue.bytes_written"]
    return kernel, glue, counts["triton.launches"] + counts["glue.kernels"]


def _cuda(counts: dict) -> int:
    """The cuda backend's bytes of one pass: its kernels in the harness plus its glue."""
    return counts["cuda.bytes"] + counts["glue.bytes_read"] + counts["glue.bytes_written"]


def _us(nbytes: int) -> float:
    return nbytes / H100_HBM_BYTES_PER_S * 1e6


def source(entry: dict) -> str:
    """Where a case's diffkern figures come from: "counted" (the interpreter ran it) or "modeled"."""
    return "modeled" if "modeled" in entry else "counted"


def rows(workload: Workload, quick: bool, counted: list[dict], dtype: torch.dtype) -> list[dict]:
    """One row per case and pass (fwd, bwd, fwd+bwd), each saying its source (counted or modeled); a case
    this run did not count is one row saying why."""
    by_case = {c["case"]: c for c in counted}
    out = []
    for case in workload.cases(quick):
        entry = by_case.get(case.name, {"error": "not counted"})
        if "error" in entry or "not_counted" in entry:
            out.append({"case": case.name, "pass": STEP, **{k: entry[k] for k in ("error", "not_counted") if k in entry}})
            continue
        minimum = workload.min_bytes(case, dtype.itemsize)
        eager = eager_counts(workload, case, dtype)
        per_pass = {}
        for p in (FWD, BWD):
            kernel, glue, launches = _diffkern(entry["counts"][p])
            per_pass[p] = dict(min_bytes=minimum[p], diffkern_kernel_bytes=kernel, diffkern_glue_bytes=glue,
                               diffkern_launches=launches, eager_bytes=eager[p].bytes,
                               eager_kernels=eager[p].kernels, eager_ops=dict(eager[p].ops))
            if "cuda_counts" in entry:
                per_pass[p]["cuda_bytes"] = _cuda(entry["cuda_counts"][p])
        per_pass[STEP] = {k: per_pass[FWD][k] + per_pass[BWD][k] for k in per_pass[FWD] if k != "eager_ops"}
        for p, r in per_pass.items():
            r["diffkern_bytes"] = r["diffkern_kernel_bytes"] + r["diffkern_glue_bytes"]
            r.update(diffkern_over_min=r["diffkern_bytes"] / r["min_bytes"],
                     eager_over_diffkern=r["eager_bytes"] / r["diffkern_bytes"],
                     modeled_h100_us={"min": _us(r["min_bytes"]), "diffkern": _us(r["diffkern_bytes"]),
                                      "eager": _us(r["eager_bytes"])})
            out.append({"case": case.name, "pass": p, "source": source(entry), **r})
    return out


def note(entries: list[dict]) -> str:
    """The section's note: how each figure is counted, and which cases are counted, modeled or left out."""
    counted = ", ".join(f"{e['case']} {e['interpreter_seconds']:.0f} s" for e in entries
                        if "counts" in e and "modeled" not in e)
    others = "".join(f" {e['case']} is modeled, not counted (source: modeled): {e['modeled']}"
                      for e in entries if "modeled" in e)
    others += "".join(f" {e['case']} is not counted in this run: {e['not_counted']}" for e in entries
                       if "not_counted" in e)
    return ("diffkern bytes = the Triton kernels' active-lane loads and stores (TritonMonitor; a lane that "
            "re-reads an address counts again, caches are not modelled) plus the aten ops the op runs around "
            "them; eager = every aten op's distinct input and output bytes (meta tensors, full shape). "
            f"Cases counted whole in the Triton interpreter: {counted or 'none'}.{others}"
            " CUDA C++ = the cuda backend's kernels run in the host-execution harness, counting each launch's "
            "distinct global bytes (a broadcast or re-read counts once), plus the same aten glue; glue inside "
            "the C++ op (the routing kernels' source tables and 16-bit gain cast) is not seen."
            + "".join(f" CUDA C++ not counted for {e['case']}: {e['cuda_skipped']}." for e in entries
                      if "cuda_skipped" in e))
