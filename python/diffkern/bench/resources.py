"""Compiled resource use of diffkern's Triton and CUDA C++ kernels for a GPU arch (sm_90a), with no GPU needed.

Each Triton launch configuration a benchmark case uses is compiled ahead of time (diffkern.testing.aot),
and the CUDA C++ kernels as the build compiles them (nvcc, when installed); ptxas reports registers,
spills, stack frame and shared memory (static shared memory only for the CUDA kernels).
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from .workload import Workload


def _used_specs(workload: Workload, quick: bool, dtype: torch.dtype) -> list[tuple[object, list[str]]]:
    """(spec, names of the cases that launch it); every spec if none is matched (specs without tags). Of a kernel's
    autotune candidates only the first, the one the interpreter's counts run, is listed."""
    specs = [s for s in workload.aot_specs() if s.tags.get("candidate", 0) == 0]
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
        log(f"{workload.name}: resources of {spec.name} for compute capability {arch}: "
            f"{'failed' if 'error' in row else 'compiled'}")
    return out + cuda_rows(workload, dtype, arch, log)


CUDA_TYPE = {torch.bfloat16: "__nv_bfloat16", torch.float16: "__half", torch.float32: "float"}


def cuda_rows(workload: Workload, dtype: torch.dtype, arch: int, log=print) -> list[dict]:
    """The workload's CUDA C++ kernels instantiated for `dtype` latents, and those with no dtype (none without nvcc)."""
    from diffkern.testing import nvcc
    from diffkern.testing.aot import sm_arch
    compiler = nvcc.find_nvcc()
    if not workload.cuda_sources or compiler is None:
        return []
    kernels = {k for src in workload.cuda_sources for k in nvcc.kernel_names(nvcc.ROOT / "csrc" / "cuda" / src)}
    try:
        found = nvcc.resources(nvcc.shipped_reports(compiler), sm_arch(arch))
    except AssertionError as error:  # a compile failure is a finding, shown in the table
        return [{"name": f"CUDA {', '.join(workload.cuda_sources)}", "error": str(error)}]
    rows = [dict(r, name=f"CUDA {r['name']}", num_warps=workload.cuda_warps) for r in found
            if r["name"].split("<")[0] in kernels and ("<" not in r["name"] or f"<{CUDA_TYPE[dtype]}" in r["name"])]
    log(f"{workload.name}: resources of {len(rows)} CUDA kernels of {', '.join(workload.cuda_sources)} for compute "
        f"capability {arch}")
    return rows
