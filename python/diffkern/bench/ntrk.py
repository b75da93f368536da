"""NoiseTilt (specs/ntrk.md) described for the harness: the fused step, and the 2OS projection feeding it.

ntrk_step: x = mu + sigma (sqrt(rho) w + sqrt(1 - rho) eps) with eps given (so all three latents are
  inputs); minimum traffic: read mu, w, eps once and write x once.
ntrk_tilted_step: the sampler's per-step kernels, w = twoos_project(g) (one 2OS pass: sort, sort,
  clip, unsort; g a typical draw, so the pass finds it in the set) then the fused step. g travels in
  a `Guidance`, which the harness does not differentiate (the projection is not differentiable); the
  gradient reaches mu and eps. Minimum traffic: read mu, g, eps and write x (the projection's scratch
  and its output w are extra, and reported per kernel).
Cases: FLUX latents (16 x 128 x 128 = 262,144 per sample, tiles of 256: M = 1024) and Wan video latents
(16 x 21 x 60 x 104 = 2,096,640 per sample, tiles of 256: M = 8190, 8 column chunks of 1024). The
tilted step's video case is modeled (ntrk_model), not counted: the interpreter sorts 2M entries too slowly;
its FLUX case is counted in the full run and modeled in the default one (minutes of sorting).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _dtypes
from ..ntrk import reference
from ..ntrk.api import ntrk_step, twoos_project
from ..ntrk.bands import bands_on
from ..ntrk.triton_kernels import aot_specs, col_chunk, row_geometry
from . import ntrk_model
from .autograd_floor import GRAD, NONE, PER_SAMPLE, floor_call
from .workload import CPU_BARS, EVERY_RUN, FULL_RUN, FWD, NO_RUN, Bar, Case, Workload

FLUX_LATENT, WAN_LATENT = (16, 128, 128), (16, 21, 60, 104)
SIGMA, RHO, TILE = 0.3, 0.5, 256


@dataclass(frozen=True)
class Guidance:
    """The reward gradient of the step (not differentiated) and the 2OS tile."""
    g: torch.Tensor
    tile: int


def _case(B: int, latent: tuple, tile: int = TILE) -> Case:
    D = 1
    for n in latent:
        D *= n
    return Case(f"B={B} N={D}", dict(B=B, N=D, tile=tile, latent="x".join(map(str, latent))), B)


def _randn(gen, shape, dtype, device):
    if device == "meta":
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.randn(shape, generator=gen).to(dtype=dtype, device=device)


def _step_args(case: Case, dtype: torch.dtype, device: str):
    gen = torch.Generator().manual_seed(0)
    shape = (case.params["B"], case.params["N"])
    return tuple(_randn(gen, shape, dtype, device) for _ in range(3))


def _per_sample(x, value):
    return torch.full(x.shape[:1], value, dtype=_dtypes.acc(x.dtype), device=x.device)


def _step_diffkern(mu, w, eps):
    return ntrk_step(mu, SIGMA, w, RHO, eps=eps)


def _step_reference(mu, w, eps):
    return reference.ntrk_step(mu, _per_sample(mu, SIGMA), w, _per_sample(mu, RHO), eps, None)


def _tilted_args(case: Case, dtype: torch.dtype, device: str):
    mu, g, eps = _step_args(case, dtype, device)
    return mu, eps, Guidance(g, case.params["tile"])


def _tilted_diffkern(mu, eps, guidance: Guidance):
    w = twoos_project(guidance.g, tile=guidance.tile, passes=1)[0]
    return ntrk_step(mu, SIGMA, w, RHO, eps=eps)


def project_reference(g, tile: int):
    """twoos_project's one pass in eager PyTorch (g [B, N], N a multiple of `tile`): w in g's dtype."""
    lower, upper = bands_on(g.shape[1] // tile, tile, 1e-4, "normal", None, _dtypes.acc(g.dtype), g.device)
    # one pass, as the kernels make for an input already in the set (no data-dependent loop: the eager
    # traffic count runs this on meta tensors)
    B, (M, D) = g.shape[0], lower.shape
    w = reference.project_pass(g.to(lower.dtype).reshape(B, M, D), lower, upper, clip=True)[0].reshape(g.shape)
    return w.to(g.dtype)


def _tilted_reference(mu, eps, guidance: Guidance):
    w = project_reference(guidance.g, guidance.tile)
    return reference.ntrk_step(mu, _per_sample(mu, SIGMA), w, _per_sample(mu, RHO), eps, None)


def _timed_in(case: Case) -> str:
    """The FLUX case is both NoiseTilt workloads' headline; the video case is timed in the full run."""
    return EVERY_RUN if case.params["latent"] == "x".join(map(str, FLUX_LATENT)) else FULL_RUN


# Above this many entries per sample the interpreter's sorts take too long even for the full run: the case's
# counts come from ntrk_model (tests/test_ntrk_model.py holds it equal to the interpreter's counts). The FLUX
# case's sorts take minutes: counted in the full run, modeled in the default one.
MODEL_ABOVE = 2**20


def _tilted_counted_in(case: Case) -> str:
    return NO_RUN if case.params["N"] > MODEL_ABOVE else FULL_RUN


def _tilted_modeled(case: Case, dtype: torch.dtype) -> dict:
    B, N, tile = case.params["B"], case.params["N"], case.params["tile"]
    return {**ntrk_model.tilted_step_counts(B, N // tile, tile, dtype.itemsize, passes=1),
            "note": "ntrk_model (the kernels' loop structure and the aten glue, tested equal to the interpreter's "
                    "counts on small shapes), with one projection pass (a Gaussian draw is in the set after it)."}


def _step_min_bytes(case: Case, itemsize: int) -> dict:
    """fwd: read mu, w, eps, write x; bwd: read dx, write dw, deps (dmu is dx itself, no byte written:
    csrc/diffkern/autograd_ntrk.cpp)."""
    n = case.params["B"] * case.params["N"] * itemsize
    return {"fwd": 4 * n, "bwd": 3 * n}


def step_passes(case: Case) -> tuple[int, dict]:
    """(elements per latent, the sweeps of each pass): the fused step's forward reads mu, w, eps and writes x in one
    sweep; its fused backward reads dx and writes dw, deps in one (diffkern.bench.machine.pass_calls)."""
    return case.params["B"] * case.params["N"], {"fwd": ((3, 1),), "bwd": ((1, 2),)}


def step_floor(case: Case, forward, backward):
    """The fused step's autograd floor (diffkern.bench.autograd_floor): an empty autograd step over ntrk_step's
    inputs (mu, sigma, w, rho, eps, philox) as the benchmark passes them, mu, w and eps differentiated, running
    forward() in its forward and backward() in its backward."""
    kinds = (GRAD, PER_SAMPLE, GRAD, PER_SAMPLE, GRAD, NONE)
    return floor_call((case.params["B"], case.params["N"]), kinds, forward, backward)


def _tilted_min_bytes(case: Case, itemsize: int) -> dict:
    """fwd: read mu, g, eps, write x; bwd: read dx, write deps (dmu is dx itself; w comes from the projection,
    which is not differentiable)."""
    n = case.params["B"] * case.params["N"] * itemsize
    return {"fwd": 4 * n, "bwd": 2 * n}


def _step_spec_used(spec, case: Case, dtype: torch.dtype) -> bool:
    return spec.tags.get("op") == "step" and spec.tags.get("dtype") == _dtypes.name(dtype) and \
        spec.constexprs["HAS_EPS"]


def _tilted_spec_used(spec, case: Case, dtype: torch.dtype) -> bool:
    M, tile = case.params["N"] // case.params["tile"], case.params["tile"]
    op = spec.tags.get("op")
    if op == "row":
        return spec.tags["dtype"] == _dtypes.name(dtype) and spec.tags["block_d"] == row_geometry(tile)[1]
    if op in ("col", "clip"):
        return spec.tags["chunk"] == col_chunk(M)
    return _step_spec_used(spec, case, dtype)


STEP_WORKLOAD = Workload(
    name="ntrk_step",
    title="NoiseTilt fused step (ntrk_step, eps given)",
    full_cases=(_case(4, FLUX_LATENT), _case(1, WAN_LATENT)),
    quick_cases=(_case(2, (4, 5, 13)),),
    make_args=_step_args,
    diffkern=_step_diffkern,
    reference=_step_reference,
    min_bytes=_step_min_bytes,
    aot_specs=aot_specs,
    spec_used=_step_spec_used,
    timed_in=_timed_in,
    bars=(Bar("fused step reads mu, w, eps once and writes x once (fwd traffic <= 1.01x minimum)", "traffic",
              "diffkern_over_min", "<=", 1.01, (FWD,)), *CPU_BARS),
)

TILTED_WORKLOAD = Workload(
    name="ntrk_tilted_step",
    title="NoiseTilt step with its 2OS projection (twoos_project, one pass, + ntrk_step)",
    full_cases=(_case(1, FLUX_LATENT), _case(1, WAN_LATENT)),
    quick_cases=(_case(2, (4, 8, 8), tile=16),),
    make_args=_tilted_args,
    diffkern=_tilted_diffkern,
    reference=_tilted_reference,
    min_bytes=_tilted_min_bytes,
    aot_specs=aot_specs,
    spec_used=_tilted_spec_used,
    bars=CPU_BARS,
    modeled_counts=_tilted_modeled,
    timed_in=_timed_in,
    counted_in=_tilted_counted_in,
)

WORKLOADS = (STEP_WORKLOAD, TILTED_WORKLOAD)
