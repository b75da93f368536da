"""Deep narrow SiT: residual stream vs DAR (static and dynamic query, S=4 chunks) on scikit-learn's 8x8 digits, on CPU.

    python -m diffkern.demos.dar --out DIR [--seeds 3] [--steps 1000] [--workers 2] [--smoke]

DAR's mechanism is depth (specs/dar.md: the paper's symptoms are amplitude inflation over 28 blocks and
adjacent-block cosine > 0.9), so the default model is deep and narrow: 24 blocks (48 routed sublayers) at
width 32. For every seed the three models are the same `diffkern.dar.blocks.DiT` (same initial weights
in every shared layer), differing only in the stream: "residual" (the baseline), "dar-static" (q = w_l)
and "dar-dynamic" (q = W_q v_{l-1}), both DAR models with chunk size S=4 and sum summaries. They see the
same batches and (t, noise) draws, with the flow-matching velocity loss of `diffkern.dar.sit`, and are
scored every --eval-every steps on the same held-out digits with fixed (t, noise) draws.

Reported, each as a mean over seeds with a Student-t 95% interval (`diffkern.demos.seeds`):
  * equal steps: the final validation loss, and its paired difference from the residual model's;
  * equal time: each model's validation loss after the residual model's training CPU time (linear
    interpolation of its validation curve along its own cumulative training CPU seconds; process CPU
    time, since wall time is shared with whatever else runs);
  * steps to the residual's final loss: the first evaluated step at which a model's validation loss is
    <= the residual model's final one (same seed), and residual steps / that step (the paper's 8.75x is
    this ratio, measured with FID); a seed that never gets there is counted as not reached;
  * the three diagnostics of `diffkern.dar.diagnose` per block after training, summarised as amplitude
    growth RMS(h_last)/RMS(h_0), gradient ratio RMS(dL/dh_0)/RMS(dL/dh_last) and mean adjacent cosine;
  * the fraction of Euler-ODE samples (same noise per seed) that a logistic-regression digit classifier
    trained on the real training images reads as the digit asked for.
Writes DIR/dar_demo_{val,diagnose,samples}.png, dar_demo.md (the table) and dar_demo.json.
Runs (seed, model) jobs on --workers processes, one torch thread each.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np
import torch

from .. import _optional
from ..dar.blocks import DiT
from ..dar.diagnose import SYMPTOMS, diagnose, plot as plot_diagnose
from ..dar.sit import sample, velocity_loss
from .jobs import run_jobs
from .seeds import fmt, t_interval

VARIANTS = {"residual": dict(stream="residual"), "dar-static": dict(stream="dar", query="static"),
            "dar-dynamic": dict(stream="dar", query="dynamic")}
BASELINE = "residual"
SMOKE = dict(steps=6, batch=8, hidden=16, depth=4, heads=2, eval_every=2, seeds=2, samples_per_class=1,
             ode_steps=2, val_draws=1)


def load_digits():
    """(x_train, y_train, x_val, y_val): 8x8 digits as [N, 1, 8, 8] in [-1, 1], one fixed 1500/297 split."""
    data = _optional.require("sklearn.datasets", "demos").load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1500], y[:1500], x[1500:], y[1500:]


def build(variant: str, seed: int, args) -> DiT:
    torch.manual_seed(seed)  # every variant of a seed starts from the same weights in every shared layer
    return DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=args.hidden, depth=args.depth,
               num_heads=args.heads, num_classes=10, learn_sigma=False, class_dropout_prob=0.0,
               chunk_size=args.chunk_size, **VARIANTS[variant])


@torch.no_grad()
def val_loss(model: DiT, x: torch.Tensor, y: torch.Tensor, draws: int) -> float:
    """Velocity MSE on (x, y) averaged over `draws` fixed (t, noise) draws: the same problem at every call."""
    model.eval()
    loss = sum(velocity_loss(model, x, y, torch.Generator().manual_seed(10_000 + k)).item() for k in range(draws))
    model.train()
    return loss / draws


def run_job(variant: str, seed: int, args: argparse.Namespace) -> dict:
    """Trains one (variant, seed) model; returns its curves, timings, diagnostics and ODE samples."""
    torch.set_num_threads(1)
    x_train, y_train, x_val, y_val = load_digits()
    model = build(variant, seed, args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    order = torch.Generator().manual_seed(1000 + seed)  # the same batches and draws for every variant
    draws = torch.Generator().manual_seed(2000 + seed)
    losses, val = [], [(0, 0.0, val_loss(model, x_val, y_val, args.val_draws))]
    cpu = wall = 0.0  # training time only, evaluations excluded
    for step in range(1, args.steps + 1):
        c0, w0 = time.process_time(), time.perf_counter()
        idx = torch.randint(0, len(x_train), (args.batch,), generator=order)
        loss = velocity_loss(model, x_train[idx], y_train[idx], draws)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        cpu, wall = cpu + time.process_time() - c0, wall + time.perf_counter() - w0
        if step % args.eval_every == 0 or step == args.steps:
            val.append((step, cpu, val_loss(model, x_val, y_val, args.val_draws)))
    diag = diagnose(model, (x_val[:64], y_val[:64]))["model"]
    model.eval()
    labels = torch.arange(10).repeat_interleave(args.samples_per_class)
    noise = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(3000 + seed))
    return {"variant": variant, "seed": seed, "params": sum(p.numel() for p in model.parameters()),
            "losses": losses, "val": val, "train_cpu_s": cpu, "train_wall_s": wall, "diagnose": diag,
            "samples": sample(model, noise, labels, steps=args.ode_steps)}


def steps_to_reach(val: list, target: float):
    """The first evaluated step whose validation loss is <= target, or None if none is. val: [(step, _, loss)]."""
    return next((step for step, _, v in val if v <= target), None)


def val_at_cpu(val: list, seconds: float) -> float:
    """Validation loss after `seconds` of training CPU time: linear interpolation over [(step, cpu_s, loss)]
    (the last value when the run ended earlier)."""
    _, cpu, v = zip(*val)
    return float(np.interp(seconds, cpu, v))


def diag_summary(d: dict) -> dict:
    """Amplitude growth, gradient ratio (input side over output side) and mean adjacent cosine of one diagnosis."""
    return {"amplitude_growth": d["amplitude"][-1] / d["amplitude"][0],
            "grad_ratio": d["grad_rms"][0] / d["grad_rms"][-1], "cosine_mean": float(np.mean(d["cosine"]))}


def analyse(runs: dict, args, accuracy: dict) -> dict:
    """Per variant: across-seed intervals of every reported number (module docstring). runs[variant][seed]."""
    base = runs[BASELINE]
    out = {}
    for name, by_seed in runs.items():
        seeds = sorted(by_seed)
        final = [by_seed[s]["val"][-1][2] for s in seeds]
        reached = [steps_to_reach(by_seed[s]["val"], base[s]["val"][-1][2]) for s in seeds]
        budget = [base[s]["train_cpu_s"] for s in seeds]
        summ = [diag_summary(by_seed[s]["diagnose"]) for s in seeds]
        r = {"final_val": t_interval(final),
             "final_val_minus_residual": t_interval([f - base[s]["val"][-1][2] for f, s in zip(final, seeds)]),
             "equal_time_val": t_interval([val_at_cpu(by_seed[s]["val"], b) for s, b in zip(seeds, budget)]),
             "steps_in_residual_time": t_interval([args.steps * b / by_seed[s]["train_cpu_s"]
                                                   for s, b in zip(seeds, budget)]),
             "cpu_ms_per_step": t_interval([1000 * by_seed[s]["train_cpu_s"] / args.steps for s in seeds]),
             "sample_accuracy": t_interval(accuracy[name]),
             "steps_to_residual_final": reached, "speedup": None}
        if all(k is not None for k in reached):
            r["speedup"] = t_interval([args.steps / k for k in reached])
        for key in ("amplitude_growth", "grad_ratio", "cosine_mean"):
            r[key] = t_interval([m[key] for m in summ])
        r["params"] = by_seed[seeds[0]]["params"]
        out[name] = r
    return out


def table(stats: dict, args) -> str:
    head = ("| model | params | val loss @ {n} steps | minus residual | val loss @ residual's CPU time | "
            "steps to residual's final val (per seed) | speedup | CPU ms/step | amplitude growth | grad ratio "
            "| adjacent cosine | samples read as asked |").format(n=args.steps)
    lines = [head, "|" + "---|" * 12]
    for name, r in stats.items():
        reached = ", ".join("-" if k is None else str(k) for k in r["steps_to_residual_final"])
        n_reached = sum(k is not None for k in r["steps_to_residual_final"])
        n_seeds = len(r["steps_to_residual_final"])
        speedup = fmt(r["speedup"]) + "x" if r["speedup"] else f"n/a ({n_reached}/{n_seeds} reached)"
        lines.append(f"| {name} | {r['params']:,} | {fmt(r['final_val'])} | {fmt(r['final_val_minus_residual'])} | "
                     f"{fmt(r['equal_time_val'])} | {reached} | {speedup} | {fmt(r['cpu_ms_per_step'])} | "
                     f"{fmt(r['amplitude_growth'])} | {fmt(r['grad_ratio'])} | {fmt(r['cosine_mean'])} | "
                     f"{fmt(r['sample_accuracy'])} |")
    return "\n".join(lines)


def plot_val(runs: dict, path: str) -> None:
    """Validation loss against step and against training CPU seconds: one thin line per seed, one colour per model."""
    plt = _optional.pyplot("demos")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for k, (name, by_seed) in enumerate(runs.items()):
        for s, r in sorted(by_seed.items()):
            step, cpu, v = zip(*r["val"])
            for ax, xs in zip(axes, (step, cpu)):
                ax.plot(xs, v, color=f"C{k}", lw=1, alpha=0.8, label=name if s == min(by_seed) else None)
    target = np.mean([r["val"][-1][2] for r in runs[BASELINE].values()])
    for ax, xlabel in zip(axes, ("step", "training CPU seconds (1 thread)")):
        ax.axhline(target, color="gray", ls=":", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation velocity MSE")
        ax.set_yscale("log")
    axes[0].legend(title="dotted: residual's final val (seed mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(samples: dict, path: str) -> None:
    """One panel per model: a row of samples per digit 0-9."""
    plt = _optional.pyplot("demos")
    fig, axes = plt.subplots(1, len(samples), figsize=(4.5 * len(samples), 5))
    for ax, (name, s) in zip(np.atleast_1d(axes), samples.items()):
        per_class = s.shape[0] // 10
        tiles = torch.nn.functional.pad(s.clamp(-1, 1).reshape(10, per_class, 8, 8), (1, 1, 1, 1), value=-1.0)
        ax.imshow(tiles.permute(0, 2, 1, 3).reshape(100, per_class * 10).numpy(), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_title(f"{name}: one row per digit 0-9")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_all(args, log) -> list:
    """Every (variant, seed) job, on args.workers spawned processes (in this process when workers == 1)."""
    jobs = [(v, s, args) for s in range(args.seeds) for v in VARIANTS]
    jobs.sort(key=lambda j: j[0] == BASELINE)  # the cheaper residual jobs last: the workers finish together

    def done(r):
        log(f"  {r['variant']} seed {r['seed']}: val {r['val'][-1][2]:.4f} ({r['train_cpu_s']:.0f} CPU s)")
    return run_jobs(run_job, jobs, args.workers, done)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the PNGs, dar_demo.md and dar_demo.json")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--depth", type=int, default=24)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (at least 2, for the intervals)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--val-draws", type=int, default=2, help="fixed (t, noise) draws per validation loss")
    p.add_argument("--samples-per-class", type=int, default=10)
    p.add_argument("--ode-steps", type=int, default=40)
    p.add_argument("--workers", type=int, default=2, help="processes (one torch thread each)")
    p.add_argument("--smoke", action="store_true", help="a tiny configuration for CI: " + str(SMOKE))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    if args.seeds < 2:
        p.error(f"--seeds must be >= 2 (a Student-t interval needs two seeds), got {args.seeds}")
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    os.makedirs(args.out, exist_ok=True)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    log(f"training {len(VARIANTS)} models x {args.seeds} seeds: depth {args.depth}, width {args.hidden}, "
        f"{args.steps} steps of batch {args.batch}, {args.workers} workers")
    results = run_all(args, log)
    runs = {v: {r["seed"]: r for r in results if r["variant"] == v} for v in VARIANTS}
    x_train, y_train, x_val, y_val = load_digits()
    clf = _optional.require("sklearn.linear_model", "demos").LogisticRegression(max_iter=2000)
    clf.fit(x_train.reshape(len(x_train), -1).numpy(), y_train.numpy())
    labels = np.arange(10).repeat(args.samples_per_class)
    accuracy = {v: [float((clf.predict(r["samples"].clamp(-1, 1).reshape(len(labels), -1).numpy()) == labels).mean())
                     for _, r in sorted(by_seed.items())] for v, by_seed in runs.items()}
    stats = analyse(runs, args, accuracy)
    plot_val(runs, os.path.join(args.out, "dar_demo_val.png"))
    mean_diag = {v: {k: np.mean([r["diagnose"][k] for r in by_seed.values()], axis=0).tolist() for k in SYMPTOMS}
                 for v, by_seed in runs.items()}
    plot_diagnose(mean_diag, os.path.join(args.out, "dar_demo_diagnose.png"))
    plot_samples({v: by_seed[0]["samples"] for v, by_seed in runs.items()},
                 os.path.join(args.out, "dar_demo_samples.png"))
    md = table(stats, args)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    timing = {"wall_s": time.perf_counter() - wall0,
              "cpu_s": time.process_time() - cpu0 + children.ru_utime + children.ru_stime}
    note = (f"{args.seeds} seeds, mean [95% Student-t interval]; depth {args.depth}, width {args.hidden}, "
            f"{args.steps} steps; classifier on real held-out digits: "
            f"{clf.score(x_val.reshape(len(x_val), -1).numpy(), y_val.numpy()):.1%}; "
            f"wall {timing['wall_s']:.0f} s, CPU {timing['cpu_s']:.0f} s")
    with open(os.path.join(args.out, "dar_demo.md"), "w") as f:
        f.write(md + "\n\n" + note + "\n")
    summary = {"args": vars(args), "timing": timing, "diagnose_mean": mean_diag,
               "stats": {v: {k: (x.__dict__ if hasattr(x, "__dict__") else x) for k, x in r.items()}
                         for v, r in stats.items()},
               "runs": {v: {s: {k: x for k, x in r.items() if k != "samples"} for s, r in by_seed.items()}
                        for v, by_seed in runs.items()}}
    with open(os.path.join(args.out, "dar_demo.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(md)
    print(note)
    return summary


if __name__ == "__main__":
    main()
