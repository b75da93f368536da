"""What the harness needs to know about one op: its shapes, inputs, the two calls, and its bars.

A later op plugs in by adding a module beside `dar.py` that defines `WORKLOADS` and naming it in
`WORKLOAD_MODULES`; every section of the report (CPU time, traffic, resources, GPU time, bars) then
covers it with no other change.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._pytree import tree_leaves

WORKLOAD_MODULES = ("dar", "grpo", "ntrk")
# Sections that do not fit the one-op workload model (whole-network memory and timing, forward-only ops,
# ops without a Triton backward): diffkern.bench modules with report(quick, out, mode=None) -> Markdown
# (mode: the harness's diffkern.bench.mode.Mode, for its samples and headline cases; None: the module's
# own defaults), each writing its own .json/.md to `out`; the harness runs them after the workloads.
REPORT_MODULES = ("dar_memory", "dar_model", "rmdm", "sinks", "overhead", "cpu_gap")

# The passes every section reports: forward alone, backward alone, and one training step.
FWD, BWD, STEP = "fwd", "bwd", "fwd+bwd"
# Which runs time a case on the CPU and count its traffic in the Triton interpreter (Workload.timed_in,
# Workload.counted_in; diffkern.bench.mode).
EVERY_RUN, FULL_RUN, NO_RUN = "every run", "full run", "no run"


@dataclass(frozen=True)
class Case:
    """One benchmark shape. `params` names every size; `tokens` is how many tokens (rows) it has."""
    name: str
    params: dict
    tokens: int


@dataclass(frozen=True)
class Bar:
    """A target from the op's issue, checked against every report row that `where` selects.

    `metric` is a column of a section's rows ("cpu" or "traffic"); the bar is met when every selected
    row satisfies `value <op> target`.
    """
    text: str
    section: str
    metric: str
    op: str
    target: float
    passes: tuple[str, ...]
    where: Callable[[Case], bool] = lambda case: True


# The CPU bars every op issue sets: the C++ kernel >= 3x eager and no slower than torch.compile.
CPU_BARS = (
    Bar("CPU kernel >= 3x faster than eager", "cpu", "eager_over_diffkern", ">=", 3.0, (FWD, STEP)),
    Bar("CPU kernel no slower than torch.compile", "cpu", "compile_over_diffkern", ">=", 1.0, (FWD, STEP)),
)


@dataclass(frozen=True)
class Workload:
    """One public op, described for the harness.

    make_args(case, dtype, device) -> the positional arguments of both calls (tensors may be nested
        in lists); every floating tensor among them is an input the backward differentiates.
    diffkern(*args) / reference(*args) -> the output tensor.
    min_bytes(case, itemsize) -> {"fwd": n, "bwd": n}: each input of the public op read once and
        each output written once.
    aot_specs() -> KernelSpecs of its Triton kernels; spec_used(spec, case, dtype) says whether a
        benchmark case in `dtype` launches that configuration.
    cuda_sources: the csrc/cuda/*.cu files of its CUDA C++ kernels; cuda_warps: how their block size is
        chosen, as the resources table shows it.
    modeled_counts(case, dtype) -> None (count the case in the interpreter), or for a case too large for
        it, {"fwd": counts, "bwd": counts} in diffkern.bench.interpreted's format from a model that a
        test holds equal to the interpreter's counts, and "note": what is modeled.
    timed_in(case) -> which runs time the case on the CPU: EVERY_RUN (a headline case) or FULL_RUN.
    counted_in(case) -> which runs count the case in the interpreter: EVERY_RUN; FULL_RUN (a count that
        takes minutes: the default run takes `modeled_counts` instead, or leaves the case out when there is
        no model); NO_RUN (beyond the interpreter: the model only).
    flops(case) -> {"fwd": n, "bwd": n}: the FLOPs of the op's matrix products (2 m n k each; the backward's
        are the products giving every input's gradient), for a GEMM-bound op; None for the others.
    """
    name: str
    title: str
    full_cases: tuple[Case, ...]
    quick_cases: tuple[Case, ...]
    make_args: Callable[[Case, torch.dtype, str], tuple]
    diffkern: Callable
    reference: Callable
    min_bytes: Callable[[Case, int], dict]
    aot_specs: Callable[[], list]
    spec_used: Callable[[object, Case, torch.dtype], bool]
    bars: tuple[Bar, ...] = field(default=())
    cuda_sources: tuple[str, ...] = field(default=())
    cuda_warps: str = ""
    modeled_counts: Callable[[Case, torch.dtype], dict | None] = lambda case, dtype: None
    timed_in: Callable[[Case], str] = lambda case: EVERY_RUN
    counted_in: Callable[[Case], str] = lambda case: EVERY_RUN
    flops: Callable[[Case], dict] | None = None

    def cases(self, quick: bool) -> tuple[Case, ...]:
        return self.quick_cases if quick else self.full_cases

    def case(self, name: str, quick: bool) -> Case:
        return next(c for c in self.cases(quick) if c.name == name)


def grad_leaves(args) -> list[torch.Tensor]:
    """The floating-point tensors among `args`: the inputs a training step differentiates."""
    return [t for t in tree_leaves(args) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def requiring_grad(args):
    """`args` with every floating tensor made a leaf that requires grad."""
    def leaf(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.detach().requires_grad_(True)
        if isinstance(x, (list, tuple)):
            return type(x)(leaf(y) for y in x)
        return x
    return tuple(leaf(a) for a in args)


def forward_call(fn: Callable, args) -> Callable[[], object]:
    """One inference forward: `fn(*args)` under no_grad."""
    def call():
        with torch.no_grad():
            return fn(*args)
    return call


def step_call(fn: Callable, args, dout: torch.Tensor) -> Callable[[], object]:
    """One training step: forward, then the gradients of every input by torch.autograd.grad (nothing
    accumulates, so nothing needs zeroing between calls)."""
    leaves = grad_leaves(args)

    def call():
        return torch.autograd.grad(fn(*args), leaves, dout)
    return call


def registered() -> list[Workload]:
    """Every workload, in report order."""
    return [w for mod in WORKLOAD_MODULES
            for w in importlib.import_module(f"{__package__}.{mod}").WORKLOADS]
