"""Real GPU time on a CUDA machine: diffkern (its default GPU backend) vs eager vs torch.compile, bf16.

Times come from triton.testing.do_bench (CUDA events, L2 flushed between calls, median). Each row
also gives the bandwidth that diffkern's modeled traffic implies at the measured time.
"""
from __future__ import annotations

import gc

import torch

from .workload import FWD, STEP, Workload, forward_call, requiring_grad, step_call


def available() -> bool:
    return torch.cuda.is_available()


def device_name() -> str:
    return torch.cuda.get_device_name() if available() else ""


def case_rows(workload: Workload, case, dtype: torch.dtype, traffic_bytes: dict) -> list[dict]:
    from triton.testing import do_bench
    args = workload.make_args(case, dtype, "cuda")
    grad_args = requiring_grad(args)
    torch._dynamo.reset()
    candidates = {"eager": workload.reference, "compile": torch.compile(workload.reference, dynamic=False),
                  "diffkern": workload.diffkern}
    with torch.no_grad():
        dout = torch.randn_like(workload.reference(*args))
    rows = []
    for p in (FWD, STEP):
        ms = {}
        for name, fn in candidates.items():
            call = forward_call(fn, args) if p == FWD else step_call(fn, grad_args, dout)
            call()  # compiles torch.compile's graph outside the timed region
            ms[name] = do_bench(call, warmup=25, rep=100, return_mode="median")
        modeled = traffic_bytes.get(p)
        rows.append({"case": case.name, "pass": p, **{f"{k}_ms": v for k, v in ms.items()},
                     "eager_over_diffkern": ms["eager"] / ms["diffkern"],
                     "compile_over_diffkern": ms["compile"] / ms["diffkern"],
                     "diffkern_tb_per_s": modeled / (ms["diffkern"] * 1e-3) / 1e12 if modeled else None})
    del args, grad_args, candidates
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def rows(workload: Workload, quick: bool, dtype: torch.dtype, traffic_rows: list[dict], log=print) -> list[dict]:
    """GPU rows for every case; `traffic_rows` supply diffkern's modeled bytes per (case, pass)."""
    out = []
    for case in workload.cases(quick):
        modeled = {r["pass"]: r.get("diffkern_bytes") for r in traffic_rows if r["case"] == case.name}
        try:
            out += case_rows(workload, case, dtype, modeled)
        except Exception as error:  # noqa: BLE001 - reported in the table, other cases go on
            out.append({"case": case.name, "pass": STEP, "error": repr(error)})
        log(f"[gpu] {workload.name} {case.name}: done")
    return out
