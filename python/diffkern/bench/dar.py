"""DAR routing (specs/dar.md) described for the harness: SiT-XL/2 shapes, 18 (chunked) and 57 (full) sources.

The query is the timestep-injected variant q [B, d], the paper's headline configuration (static+t).
The interpreter counts both cases in the full run only (minutes each); the default run models them
(dar_route_model).
"""
from __future__ import annotations

import torch
import triton

from .. import _dtypes
from ..dar import dar_route, dar_route_reference
from ..dar.triton_kernels import aot_specs
from . import dar_route_model
from .dar_stack import STACK
from .workload import BWD, CPU_BARS, EVERY_RUN, FULL_RUN, FWD, Bar, Case, Workload

SITXL = dict(B=8, T=256, d=1152)


def _case(n: int, B: int, T: int, d: int) -> Case:
    return Case(f"n={n} B={B} T={T} d={d}", dict(n=n, B=B, T=T, d=d, q="[B,d]"), B * T)


def _make_args(case: Case, dtype: torch.dtype, device: str):
    p = case.params
    gen = None if device == "meta" else torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0, shift=0.0):
        if gen is None:
            return torch.empty(shape, dtype=dtype, device=device)
        return (torch.randn(shape, generator=gen) * scale + shift).to(dtype=dtype, device=device)

    sources = [randn(p["B"], p["T"], p["d"]) for _ in range(p["n"])]
    return sources, randn(p["B"], p["d"]), randn(p["d"], scale=0.1, shift=1.0)


def _min_bytes(case: Case, itemsize: int) -> dict:
    """fwd: n sources + q + gain read, h written; bwd: dh + n sources + q + gain read, their grads written."""
    p = case.params
    stream, q, gain = p["B"] * p["T"] * p["d"], p["B"] * p["d"], p["d"]
    return {FWD: itemsize * (p["n"] * stream + q + gain + stream),
            BWD: itemsize * (stream + 2 * (p["n"] * stream + q + gain))}


def _spec_used(spec, case: Case, dtype: torch.dtype) -> bool:
    """The launchers pick one configuration per dtype and power-of-two BLOCK_D >= d (and q variant)."""
    return (spec.tags.get("dtype") == _dtypes.name(dtype)
            and spec.constexprs.get("BLOCK_D") == max(16, triton.next_power_of_2(case.params["d"]))
            and spec.constexprs.get("DYNAMIC_Q", False) == (case.params["q"] == "[B,T,d]")
            and not spec.constexprs.get("HAS_DLAST", False)
            and spec.constexprs["ALIGNED"])  # the cases' tensors are torch allocations


def _modeled(case: Case, dtype: torch.dtype) -> dict:
    p = case.params
    return {**dar_route_model.route_counts(p["n"], p["B"], p["T"], p["d"], dtype.itemsize),
            "note": "dar_route_model (the kernels' launch geometry and the backward's aten glue, tested equal to the "
                    "interpreter's counts on small shapes); the full run counts the case."}


def _sources(n: int):
    return lambda case: case.params["n"] == n


ROUTE = Workload(
    name="dar_route",
    title="DAR routing (dar_route)",
    full_cases=(_case(18, **SITXL), _case(57, **SITXL)),
    quick_cases=(_case(4, B=2, T=64, d=96),),
    make_args=_make_args,
    diffkern=dar_route,
    reference=dar_route_reference,
    min_bytes=_min_bytes,
    aot_specs=aot_specs,
    spec_used=_spec_used,
    bars=(
        Bar("forward traffic <= 1.10x minimum", "traffic", "diffkern_over_min", "<=", 1.10, (FWD,)),
        Bar("backward traffic <= 1.3x minimum", "traffic", "diffkern_over_min", "<=", 1.3, (BWD,)),
        Bar("eager/diffkern traffic >= 3x at 18 sources", "traffic", "eager_over_diffkern", ">=", 3.0,
            (FWD, BWD), _sources(18)),
        *CPU_BARS,
    ),
    cuda_sources=("dar_route.cu",),
    cuda_warps="by d",
    modeled_counts=_modeled,
    timed_in=lambda case: EVERY_RUN if case.params["n"] == 18 else FULL_RUN,
    counted_in=lambda case: FULL_RUN,
)

WORKLOADS = (ROUTE, STACK)
