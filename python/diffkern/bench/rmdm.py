"""R-MDM's shared-block recursion (diffkern.recurse) described for the harness: one Sudoku denoising step.

Cases: the issue's Sudoku shapes, B in {1, 64} boards of T=81 tokens, d=256 (8 heads, MLP 1024), K=2
shared blocks run L=4 times; no adaLN (common for Sudoku MDMs). The eager baseline is the plain block
applied L times in PyTorch with F.scaled_dot_product_attention (the strongest eager form), and
torch.compile compiles that same function.

Launches and weight traffic per denoising step (`count_gpu_path`, counted by the interpreter in a child
process, bf16): the Triton kernels' launches and the bytes they load from the weight matrices and biases,
over their bytes. The persistent kernel (where the op's plan picks it: B*T <= 512) reads each once per call
(and the LayerNorm vectors once per program); the tiled kernels (seven launches per block evaluation) once
per row tile of each product; the unfused block applied L times reads each weight once per block evaluation
(L per step, modeled: each F.linear reads its weight once) in one launch per dispatched op. B=64 is left
out of the count (too slow to interpret); the tiled kernels' traffic at every case is modeled by
diffkern.bench.rmdm_model, whose H100 roofline (`rmdm_model.rmdm_roofline`) the report prints, with the
issue's Sudoku shape (B=64, d=512).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from ..rmdm import recurse
from ..rmdm.reference import N_PARAMS, param_shapes
from . import cpu
from .bars import evaluate
from .interpreted import interpreter_env
from .machine import Gemm, gemm_flops
from .workload import BWD, EVERY_RUN, FULL_RUN, FWD, Bar, Case, Workload

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


# The weights the bar counts: the four matrices and their biases, BLOCK_PARAMS indices 2-5 and 8-11 (every program
# of the persistent kernel reads the LayerNorm vectors, which it applies itself). The tiled kernels take them as
# recurse_linear_kernel's arguments, the persistent kernel through a pointer table ("tensor_table tensor #i").
MATRIX_PARAMS = (2, 3, 4, 5, 8, 9, 10, 11)


def _matrix_bytes_loaded(launch) -> int:
    if launch.kernel == "recurse_linear_kernel":
        return launch.loaded_by.get("argument 'w_ptr'", 0) + launch.loaded_by.get("argument 'bias_ptr'", 0)
    return sum(n for owner, n in launch.loaded_by.items() if owner.startswith("tensor_table tensor #")
               and int(owner.rsplit("#", 1)[1]) % N_PARAMS in MATRIX_PARAMS)


def count_gpu_path(case: Case, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Interpreter counts (needs TRITON_INTERPRET=1) of one no-grad call per Triton form: launches, programs
    (summed over launches), bytes loaded from the weight matrices and biases over their bytes, and all bytes
    loaded and stored."""
    from .. import _triton
    from ..rmdm import triton_kernels, triton_persistent
    from ..testing.triton_monitor import TritonMonitor

    p = case.params
    x, weights = _make_args(case, dtype, "cpu")
    weight_bytes = sum(w.numel() * w.element_size() for i, w in enumerate(weights) if i % N_PARAMS in MATRIX_PARAMS)
    pb = triton_persistent.plan(p["B"] * p["T"], p["d"], p["f"], p["K"], dtype.itemsize, _triton.MODEL_SMS)
    runs = {"tiled": lambda: triton_kernels.recurse_tiled(x, weights, None, p["L"], p["heads"], EPS)}
    if pb is not None:
        runs["persistent"] = lambda: triton_persistent.recurse_persistent(x, weights, None, p["L"], p["heads"], EPS, pb)
    out = {"case": case.name, "dtype": str(dtype).removeprefix("torch."), "programs_per_block": pb,
           "chosen": "persistent" if pb is not None else "tiled"}
    for name, run in runs.items():
        with TritonMonitor(by_tensor=True) as mon:
            run()
        loaded = sum(_matrix_bytes_loaded(launch) for launch in mon.launches)
        # the grid barriers' spinning on their counter depends on thread timing: left out of the totals
        spin = "argument 'sync_ptr'"
        out[name] = dict(launches=mon.num_launches, programs=sum(launch.programs for launch in mon.launches),
                         weight_reads=loaded / weight_bytes,
                         bytes_loaded=mon.bytes_loaded - sum(launch.loaded_by.get(spin, 0) for launch in mon.launches),
                         bytes_stored=mon.bytes_stored - sum(launch.stored_by.get(spin, 0) for launch in mon.launches))
    return out


def _counts_in_child(quick: bool) -> list[dict]:
    cmd = [sys.executable, "-m", "diffkern.bench.rmdm", "--count"] + ["--quick"] * quick
    run = subprocess.run(cmd, env=interpreter_env(), capture_output=True, text=True)
    if run.returncode != 0:
        return [{"error": f"the interpreter child exited with status {run.returncode}: {run.stderr.strip()[-1500:]}"}]
    return json.loads(run.stdout)


def _min_bytes(case: Case, itemsize: int) -> dict:
    """fwd: x and every weight read once, h_L written; bwd: the gradients of x and the weights written once."""
    p = case.params
    n_w = p["K"] * sum(torch.Size(s).numel() for s in param_shapes(p["d"], p["f"]))
    n_x = p["B"] * p["T"] * p["d"]
    return {FWD: (2 * n_x + n_w) * itemsize, "bwd": (n_x + n_w) * itemsize}


def block_gemms(case: Case) -> dict[str, tuple[Gemm, ...]]:
    """The matrix products of one block evaluation (the op makes K L of them), per pass. fwd: QKV, the scores
    Q K^T and P V per (sample, head), W_o, the MLP's two; bwd: both products of each of those (every input
    requires grad: the gradients of x, the weights and, inside the attention, of q, k, v and P)."""
    p = case.params
    BT, d, f, dh = p["B"] * p["T"], p["d"], p["f"], p["d"] // p["heads"]
    heads = p["B"] * p["heads"]
    fwd = (Gemm(1, BT, 3 * d, d), Gemm(heads, p["T"], p["T"], dh), Gemm(heads, p["T"], dh, p["T"]),
           Gemm(1, BT, d, d), Gemm(1, BT, f, d), Gemm(1, BT, d, f))
    return {FWD: fwd, BWD: tuple(b for g in fwd for b in g.backward())}


def _flops(case: Case) -> dict:
    """Every block evaluation's products, K L times."""
    return {p: case.params["K"] * case.params["L"] * gemm_flops(gs) for p, gs in block_gemms(case).items()}


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
    timed_in=lambda case: EVERY_RUN if case.params["B"] == 1 else FULL_RUN,
    flops=_flops,
    bars=(
        Bar("CPU recursion >= 1.5x faster than eager at B=1", "cpu", "eager_over_diffkern", ">=", 1.5, (FWD,),
            lambda case: case.params["B"] == 1),
        Bar("CPU recursion no slower than torch.compile at B=1", "cpu", "compile_over_diffkern", ">=", 1.0, (FWD,),
            lambda case: case.params["B"] == 1),
    ),
)

WORKLOADS = (RECURSE,)


def report(quick: bool, out: str | None, warmup: int = 2, rounds: int = 7, min_sample_s: float = 0.2,
           mode=None) -> str:
    """The CPU section and CPU bars of this workload, the GPU path's launches and weight reads per denoising
    step (counted) and eager's; writes rmdm.json / rmdm.md to `out` (if given) and returns the Markdown.
    mode: the harness's run (diffkern.bench.mode.Mode): its warmup and rounds replace the arguments, and it
    times only the cases it names (the default run: B=1, the bars' case); the GPU path is counted in the
    interpreter only when the mode counts every case (not in the default run).

    (Not in the harness's WORKLOAD_MODULES: `recurse`'s GPU backward is ATen's, not Triton, so the
    harness's interpreter traffic section cannot count a training step of diffkern's.)
    """
    cases = RECURSE.cases(quick)
    if mode is not None:
        warmup, rounds, cases = mode.warmup, mode.rounds, mode.timed_cases(RECURSE)
    rows = cpu.rows(RECURSE, cases, torch.float32, warmup, rounds, min_sample_s,
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
    counted = mode is None or mode.count_all  # the interpreter takes minutes at the B=1 shape
    counts = _counts_in_child(quick) if counted else []
    md += ["", "### GPU path per denoising step (Triton kernels counted in the interpreter, bf16, no adaLN; "
           "bytes without the grid barriers' counter)", "",
           "| case | kernel | launches | programs | matrix + bias bytes read / their bytes | all bytes loaded "
           "| all bytes stored |",
           "|---|---|---|---|---|---|---|"]
    for c in counts:
        if "error" in c:
            md.append(f"| error: {c['error']} | | | | | | |")
            continue
        for name in ("persistent", "tiled"):
            if name in c:
                k = c[name]
                mark = " (the op's choice)" if c["chosen"] == name else ""
                md.append(f"| {c['case']} | {name}{mark} | {k['launches']} | {k['programs']} | {k['weight_reads']:.3f} "
                          f"| {k['bytes_loaded']:,} | {k['bytes_stored']:,} |")
    md += ["", *([] if counted else ["Not counted in this run: the full run counts it (make bench FULL=1).", ""])]
    md += roofline_section()
    for case in RECURSE.cases(quick):
        x, weights = _make_args(case, torch.float32, "cpu")
        md.append(f"- {case.name}, eager (the block applied L times): {dispatched_ops(eager_recurse, (x, weights))} "
                  f"dispatched ops (launches on a GPU), each weight read {case.params['L']} times (modeled); "
                  f"diffkern's CPU op: {dispatched_ops(_diffkern, (x, weights))} dispatched ops, weights packed once.")
    persistent = [c["persistent"] for c in counts if "persistent" in c]
    met = (bool(persistent) and all(k["launches"] == 1 and k["weight_reads"] == 1.0 for k in persistent)
           if counted else None)
    verdict = "not measured in this run" if met is None else f"**{'met' if met else 'not met'}**"
    md.append(f"- Bar: GPU path in the persistent regime: 1 launch per call, each weight matrix and bias read once "
              f"per call (interpreter count): {verdict}")
    bars.append({"bar": "GPU path: 1 launch per call, weight matrices and biases read once per call (persistent "
                        "regime)", "met": met})
    text = "\n".join(md) + "\n"
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "rmdm.json"), "w") as f:
            json.dump({"cpu": rows, "gpu_path": counts, "bars": bars}, f, indent=1, default=str)
        with open(os.path.join(out, "rmdm.md"), "w") as f:
            f.write(text)
    return text


def roofline_section() -> list[str]:
    """Markdown lines: the tiled kernels' modeled H100 time (diffkern.bench.rmdm_model) at its cases."""
    from . import rmdm_model  # imports triton, which importing this report module does not
    md = ["### Tiled kernels, modeled H100 roofline per denoising step (bench/rmdm_model.py, no adaLN)", "",
          "Sum over launches of max(bytes / 3.35 TB/s, FLOPs / peak at the products' precision); bytes as the "
          "interpreter counts them (every load, L2 hits included) or minimal (each tensor a launch touches, once); "
          "L2-aware: per launch the slowest of minimal bytes / 3.35 TB/s, counted bytes / L2 bandwidth and FLOPs / "
          "peak (as the backward's model below). Each launch at its fastest candidate by the model.", "",
          "| case | dtype | launches | GFLOP | precision | us (counted bytes at HBM speed) | us (minimal bytes) "
          "| us (L2-aware) |", "|---|---|---|---|---|---|---|---|"]
    rows = rmdm_model.rmdm_roofline()
    for r in rows:
        md.append(f"| {r['case']} | {r['dtype']} | {r['launches']} | {r['flops'] / 1e9:.1f} | {r['precision']} "
                  f"| {r['us_best']:.0f} | {r['us_best_unique']:.0f} | {r['us_best_l2']:.0f} |")
    sudoku = rows[0]  # CASES[0] in bf16: the bar shape
    md += ["", f"- Bar: R-MDM forward at {sudoku['case']}, bf16, <= 1 ms predicted (judged L2-aware): "
           f"{sudoku['us_best_l2']:.0f} us, **{'met' if sudoku['us_best_l2'] <= 1000 else 'not met'}**"]
    md += ["", "### Triton backward, modeled H100 time at B=64 T=81 d=512 heads=8 f=2048 K=2 L=4 (rmdm_model."
           "triton_backward; the ATen backward's fp32 products alone: rmdm_model.aten_backward)", "",
           "Per launch the slowest of minimal bytes / 3.35 TB/s, loaded and stored bytes / L2 bandwidth (every tile "
           "as often as a program reads it) and FLOPs / peak; and without the L2 term. The recompute's forward "
           "launches at their first candidate (what the interpreter runs), and at their fastest (as an autotuning "
           "GPU runs them).", "",
           "| dtype | launches | GFLOP | precision | us | us, recompute autotuned | us (minimal bytes only) "
           "| us at the FLOPs' roofline | ratio (bar 1.2) | ratio, recompute autotuned | ATen fp32 floor us |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    aten = rmdm_model.aten_backward(64, 81, 512)
    for dt in (torch.bfloat16, torch.float32):
        r = rmdm_model.triton_backward(64, 81, 512, 2048, 8, 2, 4, dt)
        md.append(f"| {str(dt).removeprefix('torch.')} | {r['launches']} | {r['flops'] / 1e9:.1f} | {r['precision']} "
                  f"| {r['us_modeled']:.0f} | {r['us_tuned']:.0f} | {r['us_hbm']:.0f} | {r['us_roofline']:.0f} "
                  f"| {r['ratio']:.2f} | {r['ratio_tuned']:.2f} | {aten['us_fp32']:.0f} |")
    return md + [""]


def main(argv=None) -> None:
    """`python -m diffkern.bench.rmdm [--quick] [--out DIR]`: the report above, printed."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-sample-s", type=float, default=0.2)
    ap.add_argument("--out", default=None, help="folder for rmdm.json and rmdm.md")
    ap.add_argument("--count", action="store_true", help="print the interpreter counts as JSON (TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    if args.count:
        print(json.dumps([count_gpu_path(c) for c in RECURSE.cases(args.quick) if c.params["B"] == 1]))
        return
    torch.set_num_threads(args.threads)
    print(report(args.quick, args.out, args.warmup, args.rounds, args.min_sample_s))

if __name__ == "__main__":
    main()
