"""Compiled resource use of diffkern's Triton kernels for a GPU arch (sm_90a), with no GPU needed.

Each launch configuration a benchmark case uses is compiled ahead of time (diffkern.testing.aot) and
ptxas reports its registers, spills, stack frame and shared memory.
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from .workload import Workload


def _used_specs(workload: Workload, quick: bool, dtype: torch.dtype) -> list[tuple[object, list[str]]]:
    """(spec, names of the cases that launch it); every spec if none is matched (specs without tags)."""
    specs = workload.aot_specs()
    used = [(s, [c.name for c in workload.cases(quick) if workload.spec_used(s, c, dtype)]) for s in specs]
    used = [(s, names) for s, names in used if names]
    return used or [(s, []) for s in specs]


def rows(workload: Workload, quick: bool, dtype: torch.dtype, arch: int, log=print) -> list[dict]:
    """One row per launch configuration: the Resources fields, or the error that stopped its compile."""
    from diffkern.testing.aot import compile_spec
    out = []
    for spec, cases in _used_specs(workload, quick, dtype):
        row = {"name": spec.name, "cases": cases}
        try:
            row.update(asdict(compile_spec(spec, arch)))
        except Exception as error:  # noqa: BLE001 - a config that fails to compile is a finding, shown in the table
            row["error"] = repr(error)
        out.append(row)
        log(f"[resources] {spec.name} for compute capability {arch}: {'failed' if 'error' in row else 'compiled'}")
    return out
