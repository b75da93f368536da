"""DAR vs residual: two small SiTs trained side by side on scikit-learn's 8x8 digits, on CPU.

    python -m diffkern.demos.dar --out DIR [--steps 1000] [--batch 64] [--seed 0]

Both models are the same `diffkern.dar.blocks.DiT` (same width, depth, heads, initial weights of every
shared layer), one with the plain residual stream and one with DAR routing (chunked, timestep-injected
query). They see the same batches and the same (t, noise) draws, with the flow-matching velocity loss
of `diffkern.dar.sit`. Afterwards each samples the same noise for every class (Euler ODE), and a
logistic-regression digit classifier trained on the real training images scores whether the samples
show the digit they were asked for. Writes DIR/dar_demo_{loss,samples,diagnose}.png and dar_demo.json
and prints a table; the numbers are whatever this run measures.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from .. import _optional
from ..dar import diagnose
from ..dar.blocks import DiT
from ..dar.sit import sample, velocity_loss

STREAMS = ("residual", "dar")


def load_digits(seed: int):
    """(x_train, y_train, x_val, y_val): 8x8 digits as [N, 1, 8, 8] in [-1, 1], a fixed 1500/297 split."""
    sk_digits = _optional.require("sklearn.datasets", "demos").load_digits
    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return x[:1500], y[:1500], x[1500:], y[1500:]


def build(stream: str, args) -> DiT:
    torch.manual_seed(args.seed)  # both streams start from the same weights in every shared layer
    return DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=args.hidden, depth=args.depth,
               num_heads=args.heads, num_classes=10, learn_sigma=False, class_dropout_prob=0.0, stream=stream,
               chunk_size=args.chunk_size, query=args.query)


@torch.no_grad()
def val_loss(model: DiT, x: torch.Tensor, y: torch.Tensor, draws: int = 4) -> float:
    model.eval()
    loss = sum(velocity_loss(model, x, y, torch.Generator().manual_seed(10_000 + k)).item() for k in range(draws))
    model.train()
    return loss / draws


def train(model: DiT, data, args, log) -> dict:
    x_train, y_train, x_val, y_val = data
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    order = torch.Generator().manual_seed(args.seed + 1)  # the same batches and draws for both models
    draws = torch.Generator().manual_seed(args.seed + 2)
    losses, vals = [], []
    start = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, len(x_train), (args.batch,), generator=order)
        loss = velocity_loss(model, x_train[idx], y_train[idx], draws)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            vals.append((step + 1, val_loss(model, x_val, y_val)))
            log(f"  step {step + 1}: train {np.mean(losses[-args.eval_every:]):.4f}  val {vals[-1][1]:.4f}")
    return {"losses": losses, "val": vals, "train_seconds": time.perf_counter() - start}


def digit_classifier(x: torch.Tensor, y: torch.Tensor):
    LogisticRegression = _optional.require("sklearn.linear_model", "demos").LogisticRegression
    return LogisticRegression(max_iter=2000).fit(x.reshape(len(x), -1).numpy(), y.numpy())


def plot_losses(runs: dict, path: str) -> None:
    matplotlib = _optional.require("matplotlib", "demos")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in runs.items():
        raw = np.asarray(r["losses"])
        k = max(1, len(raw) // 50)
        smooth = np.convolve(raw, np.ones(k) / k, mode="valid")
        line, = ax.plot(np.arange(k, len(raw) + 1), smooth, label=f"{name} train (moving mean of {k})")
        steps, vals = zip(*r["val"])
        ax.plot(steps, vals, "o--", color=line.get_color(), label=f"{name} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("velocity MSE")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(samples: dict, path: str) -> None:
    matplotlib = _optional.require("matplotlib", "demos")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(samples), figsize=(5 * len(samples), 5.4))
    for ax, (name, s) in zip(np.atleast_1d(axes), samples.items()):
        per_class = s.shape[0] // 10
        tiles = torch.nn.functional.pad(s.clamp(-1, 1).reshape(10, per_class, 8, 8), (1, 1, 1, 1), value=-1.0)
        grid = tiles.permute(0, 2, 1, 3).reshape(100, per_class * 10)
        ax.imshow(grid.numpy(), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_title(f"{name}: one row per digit 0-9")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict) -> str:
    head = "| model | params | train loss (last 10%) | val loss | samples classified as asked | train s |"
    lines = [head, "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['params']:,} | {r['train_loss_tail']:.4f} | {r['val_loss']:.4f} | "
                     f"{r['sample_accuracy']:.1%} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the PNGs and dar_demo.json")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--query", default="timestep", choices=("static", "timestep", "dynamic"))
    p.add_argument("--samples-per-class", type=int, default=10)
    p.add_argument("--ode-steps", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (models this small gain little from more)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    data = load_digits(args.seed)
    classifier = digit_classifier(data[0], data[1])
    real_acc = float(classifier.score(data[2].reshape(len(data[2]), -1).numpy(), data[3].numpy()))
    per_class = args.samples_per_class
    labels = torch.arange(10).repeat_interleave(per_class)
    noise = torch.randn(10 * per_class, 1, 8, 8, generator=torch.Generator().manual_seed(args.seed + 3))
    results, models, samples = {}, {}, {}
    for stream in STREAMS:
        log(f"training the {stream} model ({args.steps} steps, batch {args.batch})")
        model = build(stream, args)
        run = train(model, data, args, log)
        model.eval()
        samples[stream] = sample(model, noise, labels, steps=args.ode_steps)
        predicted = classifier.predict(samples[stream].clamp(-1, 1).reshape(len(labels), -1).numpy())
        tail = max(1, args.steps // 10)
        results[stream] = {"params": sum(p.numel() for p in model.parameters()),
                           "train_loss_tail": float(np.mean(run["losses"][-tail:])), "val_loss": run["val"][-1][1],
                           "sample_accuracy": float((predicted == labels.numpy()).mean()), **run}
        models[stream] = model
    plot_losses(results, os.path.join(args.out, "dar_demo_loss.png"))
    plot_samples(samples, os.path.join(args.out, "dar_demo_samples.png"))
    diag = diagnose(models, (data[2][:64], data[3][:64]), path=os.path.join(args.out, "dar_demo_diagnose.png"))
    summary = {"args": vars(args), "classifier_accuracy_on_real_val": real_acc, "diagnose": diag,
               "results": {k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in results.items()},
               "losses": {k: v["losses"] for k, v in results.items()}}
    with open(os.path.join(args.out, "dar_demo.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(table(results))
    print(f"(the digit classifier scores {real_acc:.1%} on real held-out digits; {per_class} samples per class, "
          f"{args.ode_steps} Euler steps, same noise for both models)")
    return summary


if __name__ == "__main__":
    main()
