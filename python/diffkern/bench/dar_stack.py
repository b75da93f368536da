"""DAR routing across a whole DiT-XL/2 stack, described for the harness: 56 routed sublayers + the final
aggregate per forward (and their backward), full scheme vs chunked (S=4, "sum" summaries).

The sublayers are identities (o_l = h_l), so every byte counted is routing: the routing ops, summary
formation, and autograd summing each source's gradients from the ops that read it. diffkern runs
`diffkern.nn.DARRouter.run`; the eager reference is the same schedule in plain PyTorch (dar_route_reference
per op, each summary a torch sum once its chunk ends). The query is static (q [d] per op).

"Minimum" here is the floor a plain residual stream pays for the same depth: x_{l+1} = x_l + o_l reads
two stream tensors and writes one per sublayer, and its backward adds the branch's input gradient to the
stream gradient (two reads, one write): 3 L stream tensors each way. diffkern_over_min is thus DAR's
traffic in units of the residual stream's.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
from torch import nn

from .. import _dtypes
from ..dar.reference import dar_route_reference
from ..dar.triton_kernels import aot_specs
from ..nn import DARRouter
from .workload import BWD, CPU_BARS, FULL_RUN, FWD, Case, Workload

DITXL = dict(L=56, d=1152)  # DiT-XL/2 / SiT-XL/2: 28 blocks x (attention, MLP), hidden size 1152


def _case(S: int | None, L: int, B: int, T: int, d: int) -> Case:
    scheme = "full" if S is None else f"S={S}"
    return Case(f"{scheme} L={L} B={B} T={T} d={d}", dict(S=S, L=L, B=B, T=T, d=d), B * T)


def _identity(h: torch.Tensor) -> torch.Tensor:
    """A sublayer that returns its input: a plain function, as the eager reference calls none (an nn.Identity per
    sublayer cost 56 module calls, ~30 us of a 1.4 ms forward at 1 thread, that neither eager nor compile pays)."""
    return h


class _Stack(nn.Module):
    def __init__(self, d: int, L: int, S: int | None):
        super().__init__()
        self.router = DARRouter(d, L, chunk_size=S)

    def forward(self, x0):
        return self.router.run(x0, [_identity] * self.router.n_sublayers)


@functools.cache
def _stack(d: int, L: int, S: int | None) -> _Stack:
    """The module, built once per shape on the meta device (its own parameters are replaced by the
    inputs q and gain)."""
    with torch.device("meta"):
        return _Stack(d, L, S)


@contextlib.contextmanager
def _rows_as_parameters(router: DARRouter, q: torch.Tensor, gain: torch.Tensor):
    """The router's per-position query weights and gains replaced by the rows of q and gain inside the block:
    what torch.func.functional_call does, without its generic per-call work (name parsing, untying, one
    accessor call per entry), which at 2 (L + 1) = 114 entries cost a fifth of the forward it wrapped (0.3
    of 1.7 ms, 1 thread) -- a cost of this harness, not of routing a network's own parameters."""
    tables = ((router.query_weight._parameters, q), (router.gain._parameters, gain))
    saved = [dict(params) for params, _ in tables]
    try:
        for params, rows in tables:
            params.update({str(p): x for p, x in enumerate(rows.unbind(0))})
        yield
    finally:
        for (params, _), old in zip(tables, saved):
            params.update(old)


def routed_stack(x0: torch.Tensor, q: torch.Tensor, gain: torch.Tensor, S: int | None) -> torch.Tensor:
    """diffkern: DARRouter.run over L = q.shape[0] - 1 identity sublayers, with q and gain as its parameters."""
    stack = _stack(x0.shape[-1], q.shape[0] - 1, S)
    with _rows_as_parameters(stack.router, q, gain):
        return stack(x0)


def reference_stack(x0: torch.Tensor, q: torch.Tensor, gain: torch.Tensor, S: int | None) -> torch.Tensor:
    """The same schedule, naively: every op stacks its sources (dar_route_reference)."""
    L = q.shape[0] - 1
    outs, summaries = [], [x0]
    for l in range(L + 1):
        if S is None:
            sources = [x0, *outs]
        else:
            j = (l - 1) // S if l == L else l // S
            if len(summaries) == j:  # chunk j-1 has just ended
                summaries.append(sum(outs[(j - 1) * S:j * S]))
            sources = [*summaries, *outs[j * S:l]]
        h = dar_route_reference(sources, q[l], gain[l])
        if l == L:
            return h
        outs.append(h)


def _make_args(case: Case, dtype: torch.dtype, device: str):
    p = case.params
    _stack(p["d"], p["L"], p["S"])  # built here, outside the counted and timed calls
    if device == "meta":
        return (torch.empty(p["B"], p["T"], p["d"], dtype=dtype, device=device),
                torch.empty(p["L"] + 1, p["d"], dtype=dtype, device=device),
                torch.empty(p["L"] + 1, p["d"], dtype=dtype, device=device), p["S"])
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(p["B"], p["T"], p["d"], generator=gen).to(device, dtype)
    q = torch.randn(p["L"] + 1, p["d"], generator=gen).to(device, dtype)
    gain = (1 + 0.1 * torch.randn(p["L"] + 1, p["d"], generator=gen)).to(device, dtype)
    return x0, q, gain, p["S"]


def _min_bytes(case: Case, itemsize: int) -> dict:
    """A residual stream's floor: 3 stream tensors per sublayer, forward and backward."""
    p = case.params
    stream = p["B"] * p["T"] * p["d"] * itemsize
    return {FWD: 3 * p["L"] * stream, BWD: 3 * p["L"] * stream}


def _spec_used(spec, case: Case, dtype: torch.dtype) -> bool:
    """Static q; the backward with a summary gradient only in the chunked scheme."""
    return (spec.tags.get("dtype") == _dtypes.name(dtype)
            and spec.constexprs.get("BLOCK_D") == max(16, triton.next_power_of_2(case.params["d"]))
            and not spec.constexprs.get("DYNAMIC_Q", False)
            and (case.params["S"] is not None or not spec.constexprs.get("HAS_DLAST", False))
            and spec.constexprs["ALIGNED"])  # the cases' tensors are torch allocations


STACK = Workload(
    name="dar_stack",
    title="DAR routing across a DiT-XL/2 stack (56 sublayers + final aggregate), full vs chunked",
    full_cases=(_case(None, B=1, T=8, **DITXL), _case(4, B=1, T=8, **DITXL)),
    quick_cases=(_case(None, L=4, B=1, T=4, d=32), _case(2, L=4, B=1, T=4, d=32)),  # small: compiled in the smoke test
    make_args=_make_args,
    diffkern=routed_stack,
    reference=reference_stack,
    min_bytes=_min_bytes,
    aot_specs=aot_specs,
    spec_used=_spec_used,
    bars=CPU_BARS,
    # torch.compile of a 57-op routing graph and its backward, and thousands of interpreted launches: minutes
    timed_in=lambda case: FULL_RUN,
    counted_in=lambda case: FULL_RUN,
)
