"""DARRouter: DAR routing of a whole network's residual stream, full or chunked (specs/dar.md).

A model calls the router once per sublayer input and once before its output head:

    hist = router.begin(x0)                  # x0: the patch embedding [B, T, d]
    for l, sublayer in enumerate(sublayers):
        hist.append(sublayer(router(hist, l, cond)))
    h_final = router.final(hist, cond)

Sources of sublayer l (0-based; o_i is sublayer i's output, S the chunk size, j = l // S its chunk):
    full scheme (chunk_size=None):  [x0, o_0, ..., o_{l-1}]
    chunked:                        [c_0, ..., c_j, o_{jS}, ..., o_{l-1}]
where c_0 = x0 and c_k (k >= 1) summarises chunk k-1: the sum of its S outputs ("sum", the default)
or its last output ("last"). The final aggregator routes over every summary and all raw outputs of
the last chunk. With S=4 and 56 sublayers that is at most 18 sources per op instead of 57.

Memory. An op's backward needs the sources it routed over, so without recomputation the chunked
scheme keeps every raw output for backward, as the full scheme does. `DARRouter.run(...,
recompute=True)` runs each chunk's sublayers (and their in-chunk routing) under activation
checkpointing: autograd then keeps the summaries, each chunk's first sublayer input (saved by the
op that forms the chunk's summary, outside the checkpoint) and the last chunk's raw outputs.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .. import _checks
from .gather import gather

QUERIES = ("static", "timestep", "dynamic")
SUMMARIES = ("sum", "last")


def _entry(module: nn.Module, name: str, p: int) -> torch.Tensor:
    """module.<name>[p] (a ParameterList) for an index in range by construction, without ParameterList.__getitem__'s
    index normalisation nor nn.Module.__getattr__ (together, paid twice per routing op, they cost as much as the
    rest of the router's Python). The entry is read where the modules registered it (the list in module._modules,
    the tensor in the list's _parameters), so functional_call's, load_state_dict's and a replaced list are seen."""
    return module._modules[name]._parameters[str(p)]


class DARHistory:
    """The sources of one forward pass: the embedding, the sublayer outputs and the chunk summaries.

    Tensors are kept by reference (never stacked or copied); a summary is written once, by the
    routing op of the first sublayer after its chunk ends (`diffkern.dar.dar_gather`). Raw outputs of
    a finished chunk are dropped from the history as soon as its summary exists, so they stay alive
    only if autograd saved them.
    """

    def __init__(self, x0: torch.Tensor, chunk_size: int | None):
        if x0.dim() != 3:
            raise ValueError(f"DARRouter.begin: x0 must be [B, T, d], got shape {list(x0.shape)}")
        self.x0 = x0
        self.chunk_size = chunk_size
        self.outputs: list[torch.Tensor | None] = []
        self.summaries: list[torch.Tensor] = [x0]
        self.newest = x0

    def __len__(self) -> int:
        return len(self.outputs)

    def append(self, out: torch.Tensor) -> None:
        """Records the output of the next sublayer (after its adaLN gate), [B, T, d] like x0."""
        if out.shape != self.x0.shape:
            raise ValueError(f"DARHistory.append: sublayer output {len(self.outputs)} has shape {list(out.shape)} "
                             f"but x0 has shape {list(self.x0.shape)}")
        self.outputs.append(out)
        self.newest = out

    def chunk_outputs(self, j: int, end: int) -> list[torch.Tensor]:
        """Raw outputs of chunk j up to (excluding) sublayer `end`."""
        return list(self.outputs[j * self.chunk_size:end])

    def add_summary(self, c: torch.Tensor, j: int) -> None:
        """Records c_j (the summary of chunk j-1) and releases that chunk's raw outputs."""
        self.summaries.append(c)
        S = self.chunk_size
        self.outputs[(j - 1) * S:j * S] = [None] * S


class DARRouter(nn.Module):
    """Depth-adaptive routing for `n_sublayers` sublayer inputs plus the final aggregate.

    Args:
        d: hidden size.
        n_sublayers: number of routed sublayers L (a DiT block has two: attention and MLP).
        chunk_size: S, sublayers per chunk; None for the full scheme (every earlier output is a source).
        query: "static" (q = w_l), "timestep" (q = w_l + e_l(cond)) or "dynamic" (q = W_q^(l) v_{l-1},
            v_{l-1} the newest source).
        cond_dim: size of the conditioning vector cond [B, cond_dim] (query="timestep" only).
        eps: RMSNorm epsilon of the routing keys.
        summary: chunk summary rule, "sum" (default) or "last".
    Parameters, per routing position p = 0..L (p = L is the final aggregator), all initialised so that
    routing starts uniform: gain[p] = g_p [d] (ones); query_weight[p] = w_p [d] (zeros; static and
    timestep); time_embed[p] = e_p, Linear(cond_dim, d) (zeros; timestep); query_proj[p] = W_q^(p),
    Linear(d, d, bias=False) (zeros; dynamic). One tensor per position (not one stacked tensor indexed
    per op), so each op's parameter gradients land in their own tensors without scatter passes.
    """

    def __init__(self, d: int, n_sublayers: int, chunk_size: int | None = 4, query: str = "static",
                 cond_dim: int | None = None, eps: float = 1e-6, summary: str = "sum"):
        super().__init__()
        d, n_sublayers = _checks.integer("DARRouter", "d", d), _checks.integer("DARRouter", "n_sublayers", n_sublayers)
        if chunk_size is not None:
            chunk_size = _checks.integer("DARRouter", "chunk_size", chunk_size)
        if query not in QUERIES:
            raise ValueError(f"DARRouter: query must be one of {QUERIES}, got {query!r}")
        if summary not in SUMMARIES:
            raise ValueError(f"DARRouter: summary must be one of {SUMMARIES}, got {summary!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"DARRouter: chunk_size must be >= 1 or None, got {chunk_size}")
        if n_sublayers < 1 or d < 1:
            raise ValueError(f"DARRouter: d and n_sublayers must be >= 1, got d={d}, n_sublayers={n_sublayers}")
        if query == "timestep" and not cond_dim:
            raise ValueError("DARRouter: query='timestep' needs cond_dim (the size of the conditioning vector)")
        self.d, self.n_sublayers, self.chunk_size = d, n_sublayers, chunk_size
        self.query, self.summary, self.eps = query, summary, _checks.number("DARRouter", "eps", eps)
        n_pos = n_sublayers + 1
        self.gain = nn.ParameterList([torch.ones(d) for _ in range(n_pos)])
        if query == "dynamic":
            self.query_proj = nn.ModuleList([nn.Linear(d, d, bias=False) for _ in range(n_pos)])
        else:
            self.query_weight = nn.ParameterList([torch.zeros(d) for _ in range(n_pos)])
        if query == "timestep":
            self.time_embed = nn.ModuleList([nn.Linear(cond_dim, d) for _ in range(n_pos)])
        self.cond_dim = cond_dim
        with torch.no_grad():
            for linear in (*getattr(self, "query_proj", ()), *getattr(self, "time_embed", ())):
                linear.weight.zero_()
                if linear.bias is not None:
                    linear.bias.zero_()

    def extra_repr(self) -> str:
        return (f"d={self.d}, n_sublayers={self.n_sublayers}, chunk_size={self.chunk_size}, query={self.query!r}, "
                f"summary={self.summary!r}")

    def begin(self, x0: torch.Tensor) -> DARHistory:
        """A new history for one forward pass, starting from the patch embedding x0 [B, T, d]."""
        if _checks.tensor("DARRouter.begin", "x0", x0).dim() == 3 and x0.shape[-1] != self.d:
            raise ValueError(f"DARRouter.begin: x0 must have d={self.d} features, got shape {list(x0.shape)}")
        return DARHistory(x0, self.chunk_size)

    def _q(self, p: int, hist: DARHistory, cond: torch.Tensor | None) -> torch.Tensor:
        """The query of routing position p: [d], [B, d] or [B, T, d]."""
        if self.query == "dynamic":
            v = hist.newest
            return F.linear(v, self.query_proj[p].weight.to(v.dtype))
        if self.query == "static":
            return _entry(self, "query_weight", p)
        if cond is None or cond.dim() != 2 or cond.shape[-1] != self.cond_dim:
            got = None if cond is None else list(cond.shape)
            raise ValueError(f"DARRouter: query='timestep' needs cond [B, {self.cond_dim}], got {got}")
        e = self.time_embed[p]
        return _entry(self, "query_weight", p) + e(cond.to(e.weight.dtype))

    def _route(self, p: int, hist: DARHistory, sources, addends, cond):
        src = hist.x0
        q, gain = self._q(p, hist, cond), _entry(self, "gain", p)
        allowed = (src.dtype, torch.float32 if src.dtype != torch.float64 else torch.float64)
        q = q if q.dtype in allowed else q.to(src.dtype)
        gain = gain if gain.dtype in allowed else gain.to(src.dtype)
        return gather(sources, addends, q, gain, self.eps)

    def forward(self, hist: DARHistory, l: int, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The input h_l [B, T, d] of sublayer l; call after the outputs of sublayers 0..l-1 were appended."""
        if not 0 <= l < self.n_sublayers:
            raise ValueError(f"DARRouter: sublayer index must be in [0, {self.n_sublayers}), got {l}")
        if len(hist) != l:
            raise ValueError(f"DARRouter: routing sublayer {l} needs the outputs of sublayers 0..{l - 1} in the "
                             f"history, which holds {len(hist)}")
        S = self.chunk_size
        if S is None:
            return self._route(l, hist, [hist.x0, *hist.outputs], [], cond)[0]
        j, r = divmod(l, S)
        if r > 0 or j == 0:
            return self._route(l, hist, [*hist.summaries, *hist.chunk_outputs(j, l)], [], cond)[0]
        pending = hist.chunk_outputs(j - 1, l)  # chunk j-1 just ended: its summary c_j joins the sources
        if self.summary == "last" or len(pending) == 1:
            hist.add_summary(pending[-1], j)
            return self._route(l, hist, list(hist.summaries), [], cond)[0]
        h, c = self._route(l, hist, list(hist.summaries), pending, cond)
        hist.add_summary(c, j)
        return h

    def final(self, hist: DARHistory, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The final aggregate [B, T, d] over all summaries and the last chunk's raw outputs (full: all sources)."""
        L = self.n_sublayers
        if len(hist) != L:
            raise ValueError(f"DARRouter.final: needs all {L} sublayer outputs in the history, which holds {len(hist)}")
        if self.chunk_size is None:
            sources = [hist.x0, *hist.outputs]
        else:
            sources = [*hist.summaries, *hist.chunk_outputs((L - 1) // self.chunk_size, L)]
        return self._route(L, hist, sources, [], cond)[0]

    def run(self, x0: torch.Tensor, sublayers: Sequence[Callable[[torch.Tensor], torch.Tensor]],
            cond: torch.Tensor | None = None, recompute: bool = False) -> torch.Tensor:
        """The final aggregate of a whole stack: o_l = sublayers[l](h_l), h_l routed as in `forward`.

        recompute=True (chunked routing only) checkpoints each chunk: its sublayers and in-chunk routing
        run again in backward, and autograd keeps about N + S stream tensors instead of L (see the module
        docstring). The sublayers must then be deterministic given their input and RNG state (dropout is
        replayed by torch.utils.checkpoint); with query="dynamic" each chunk also keeps the previous
        chunk's last output (the input of the query projection of its first sublayer).
        """
        L = self.n_sublayers
        if len(sublayers) != L:
            raise ValueError(f"DARRouter.run: needs {L} sublayers, got {len(sublayers)}")
        if recompute and self.chunk_size is None:
            raise ValueError("DARRouter.run: recompute=True needs chunked routing (chunk_size is None)")
        hist = self.begin(x0)
        if not recompute:
            for l, sublayer in enumerate(sublayers):
                hist.append(sublayer(self(hist, l, cond)))
            return self.final(hist, cond)
        for l0 in range(0, L, self.chunk_size):
            h = self(hist, l0, cond)  # forms the previous chunk's summary: outside, so its addends are not kept
            outs = torch.utils.checkpoint.checkpoint(self._chunk, sublayers, l0, cond, h, *hist.summaries,
                                                     use_reentrant=False)
            for out in outs:
                hist.append(out)
        return self.final(hist, cond)

    def _chunk(self, sublayers, l0: int, cond, h: torch.Tensor, *summaries: torch.Tensor) -> tuple:
        """The outputs of the chunk starting at sublayer l0, given its first input h and the summaries so far."""
        local = DARHistory(summaries[0], self.chunk_size)
        local.summaries = list(summaries)
        local.outputs = [None] * l0
        for l in range(l0, min(self.n_sublayers, l0 + self.chunk_size)):
            local.append(sublayers[l](h if l == l0 else self(local, l, cond)))
        return tuple(local.outputs[l0:])
