"""The op calls the GPU check times, at their real shapes: the benchmark's workloads (DiT-XL/2 routing,
Wan Flow-GRPO loss, FLUX/Wan NoiseTilt, Sudoku R-MDM) and the ops it has no workload for (dar_gather at
the same routing shape, flow_sde_step and twoos_project at the same latents, sink_mass, sink_attention and
sink_attention_given at SD3's N = 4096 + 333 tokens). whiten (the 2OS kernels again) and twoos_bands (host tables)
are not timed.

Each `TimedCall` names the registry ops its call runs, so the GPU backends it can be forced onto are those
every one of them has (`backends`), and whether the issue's memory-bound bars apply to it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _registry
from ..bench import dar, grpo, ntrk, rmdm
from ..bench.workload import BWD, FWD, STEP, Case, Workload
from ..dar import dar_gather
from ..dar.reference import dar_gather_reference
from ..grpo import flow_sde_step
from ..grpo import reference as grpo_reference
from ..ntrk.api import twoos_project
from ..sinks import reference as sinks_reference
from ..sinks.op import sink_attention, sink_attention_given, sink_mass

SD3 = dict(B=2, H=24, n_query=4096, n_text=333, d=64)


@dataclass(frozen=True)
class TimedCall:
    """One op call to time: the workload (its args, diffkern and eager calls, min bytes), the case, the
    passes timed (fwd, and fwd+bwd for differentiable ops), the registry ops it runs, and whether it is
    one of the issue's memory-bound ops (>= 80% of copy bandwidth, >= 1.5x torch.compile)."""
    workload: Workload
    case: Case
    passes: tuple[str, ...]
    registry_ops: tuple[str, ...]
    memory_bound: bool

    @property
    def name(self) -> str:
        return f"{self.workload.name} {self.case.name}"

    def backends(self) -> tuple[str, ...]:
        """The GPU backends (in the registry's preference order) that every op of the call has in this build."""
        return tuple(b for b in _registry.GPU_PREFERENCE
                     if all(b in _registry.available(op) for op in self.registry_ops) and _registry._built(b))


def _no_specs():
    return []


def _gather_case(n: int, a: int, B: int, T: int, d: int) -> Case:
    return Case(f"n={n}+{a} B={B} T={T} d={d}", dict(n=n, a=a, B=B, T=T, d=d), B * T)


def _gather_args(case: Case, dtype: torch.dtype, device: str):
    p = case.params
    sources, q, gain = dar._make_args(dar._case(p["n"] + p["a"], p["B"], p["T"], p["d"]), dtype, device)
    return sources[:p["n"]], sources[p["n"]:], q, gain


def _gather_min_bytes(case: Case, itemsize: int) -> dict:
    """fwd: n sources, a addends, q, gain read, h and c written; bwd (the gradient through h): dh read, the
    gradients of every input written."""
    p = case.params
    stream, small = p["B"] * p["T"] * p["d"], p["B"] * p["d"] + p["d"]
    inputs = (p["n"] + p["a"]) * stream + small
    return {FWD: itemsize * (inputs + 2 * stream), BWD: itemsize * (stream + inputs)}


# DiT-XL/2 chunked routing (S=4): a chunk's routing op reads the 15 sources before it and forms the new
# chunk summary from its 3 sublayer outputs (diffkern.gpu_check.cases' real dar_gather case, at the bench's B).
GATHER = Workload(
    name="dar_gather", title="DAR chunked gathering (dar_gather, the gradient through h)",
    full_cases=(_gather_case(15, 3, **dar.SITXL),), quick_cases=(), make_args=_gather_args,
    diffkern=lambda sources, addends, q, gain: dar_gather(sources, addends, q, gain)[0],
    reference=lambda sources, addends, q, gain: dar_gather_reference(sources, addends, q, gain)[0],
    min_bytes=_gather_min_bytes, aot_specs=_no_specs, spec_used=lambda spec, c, dtype: False)


def _forward_only(name, title, cases, make_args, diffkern, eager, min_fwd_bytes) -> Workload:
    return Workload(name=name, title=title, full_cases=cases, quick_cases=cases, make_args=make_args,
                    diffkern=diffkern, reference=eager,
                    min_bytes=lambda c, itemsize: {FWD: min_fwd_bytes(c, itemsize), BWD: 0},
                    aot_specs=_no_specs, spec_used=lambda spec, c, dtype: False)


def _sde_args(case: Case, dtype: torch.dtype, device: str):
    B, D = case.params["B"], case.params["D"]
    gen = torch.Generator().manual_seed(0)
    x, v, eps = (torch.randn(B, D, generator=gen).to(device, dtype) for _ in range(3))
    sigmas = grpo_reference.flow_sigmas()
    steps = torch.arange(B) % 10
    return x, v, sigmas[steps].float().to(device), sigmas[steps + 1].float().to(device), eps


SDE_STEP = _forward_only(
    "flow_sde_step", "Flow-GRPO rollout step (flow_sde_step, eps given)", (grpo._case(8, grpo.WAN_LATENT),), _sde_args,
    lambda x, v, s, sn, eps: flow_sde_step(x, v, s, sn, eps),
    lambda x, v, s, sn, eps: grpo_reference.flow_sde_step(x, v, s, sn, eps, 0, grpo_reference.WAN_STD_COEF),
    # reads x, v, eps; writes x_next, y
    lambda c, itemsize: 5 * c.params["B"] * c.params["D"] * itemsize)


def _project_args(case: Case, dtype: torch.dtype, device: str):
    g = torch.randn(case.params["B"], case.params["N"], generator=torch.Generator().manual_seed(0))
    return g.to(device, dtype), case.params["tile"]


PROJECT = _forward_only(
    "twoos_project", "NoiseTilt 2OS projection (twoos_project)", ntrk.TILTED_WORKLOAD.full_cases, _project_args,
    lambda g, tile: twoos_project(g, tile=tile)[0], ntrk.project_reference,
    # reads g, writes w
    lambda c, itemsize: 2 * c.params["B"] * c.params["N"] * itemsize)


def _sink_case(B: int, H: int, n_query: int, n_text: int, d: int) -> Case:
    n = n_query + n_text
    return Case(f"B={B} H={H} N={n} d={d}", dict(B=B, H=H, N_q=n, N_k=n, n_query=n_query, d=d), B * n)


def _sink_args(case: Case, dtype: torch.dtype, device: str):
    p = case.params
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(p["B"], p["H"], p["N_q"], p["d"], generator=gen).to(device, dtype)
                 for _ in range(3)) + (p["n_query"],)


def sink_attention_eager(q, k, v, n_query):
    """Per-head top-1 sink suppression on the image rows from the explicit probability matrix (the
    reference backend's functions composed in plain PyTorch, so torch.compile sees every op)."""
    scale = q.shape[-1] ** -0.5
    mass, _ = sinks_reference.sink_mass(q, k, n_query, scale)
    idx = sinks_reference.sink_topk(mass, 1, True)
    return sinks_reference.sink_suppress(q, k, v, None, None, idx, n_query, scale, -1e4)[0]


MASS = _forward_only(
    "sink_mass", "Attention sink mass (sink_mass, image queries)", (_sink_case(**SD3),), _sink_args,
    lambda q, k, v, n: sink_mass(q, k, n_query=n)[0],
    lambda q, k, v, n: sinks_reference.sink_mass(q, k, n, q.shape[-1] ** -0.5)[0],
    # reads q, k; writes mass [B, H, N_k] and lse [B, H, N_q] (float32)
    lambda c, itemsize: c.params["B"] * c.params["H"] * ((c.params["N_q"] + c.params["N_k"]) * c.params["d"] * itemsize
                                                         + 4 * (c.params["N_q"] + c.params["N_k"])))

def _attention_bytes(c: Case, itemsize: int) -> int:
    """Sink attention's minimal bytes: reads q, k, v; writes out."""
    return c.params["B"] * c.params["H"] * (2 * c.params["N_q"] + 2 * c.params["N_k"]) * c.params["d"] * itemsize


SINKS = _forward_only(
    "sink_attention", "Attention sinks (sink_attention, per-head top-1, image rows)", (_sink_case(**SD3),), _sink_args,
    lambda q, k, v, n: sink_attention(q, k, v, k_sink=1, mode="per_head", row_scope="image", n_query=n),
    sink_attention_eager, _attention_bytes)


def _given_args(case: Case, dtype: torch.dtype, device: str):
    """_sink_args and idx [B, H, 1]: key 0 suppressed in every head (the keys known before the call)."""
    p = case.params
    return _sink_args(case, dtype, device) + (torch.zeros(p["B"], p["H"], 1, dtype=torch.int64, device=device),)


SINKS_GIVEN = _forward_only(
    "sink_attention_given", "Attention sinks, keys given (sink_attention_given, per-head key, image rows)",
    (_sink_case(**SD3),), _given_args,
    lambda q, k, v, n, idx: sink_attention_given(q, k, v, idx, row_scope="image", n_query=n),
    lambda q, k, v, n, idx: sinks_reference.attention_given(q, k, v, idx, n, q.shape[-1] ** -0.5, -1e4),
    _attention_bytes)


def calls() -> list[TimedCall]:
    """Every timed call, at the real shapes (the dry run builds the same list and its rooflines, and times
    nothing): each op's headline case first (the first of its workload's cases), then the others, so a run
    short of time still times every op once."""
    route, (loss_y, loss) = dar.ROUTE, grpo.WORKLOADS
    step, tilted = ntrk.STEP_WORKLOAD, ntrk.TILTED_WORKLOAD
    out = [TimedCall(route, c, (FWD, STEP), ("dar_route_fwd", "dar_route_bwd"), True) for c in route.full_cases]
    out += [TimedCall(GATHER, GATHER.full_cases[0], (FWD, STEP), ("dar_gather_fwd", "dar_gather_bwd"), False)]
    out += [TimedCall(w, c, (FWD, STEP), ("grpo_log_prob", "grpo_log_prob_bwd"), True)
            for w in (loss, loss_y) for c in w.full_cases]
    out += [TimedCall(SDE_STEP, SDE_STEP.full_cases[0], (FWD,), ("flow_sde_step",), True)]
    out += [TimedCall(step, c, (FWD, STEP), ("ntrk_step",), True) for c in step.full_cases]
    for c in tilted.full_cases:
        out += [TimedCall(PROJECT, c, (FWD,), ("twoos_project",), True),
                TimedCall(tilted, c, (FWD, STEP), ("twoos_project", "ntrk_step"), False)]
    out += [TimedCall(rmdm.RECURSE, c, (FWD, STEP), ("rmdm_recurse", "rmdm_recurse_bwd"), False)
            for c in rmdm.RECURSE.full_cases]  # the training step: the Triton forward and backward
    out += [TimedCall(MASS, MASS.full_cases[0], (FWD,), ("sink_mass",), False)]
    out += [TimedCall(SINKS, SINKS.full_cases[0], (FWD,),
                      ("sink_attention_fwd", "sink_mass", "sink_topk", "sink_suppress"), False)]
    out += [TimedCall(SINKS_GIVEN, SINKS_GIVEN.full_cases[0], (FWD,), ("sink_attention_given",), False)]
    return sorted(out, key=lambda call: call.case != call.workload.full_cases[0])
