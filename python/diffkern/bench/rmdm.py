"""R-MDM's shared-block recursion (diffkern.recurse) described for the harness: one Sudoku denoising step.

Cases: the issue's Sudoku shapes, B in {1, 64} boards of T=81 tokens, d=256 (8 heads, MLP 1024), K=2
shared blocks run L=4 times; no adaLN (common for Sudoku MDMs). The eager baseline is the plain block
applied L times in PyTorch with F.scaled_dot_product_attention (the strongest eager form), and
torch.compile compiles that same function.

Weight traffic per denoising step, modeled: the unfused block applied L times reads each weight K*L
times (once per block evaluation); diffkern's C++ path reads and packs each weight once per call and
reuses the packed copy for all L iterations (`weight_reads_per_call`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from ..rmdm import recurse
from ..rmdm.reference import N_PARAMS, param_shapes
from . import cpu
from .bars import evaluate
from .workload import FWD, Bar, Case, Workload

HEADS, K, L, EPS = 8, 2, 4, 1e-5


def _case(B: int, T: int, d: int) -> Case:
    return Case(f"B={B} T={T} d={d} K={K} L={L}", dict(B=B, T=T, d=d, f=4 * d, K=K, L=L, heads=HEADS), B * T)


def _make_args(case: Case, dtype: torch.dtype, device: str):
    p = case.params
    gen = torch.Generator().manual_seed(0)

    def tensor(shape, name_index):
        if device == "meta":
            return torch.empty(shape, dtype=dtype, device=device)
        base = 1.0 if name_index in (0, 6) else 0.0
        return (base + 0.05 * torch.randn(shape, generator=gen)).to(dtype=dtype, device=device)

    weights = [tensor(s, i) for _ in range(p["K"]) for i, s in enumerate(param_shapes(p["d"], p["f"]))]
    x = tensor((p["B"], p["T"], p["d"]), -1) * 20
    return x, weights


def _diffkern(x, weights):
    blocks = [weights[k:k + N_PARAMS] for k in range(0, len(weights), N_PARAMS)]
    return recurse(blocks, x, L, heads=HEADS, eps=EPS)


def eager_recurse(x, weights):
    """The plain pre-norm block applied L times, in eager PyTorch (SDPA attention)."""
    B, T, d = x.shape
    h = x
    for _ in range(L):
        for k in range(0, len(weights), N_PARAMS):
            ln1_w, ln1_b, w_qkv, b_qkv, w_o, b_o, ln2_w, ln2_b, w_1, b_1, w_2, b_2 = weights[k:k + N_PARAMS]
            u = F.layer_norm(h, (d,), ln1_w, ln1_b, EPS)
            q, kk, v = F.linear(u, w_qkv, b_qkv).view(B, T, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, kk, v).transpose(1, 2).reshape(B, T, d)
            h = h + F.linear(a, w_o, b_o)
            u = F.layer_norm(h, (d,), ln2_w, ln2_b, EPS)
            h = h + F.linear(F.gelu(F.linear(u, w_1, b_1)), w_2, b_2)
    return h


def dispatched_ops(fn, args) -> int:
    """Operators one no-grad call of fn(*args) sends through the dispatcher (launches, on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        fn(*args)
    return Count.n


def weight_reads_per_call(case: Case) -> dict:
    """Modeled weight reads per denoising step, in weight-set units: eager K*L, diffkern's CPU path 1."""
    return {"eager": case.params["K"] * case.params["L"], "diffkern_cpu": 1}


def _min_bytes(case: Case, itemsize: int) -> dict:
    """fwd: x and every weight read once, h_L written; bwd: the gradients of x and the weights written once."""
    p = case.params
    n_w = p["K"] * sum(torch.Size(s).numel() for s in param_shapes(p["d"], p["f"]))
    n_x = p["B"] * p["T"] * p["d"]
    return {FWD: (2 * n_x + n_w) * itemsize, "bwd": (n_x + n_w) * itemsize}


RECURSE = Workload(
    name="recurse",
    title="R-MDM shared-block recursion (recurse), one Sudoku denoising step",
    full_cases=(_case(1, 81, 256), _case(64, 81, 256)),
    quick_cases=(_case(1, 9, 32),),
    make_args=_make_args,
    diffkern=_diffkern,
    reference=eager_recurse,
    min_bytes=_min_bytes,
    aot_specs=lambda: [],
    spec_used=lambda spec, case, dtype: False,
    bars=(
        Bar("CPU recursion >= 1.5x faster than eager at B=1", "cpu", "eager_over_diffkern", ">=", 1.5, (FWD,),
            lambda case: case.params["B"] == 1),
        Bar("CPU recursion no slower than torch.compile at B=1", "cpu", "compile_over_diffkern", ">=", 1.0, (FWD,),
            lambda case: case.params["B"] == 1),
    ),
)

WORKLOADS = (RECURSE,)


def report(quick: bool, out: str | None, warmup: int = 2, rounds: int = 7, min_sample_s: float = 0.2) -> str:
    """The CPU section and CPU bars of this workload, plus the modeled weight reads and dispatched ops per
    denoising step; writes rmdm.json / rmdm.md to `out` (if given) and returns the Markdown.

    (Not in the harness's WORKLOAD_MODULES: `recurse` has no Triton backward, so the traffic section
    cannot count a training step of diffkern's.)
    """
    rows = cpu.rows(RECURSE, quick, torch.float32, warmup, rounds, min_sample_s,
                    log=lambda msg: print(msg, file=sys.stderr))
    bars = evaluate(RECURSE, quick, {"cpu": rows})
    md = [f"## R-MDM shared-block recursion (diffkern.recurse), CPU float32, {torch.get_num_threads()} thread(s)", "",
          "| case | pass | eager ms | torch.compile ms | diffkern ms | eager / diffkern | compile / diffkern |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['case']} | {r['pass']} | error: {r['error']} | | | | |")
            continue
        md.append(f"| {r['case']} | {r['pass']} | {r['eager_ms']:.2f} | {r['compile_ms']:.2f} | {r['diffkern_ms']:.2f} "
                  f"| {r['eager_over_diffkern']:.2f}x | {r['compile_over_diffkern']:.2f}x |")
    md.append("")
    md += [f"- Bar: {b['bar']}: worst {b['worst']}, **{'met' if b['met'] else 'not met'}**" for b in bars]
    for case in RECURSE.cases(quick):
        x, weights = _make_args(case, torch.float32, "cpu")
        md.append(f"- {case.name}: weight reads per denoising step {weight_reads_per_call(case)}; dispatched ops "
                  f"per step: eager {dispatched_ops(eager_recurse, (x, weights))}, diffkern "
                  f"{dispatched_ops(_diffkern, (x, weights))} (+ ATen's softmax and gelu inside, per block evaluation)")
    text = "\n".join(md) + "\n"
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "rmdm.json"), "w") as f:
            json.dump({"cpu": rows, "bars": bars}, f, indent=1, default=str)
        with open(os.path.join(out, "rmdm.md"), "w") as f:
            f.write(text)
    return text


def main(argv=None) -> None:
    """`python -m diffkern.bench.rmdm [--quick] [--out DIR]`: the report above, printed."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-sample-s", type=float, default=0.2)
    ap.add_argument("--out", default=None, help="folder for rmdm.json and rmdm.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(report(args.quick, args.out, args.warmup, args.rounds, args.min_sample_s))

if __name__ == "__main__":
    main()
