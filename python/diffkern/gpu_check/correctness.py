"""Section 2: every public op and backend on ctx.device against the float64 reference.

For each case of cases.catalogue (real model shapes and awkward ones), dtype and backend (forced with
diffkern.backend; on a GPU "triton" and, in a CUDA build, "cuda"; in the dry run "cpu" and "triton" in the
interpreter) the forward, and the backward where the op has one (the gradients of every input that
requires grad, for a seeded upstream gradient), must lie within the error model of
diffkern.testing.numerics (the tests' criterion; NaN/inf where the reference has them). On a GPU the
float64 oracle runs on the device. Then, per case and backend in the first dtype: the forward on a side
stream (torch.cuda.Stream) and on a second device when there is one, and a repeated run compared
bitwise where the op promises determinism.
"""
from __future__ import annotations

import contextlib
import time
import traceback

import torch
from torch.utils._pytree import tree_leaves

from .. import _dtypes, _registry, backend
from ..testing import contract, numerics
from .cases import OpCase, catalogue
from .context import Context, Row

SECTION = "correctness"
# Share of the time left when the section starts that it may use on a GPU (the sections after it time,
# sanitise and capture every op).
GPU_SHARE = 0.4
# The dry run proves the driver end to end, not the kernels (the tests do): one dtype.
DRY_RUN_DTYPES = (torch.float32,)


def _backends(case: OpCase, ctx: Context, pass_: str) -> list[tuple[str, str | None]]:
    """(label, forced backend or None for the default routing) of each row of `case` and `pass_`."""
    candidates = ("cpu", "triton") if ctx.dry_run else \
        tuple(b for b in ("cuda", "triton") if _registry._built(b))
    fwd = [b for b in candidates if b in _registry.available(case.kernel)]
    if pass_ == "fwd":
        return [(b, b) for b in fwd]
    bwd = _registry.available(case.bwd_kernel) if case.bwd_kernel else fwd
    rows = [(b, b) for b in fwd if b in bwd]
    if not rows or (not ctx.dry_run and len(rows) < len(fwd)):
        rows.append(("default", None))  # an op whose forward and backward have no GPU backend in common
    return rows


def upstream(t: torch.Tensor, dtype: torch.dtype, k: int) -> torch.Tensor:
    """The upstream gradient of output k: sin(0.7 i + k + 0.3) over its elements, rounded to the case's
    dtype (so the float64 oracle gets the same values). Formed on t's device by tensor ops, without a
    generator or a host copy, so a CUDA-graph capture of the backward can hold it."""
    i = torch.arange(t.numel(), device=t.device, dtype=torch.float64)
    return torch.sin(0.7 * i + (k + 0.3)).to(dtype).to(t.dtype).reshape(t.shape)


def backward_of(call, dtype: torch.dtype):
    """The gradients of every argument that requires grad, of call's outputs that require grad, for the
    fixed upstream gradients of `upstream`."""
    def grads(*args):
        leaves = [t for t in tree_leaves(list(args)) if isinstance(t, torch.Tensor) and t.requires_grad]
        outs = [t for t in contract._tensors(call(*args)) if t.requires_grad]
        return list(torch.autograd.grad(outs, leaves, [upstream(t, dtype, k) for k, t in enumerate(outs)]))
    return grads


def _fn(case: OpCase, dtype: torch.dtype, pass_: str):
    return case.call if pass_ == "fwd" else backward_of(case.call, dtype)


def _run(case, dtype, device, pass_, forced, stream=None) -> list[torch.Tensor]:
    args = case.make(dtype, device, pass_ == "bwd")
    fn = _fn(case, dtype, pass_)
    with backend(forced) if forced else contextlib.nullcontext():
        if stream is None:
            out = fn(*args)
        else:
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                out = fn(*args)
            torch.cuda.current_stream(device).wait_stream(stream)
    return [t.detach() for t in contract._tensors(out)]


class Oracles:
    """The float64 oracle, the plain low-precision reference and the model's spreads of (case, dtype,
    pass), computed once for every backend that is compared with them; on `device` (the CPU when the
    device's float64 reference raises)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._cache: dict = {}

    def get(self, case: OpCase, dtype: torch.dtype, pass_: str):
        key = (case.name, dtype, pass_)
        if key not in self._cache:
            self._cache.clear()  # one case at a time: real shapes' oracles are large
            args = case.make(dtype, self.device, pass_ == "bwd")
            fn = _fn(case, dtype, pass_)
            with backend("reference"):
                plain = contract._tensors(fn(*args))
                try:
                    oracle, spreads = numerics.oracle_with_spread(lambda *a: contract._tensors(fn(*a)), args, case.n,
                                                                  dtype, device=self.device)
                except Exception:  # noqa: BLE001 - a float64 reference the device refuses runs on the CPU
                    if self.device.type == "cpu":
                        raise
                    oracle, spreads = numerics.oracle_with_spread(lambda *a: contract._tensors(fn(*a)), args, case.n,
                                                                  dtype, device="cpu")
            self._cache[key] = ([t.detach() for t in oracle], [t.detach() for t in plain], spreads)
        return self._cache[key]


def compare(actual: list, oracle: list, plain: list, spreads: list, dtype: torch.dtype) -> tuple[str, dict]:
    """('' or why `actual` is not the reference's answer, {"err_over_tol": worst finite ratio})."""
    if len(actual) != len(oracle):
        return f"{len(actual)} tensor outputs, the reference has {len(oracle)}", {}
    worst = 0.0
    for i, (a, o, p, s) in enumerate(zip(actual, oracle, plain, spreads)):
        why = contract._disagreement(a, o, p, s, dtype)
        if why:
            return f"output {i}: {why}", {}
        fin = o.isfinite()
        if fin.any():
            tol = numerics.tolerance(dtype, o[fin].double(), p.detach()[fin].double(), s)
            err = numerics.max_error(a[fin.to(a.device)], o[fin])
            worst = max(worst, err / tol if tol else (0.0 if err == 0 else float("inf")))
    return "", {"err_over_tol": worst}


def same_bits(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x.reshape(-1).view(torch.uint8).cpu(),
                                                                   y.reshape(-1).view(torch.uint8).cpu())
        for x, y in zip(a, b))


def _last_line(err: BaseException) -> str:
    return traceback.format_exception_only(type(err), err)[-1].strip()[:300]


def check(ctx: Context, oracles: Oracles, case: OpCase, dtype, pass_: str, label: str, forced) -> tuple[Row, list]:
    """One row: `case` in `dtype` on backend `forced`, `pass_` ("fwd" or "bwd"), against the oracle."""
    name = f"{case.name} {label} {_dtypes.name(dtype)} {pass_}"
    start = time.monotonic()
    try:
        out = _run(case, dtype, ctx.device, pass_, forced)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        kernel_s = time.monotonic() - start
        oracle, plain, spreads = oracles.get(case, dtype, pass_)
        why, metrics = compare(out, oracle, plain, spreads, dtype)
    except Exception as err:  # noqa: BLE001 - a broken op is a fail row; the others go on
        return Row(SECTION, name, "fail", _last_line(err)), []
    metrics.update(kernel_s=kernel_s, wall_s=time.monotonic() - start)
    if why:
        return Row(SECTION, name, "fail", why, metrics), out
    return Row(SECTION, name, "pass", f"error {metrics['err_over_tol']:.3g} x tolerance", metrics), out


def _variants(ctx: Context, oracles: Oracles, case: OpCase, dtype, label, forced, first: list) -> list[Row]:
    """The side-stream, second-device and repeated runs of one forward, against the first run `first`."""
    rows, base = [], f"{case.name} {label} {_dtypes.name(dtype)} fwd"
    runs = [("repeat", ctx.device, None)] if not (ctx.dry_run and forced == "triton") else []
    if ctx.device.type == "cuda":
        runs.append(("side stream", ctx.device, torch.cuda.Stream(ctx.device)))
        if torch.cuda.device_count() > 1:
            other = torch.device("cuda", (ctx.device.index + 1) % torch.cuda.device_count())
            runs.append((f"on {other}", other, None))
    for what, device, stream in runs:
        name = f"{base} {what}"
        try:
            out = _run(case, dtype, device, "fwd", forced, stream)
            if same_bits(out, first):
                rows.append(Row(SECTION, name, "pass", "bitwise equal to the first run"))
                continue
            if what == "repeat":
                status = "fail" if case.deterministic else "info"
                rows.append(Row(SECTION, name, status, "differs bitwise from the first run"
                                + (" (determinism promised)" if case.deterministic else "")))
                continue
            why, metrics = compare(out, *oracles.get(case, dtype, "fwd"), dtype)
            rows.append(Row(SECTION, name, "fail" if why else "pass",
                            why or "within tolerance (not bitwise equal to the default stream)", metrics))
        except Exception as err:  # noqa: BLE001
            rows.append(Row(SECTION, name, "fail", _last_line(err)))
    return rows


def _work(cases: list[OpCase], dry_run: bool) -> list[tuple[OpCase, int, torch.dtype]]:
    """(case, dtype index, dtype) in the order they run: every case in its first dtype (bf16, the models'),
    awkward shapes before real ones, then the same in the other dtypes (what time leaves out comes last)."""
    items = [(c, i, dt) for c in cases for i, dt in enumerate(DRY_RUN_DTYPES if dry_run else c.dtypes)]
    return sorted(items, key=lambda item: (item[1], item[0].real))


def run(ctx: Context) -> list[Row]:
    """Rows for every case x dtype x backend x pass, then its stream/device/determinism variants."""
    started = time.monotonic()
    until = started + (ctx.time_left() if ctx.dry_run else GPU_SHARE * ctx.time_left())
    oracles = Oracles(ctx.device)
    rows, skipped, interpreted = [], [], set()
    for case, i, dtype in _work(catalogue(tiny=ctx.dry_run), ctx.dry_run):
        ctx.log(f"correctness: {case.name} {_dtypes.name(dtype)}")
        interpret = case.real and case.kernel not in interpreted
        if interpret:
            interpreted.add(case.kernel)
        for pass_ in ("fwd", "bwd") if case.differentiable else ("fwd",):
            for label, forced in _backends(case, ctx, pass_):
                if ctx.dry_run and forced == "triton" and not interpret:
                    continue  # the interpreter is slow: one (tiny) shape per kernel proves the path
                if time.monotonic() > until:
                    skipped.append(f"{case.name} {label} {_dtypes.name(dtype)} {pass_}")
                    continue
                row, out = check(ctx, oracles, case, dtype, pass_, label, forced)
                rows.append(row)
                if i == 0 and pass_ == "fwd" and row.status == "pass":
                    rows += _variants(ctx, oracles, case, dtype, label, forced, out)
    if skipped:
        rows.append(Row(SECTION, f"{len(skipped)} rows out of time", "skip",
                        f"the section's {until - started:.0f} s ran out; first left out: {skipped[0]}",
                        {"left_out": skipped}))
    if ctx.device.type != "cuda":
        rows.append(Row(SECTION, "side stream, second device", "skip", "no CUDA"))
    elif torch.cuda.device_count() < 2:
        rows.append(Row(SECTION, "second device", "skip", "one GPU"))
    return rows
