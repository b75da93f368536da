"""Section 4: CUDA-graph capture and replay of every op, and torch.compile(mode="reduce-overhead") on a DAR block.

Per case of cases.catalogue (first dtype), GPU backend and pass (forward; backward where the op has one):
warm up on a side stream, capture one call with torch.cuda.graph, copy new input values (another seed)
into the captured inputs, replay, and compare the outputs with an eager call on those values: bitwise
where the op promises determinism, else within the error model against the eager call. A capture that
raises is a "fail" row naming the op and the error. Then one DAR DiT-XL/2-wide block (diffkern.dar.blocks,
depth 1, weights re-drawn so no sublayer is switched off) under torch.compile(mode="reduce-overhead"),
called on three inputs, against eager within the plain float32 rule of diffkern.testing.numerics.
The dry run lists the same rows as "skip: no CUDA".
"""
from __future__ import annotations

import contextlib
import time

import torch
from torch.utils._pytree import tree_leaves

from .. import _dtypes, backend
from ..testing import contract, numerics
from .cases import OpCase, catalogue
from .context import Context, Row
from .correctness import _backends, _fn, _last_line, same_bits

SECTION = "capture"
WARMUP = 3
REPLAY_SEED = 1
# Share of the time left when the section starts that it may use.
SHARE = 0.3


def _tensor_leaves(args) -> list[torch.Tensor]:
    return [t for t in tree_leaves(list(args)) if isinstance(t, torch.Tensor)]


def capture_replay(case: OpCase, dtype, device, pass_: str, forced) -> tuple[list, list]:
    """(outputs of the replayed graph after new inputs were copied in, eager outputs on those inputs)."""
    fn = _fn(case, dtype, pass_)
    static = case.make(dtype, device, pass_ == "bwd")
    with backend(forced) if forced else contextlib.nullcontext():
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                fn(*static)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = [t for t in contract._tensors(fn(*static))]
        fresh = case.make(dtype, device, pass_ == "bwd", seed=REPLAY_SEED)
        with torch.no_grad():
            for dst, src in zip(_tensor_leaves(static), _tensor_leaves(fresh)):
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize(device)
        replayed = [t.detach().clone() for t in captured]
        eager = [t.detach() for t in contract._tensors(fn(*fresh))]
    return replayed, eager


def _op_rows(ctx: Context, until: float) -> list[Row]:
    rows = []
    for case in (c for c in catalogue(tiny=ctx.dry_run)):
        dtype = case.dtypes[0]
        for pass_ in ("fwd", "bwd") if case.differentiable else ("fwd",):
            for label, forced in _backends(case, ctx, pass_) if not ctx.dry_run else [("gpu backends", None)]:
                name = f"{case.name} {label} {_dtypes.name(dtype)} {pass_}"
                if ctx.device.type != "cuda":
                    rows.append(Row(SECTION, name, "skip", "no CUDA"))
                    continue
                if time.monotonic() > until:
                    rows.append(Row(SECTION, name, "skip", "out of the section's time"))
                    continue
                try:
                    replayed, eager = capture_replay(case, dtype, ctx.device, pass_, forced)
                except Exception as err:  # noqa: BLE001 - the op does not capture: a fail row, the others go on
                    rows.append(Row(SECTION, name, "fail", f"capture/replay: {_last_line(err)}"))
                    continue
                if same_bits(replayed, eager):
                    rows.append(Row(SECTION, name, "pass", "replay with new inputs bitwise equal to eager"))
                elif case.deterministic:
                    rows.append(Row(SECTION, name, "fail", "replay with new inputs differs bitwise from eager"))
                else:
                    ok = all(numerics.max_error(r, e) <= numerics.ULP[dtype] * e.abs().max().item()
                             for r, e in zip(replayed, eager))
                    rows.append(Row(SECTION, name, "pass" if ok else "fail",
                                    "replay within one ulp of eager" if ok else "replay differs from eager"))
    return rows


def _dar_block(d: int, heads: int, grid: int, device, dtype):
    from ..dar.blocks import DiT
    torch.manual_seed(0)
    model = DiT(input_size=grid, hidden_size=d, depth=1, num_heads=heads, learn_sigma=False, stream="dar",
                num_classes=10)
    with torch.no_grad():  # adaLN-Zero starts every sublayer and the final layer at zero: redraw them
        for p in model.parameters():
            if p.dim() >= 1 and not p.abs().sum():
                p.normal_(std=0.02)
    return model.to(device, dtype).eval()


def _dar_block_inputs(grid: int, device, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, grid, grid, generator=g).to(device, dtype)
    return x, torch.tensor([0.3, 0.7], device=device, dtype=dtype), torch.tensor([1, 3], device=device)


def compiled_block_row(ctx: Context) -> Row:
    """torch.compile(mode="reduce-overhead") of a DAR block (DiT-XL/2 width, 2 x 256 tokens) against eager."""
    name = "torch.compile reduce-overhead DAR block (DiT-XL/2 width, 2x256 tokens) fp32"
    if ctx.device.type != "cuda":
        return Row(SECTION, name, "skip", "no CUDA")
    d, heads, grid = 1152, 16, 32
    try:
        model = _dar_block(d, heads, grid, ctx.device, torch.float32)
        compiled = torch.compile(model, mode="reduce-overhead")
        with torch.no_grad():
            for seed in range(3):  # cudagraph trees record on a later call; the last one replays new values
                out = compiled(*_dar_block_inputs(grid, ctx.device, torch.float32, seed)).clone()
            inputs = _dar_block_inputs(grid, ctx.device, torch.float32, 2)
            eager = model(*inputs)
            with backend("reference"):
                exact = model.double()(*[t.double() if t.is_floating_point() else t for t in inputs])
    except Exception as err:  # noqa: BLE001
        return Row(SECTION, name, "fail", _last_line(err))
    tol = numerics.tolerance(torch.float32, exact, eager, 0.0)
    err = numerics.max_error(out, exact)
    status = "pass" if err <= tol else "fail"
    return Row(SECTION, name, status, f"max error {err:.3g} vs tolerance {tol:.3g} (2x eager's + 1 ulp)",
               {"max_error": err, "tolerance": tol})


def run(ctx: Context) -> list[Row]:
    until = time.monotonic() + SHARE * max(ctx.time_left(), 0.0)
    return _op_rows(ctx, until) + [compiled_block_row(ctx)]
