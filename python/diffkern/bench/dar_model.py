"""CPU time of a DAR DiT-S/2 training step against the residual DiT-S/2 of the same width, side by side.

    python -m diffkern.bench.dar_model [--quick] [--out DIR] [--batch 2] [--threads N]

A step is forward + backward of the SiT velocity loss (torch.autograd.grad of every parameter, so
nothing accumulates; no optimizer). The candidates are the same `diffkern.dar.blocks.DiT` built with
stream="residual" and with stream="dar" (timestep-injected query; chunked S=4, the same with per-chunk
recomputation, and the full scheme), timed round-robin so machine drift hits all alike, by wall
clock and by this process's CPU time (the ratio that counts on a shared machine). For each DAR candidate the report also gives the share of one step's CPU time spent in
diffkern's routing ops and their autograd nodes (torch.profiler, self time), which says where a gap
to the residual model comes from.
Issue 3's bar: DAR step time <= 1.5x the residual step time, judged by CPU time on the DAR rows without
recomputation (recomputation trades a second forward of each chunk for memory, by choice).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch

from ..dar.blocks import dit
from ..dar.sit import velocity_loss
from .report import _table

BAR = 1.5
CANDIDATES = {"residual": dict(stream="residual"),
              "dar S=4": dict(stream="dar", chunk_size=4, query="timestep"),
              "dar S=4 recompute": dict(stream="dar", chunk_size=4, query="timestep", recompute=True),
              "dar full": dict(stream="dar", chunk_size=None, query="timestep")}


def _model(kwargs: dict, input_size: int):
    torch.manual_seed(0)
    return dit("DiT-S/2", input_size=input_size, learn_sigma=False, **kwargs)


def _step(model, x, y):
    params = [p for p in model.parameters() if p.requires_grad]

    def call():
        return torch.autograd.grad(velocity_loss(model, x, y, torch.Generator().manual_seed(0)), params)
    return call


def routing_share(step) -> float:
    """Fraction of one step's self CPU time in diffkern ops (routing forward, backward, their autograd nodes)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ours = sum(e.self_cpu_time_total for e in events if "diffkern" in e.key)
    return ours / total


def time_steps(steps: dict, warmup: int, rounds: int) -> dict:
    """Median wall and CPU (process) seconds per call, the candidates taken round-robin.

    CPU time is what a step costs this process: unlike wall time it does not count the time the
    scheduler gives to other processes, which on a shared machine is most of the noise.
    """
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    wall, cpu = {k: [] for k in steps}, {k: [] for k in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            gc.collect()
            gc.disable()
            try:
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
            finally:
                gc.enable()
    return {k: {"wall_s": statistics.median(wall[k]), "cpu_s": statistics.median(cpu[k]),
                "wall_samples": wall[k], "cpu_samples": cpu[k]} for k in steps}


def rows(quick: bool, batch: int, warmup: int, rounds: int, full: bool = True) -> list[dict]:
    """Per candidate: its step's CPU and wall time against the residual one, and the routing share; without
    `full`, only the candidates the bar judges (no recompute) and no routing share (the profiled steps)."""
    input_size = 8 if quick else 32  # 32x32 latents (ImageNet 256): T = 256 tokens at patch 2
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 4, input_size, input_size, generator=g), torch.randint(0, 1000, (batch,), generator=g)
    models = {name: _model(kw, input_size) for name, kw in CANDIDATES.items() if full or not kw.get("recompute")}
    steps = {name: _step(m, x, y) for name, m in models.items()}
    t = time_steps(steps, warmup, rounds)
    base = t["residual"]
    out = []
    for name, m in models.items():
        out.append({"model": name, "case": f"DiT-S/2 B={batch} T={(input_size // 2) ** 2} d=384",
                    "params": sum(p.numel() for p in m.parameters()),
                    "cpu_ms": t[name]["cpu_s"] * 1e3, "wall_ms": t[name]["wall_s"] * 1e3,
                    "over_residual": t[name]["cpu_s"] / base["cpu_s"],
                    "wall_over_residual": t[name]["wall_s"] / base["wall_s"],
                    "routing_share": None if name == "residual" or not full else routing_share(steps[name]),
                    "timing": t[name]})
    return out


def markdown(rows_: list[dict], threads: int) -> str:
    lines = _table(["model", "case", "params", "CPU ms / step", "/ residual (CPU)", "wall ms / step",
                    "/ residual (wall)", "diffkern routing share of CPU"],
                   [[r["model"], r["case"], f"{r['params']:,}", f"{r['cpu_ms']:.0f}", f"{r['over_residual']:.2f}x",
                     f"{r['wall_ms']:.0f}", f"{r['wall_over_residual']:.2f}x",
                     "" if r["routing_share"] is None else f"{r['routing_share']:.1%}"] for r in rows_])
    judged = [r for r in rows_ if r["model"].startswith("dar") and "recompute" not in r["model"]]
    worst = max(r["over_residual"] for r in judged)
    verdict = "met" if worst <= BAR else "not met"
    return "\n".join([f"### DAR DiT-S/2 training step vs residual (CPU, float32, {threads} threads, medians)", "",
                      *lines, "",
                      f"Bar: DAR step <= {BAR:.2f}x residual (CPU time, rows without recompute): worst {worst:.2f}x, "
                      f"**{verdict}**."])


def report(quick: bool, out: str | None, batch: int = 2, rounds: int | None = None, mode=None) -> str:
    """Times the candidates, writes dar_model.json / dar_model.md to `out` (if given), returns the Markdown.
    mode: the harness's run (diffkern.bench.mode.Mode), whose rounds replace `rounds`; a run that does not time
    every case (the default one) times only the judged candidates and leaves out the routing share."""
    full = mode is None or mode.time_all
    result = rows(quick, batch, 1, mode.rounds if mode else rounds or (3 if quick else 7), full)
    md = markdown(result, torch.get_num_threads()) + ("" if full else "\n\nThis run leaves out the recompute candidate "
                                                       "and the routing share: the full run has them (make bench FULL=1).")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "dar_model.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(out, "dar_model.md"), "w") as f:
            f.write(md + "\n")
    return md


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="8x8 inputs (16 tokens): a smoke run, not representative")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=None, help="timed samples per candidate (default 7, quick 3)")
    p.add_argument("--out", default=None, help="folder for dar_model.json and dar_model.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(report(args.quick, args.out, args.batch, args.rounds))

if __name__ == "__main__":
    main()
