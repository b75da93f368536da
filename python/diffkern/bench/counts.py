"""The per-pass counts format every traffic figure of the harness takes, counted or modeled.

    triton.bytes_loaded / bytes_stored / launches      summed over the pass's Triton launches
    kernel.<name>.{launches, programs, bytes_loaded, bytes_stored, flops}   flops: 2 m n k over every tl.dot
                                                                          the kernel's programs run
    glue.bytes_read / bytes_written / kernels, glue.op.<aten op>   the aten ops around the kernels

diffkern.bench.interpreted fills it from the interpreter's monitor and AtenTraffic; the traffic models
(dar_route_model, grpo_model, ntrk_model) from their launch geometry.
"""
from __future__ import annotations


def kernel(programs: int, loaded: int, stored: int, launches: int = 1, flops: int = 0) -> dict:
    """One kernel's statistics, as TritonMonitor.by_kernel() reports them (flops 0: a kernel without tl.dot)."""
    return dict(launches=launches, programs=programs, bytes_loaded=loaded, bytes_stored=stored, flops=flops)


def glue(ops: list[tuple[str, int, int]]) -> dict:
    """The glue counts of modeled aten ops, each (name, bytes read, bytes written)."""
    counts = {"glue.bytes_read": sum(r for _, r, _ in ops), "glue.bytes_written": sum(w for _, _, w in ops),
              "glue.kernels": len(ops)}
    for name, _, _ in ops:
        counts[f"glue.op.{name}"] = counts.get(f"glue.op.{name}", 0) + 1
    return counts


def aten_glue(traffic) -> dict:
    """The glue counts of an AtenTraffic record."""
    return {"glue.bytes_read": traffic.bytes_read, "glue.bytes_written": traffic.bytes_written,
            "glue.kernels": traffic.kernels, **{f"glue.op.{op}": n for op, n in traffic.ops.items()}}


def flat(kernels: dict[str, dict], glue_counts: dict) -> dict:
    """One pass: per-kernel statistics ({name: kernel(...)}) and glue counts, in the format above."""
    counts = {"triton.bytes_loaded": sum(k["bytes_loaded"] for k in kernels.values()),
              "triton.bytes_stored": sum(k["bytes_stored"] for k in kernels.values()),
              "triton.launches": sum(k["launches"] for k in kernels.values()), **glue_counts}
    for name, stats in kernels.items():
        counts.update({f"kernel.{name}.{k}": v for k, v in stats.items()})
    return counts
