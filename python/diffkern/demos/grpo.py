"""Flash-GRPO end to end on a toy: `python -m diffkern.demos.grpo --out DIR [--quick]`.

1. Pre-train a tiny class-conditional flow model (an MLP velocity field) on a 2-D mixture: class c
   is a Gaussian blob on a ring of radius 3.
2. Align it with a black-box reward (no gradient through it): r(x) = -|x - (mu_c + (0, 1))|, i.e.
   "put class c's samples one unit above its blob".
3. Each GRPO update: 8 prompts (classes) x 8 rollouts of the 20-step shift-3 schedule, every step an
   Euler ODE step except one SDE step (diffkern.flow_sde_step) from the first half of the schedule,
   whose (x_k, y, log p) is stored; then one Adam step on diffkern.nn.FlashGRPOLoss of that step.
Three variants, from the same pre-trained model and seeds:
   naive     each rollout draws its own SDE step, no TGR
   itg       one step per prompt for all its rollouts (IsoTimestepSampler), no TGR
   itg+tgr   ITG and TGR weights
Writes DIR/grpo_demo.json (per-update rewards per variant and seed) and DIR/grpo_demo.png, and
prints a table. Everything runs on CPU through diffkern's C++ kernels.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from .. import _optional
from ..grpo import GRPOStep, IsoTimestepSampler, flow_sde_step, flow_sigmas, grpo_train_step
from ..nn import FlashGRPOLoss

CLASSES, RING, BLOB_STD = 8, 3.0, 0.3
TARGET_SHIFT = torch.tensor([0.0, 1.0])
STEPS, WINDOW = 20, range(10)
VARIANTS = {"naive": dict(iso=False, tgr=False), "itg": dict(iso=True, tgr=False),
            "itg+tgr": dict(iso=True, tgr=True)}


def centres() -> torch.Tensor:
    angle = torch.arange(CLASSES) * (2 * math.pi / CLASSES)
    return RING * torch.stack([angle.cos(), angle.sin()], 1)


class Velocity(torch.nn.Module):
    """v(x, sigma, c): an MLP on x, Fourier features of sigma and a class embedding."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.embed = torch.nn.Embedding(CLASSES, 16)
        self.net = torch.nn.Sequential(torch.nn.Linear(2 + 8 + 16, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, 2))

    def forward(self, x, sigma, c):
        f = sigma[:, None] * torch.arange(1, 5, dtype=x.dtype) * math.pi
        return self.net(torch.cat([x, f.sin(), f.cos(), self.embed(c)], 1))


def pretrain(steps: int, seed: int) -> Velocity:
    """Flow matching: x_sigma = (1 - sigma) x0 + sigma eps, target velocity eps - x0."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Velocity()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    mu = centres()
    for _ in range(steps):
        c = torch.randint(CLASSES, (512,), generator=g)
        x0 = mu[c] + BLOB_STD * torch.randn(512, 2, generator=g)
        eps, sigma = torch.randn(512, 2, generator=g), torch.rand(512, generator=g)
        xs = (1 - sigma[:, None]) * x0 + sigma[:, None] * eps
        loss = (model(xs, sigma, c) - (eps - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def reward(x0: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The black box: minus the distance to one unit above the class's blob."""
    return -(x0 - centres()[c] - TARGET_SHIFT).norm(dim=1)


@torch.no_grad()
def rollout(model, c, k, x, generator):
    """Samples of classes c from initial noise x with the SDE at step k[i] for sample i (ODE elsewhere);
    returns the final samples and what training needs of the SDE step: x_k, y, log p, sigma_k, sigma_k+1."""
    sig = flow_sigmas(STEPS, 3.0, torch.float32)
    stored = {}
    for i in range(STEPS):
        sigma, sigma_next = sig[i].expand(c.shape[0]), sig[i + 1].expand(c.shape[0])
        v = model(x, sigma, c)
        x_ode = x + (sig[i + 1] - sig[i]) * v
        sde = (k == i).nonzero()[:, 0]
        if sde.numel():
            s, sn = sigma[sde].contiguous(), sigma_next[sde].contiguous()
            eps = torch.randn(sde.numel(), 2, generator=generator)
            x_next, y, log_prob, _ = flow_sde_step(x[sde], v[sde].contiguous(), s, sn, eps=eps)
            stored[i] = (sde, x[sde], y, log_prob, s, sn)
            x_ode[sde] = x_next
        x = x_ode
    parts = [torch.cat(t) for t in zip(*stored.values())]
    order = torch.argsort(parts[0])
    return x, [p[order] for p in parts[1:]]


def grpo(base: Velocity, variant: str, updates: int, prompts: int, group: int, lr: float, seed: int):
    """(mean reward of each update's rollouts (the policy before that update), the tuned model)."""
    cfg = VARIANTS[variant]
    model = Velocity()
    model.load_state_dict(base.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = FlashGRPOLoss(tgr=cfg["tgr"])
    sampler = IsoTimestepSampler(STEPS, WINDOW, seed=seed)
    # the naive variant's steps come from their own stream: every variant sees the same prompts and noise
    g, g_naive = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 10_000)
    curve = []
    for _ in range(updates):
        prompt = torch.randint(CLASSES, (prompts,), generator=g).repeat_interleave(group)
        ids = torch.arange(prompts).repeat_interleave(group)
        if cfg["iso"]:
            k = sampler.sample(ids)
        else:
            k = torch.tensor(list(WINDOW))[torch.randint(len(WINDOW), ids.shape, generator=g_naive)]
        x_init = torch.randn(prompts * group, 2, generator=g)
        x0, (x_k, y, log_prob_old, sigma, sigma_next) = rollout(model, prompt, k, x_init, g)
        r = reward(x0, prompt)
        curve.append(r.mean().item())
        step = GRPOStep(x_k, y, sigma, sigma_next, log_prob_old, {"class": prompt}, prompt_ids=ids, rewards=r)
        opt.zero_grad()
        grpo_train_step(lambda x, s, cond: model(x, s, cond["class"]), step, loss_fn)
        opt.step()
    return curve, model


@torch.no_grad()
def samples(model, n_per_class: int, seed: int):
    """(x, c): n_per_class samples of every class from the deterministic (all ODE) sampler."""
    g = torch.Generator().manual_seed(seed)
    c = torch.arange(CLASSES).repeat_interleave(n_per_class)
    x = torch.randn(c.shape[0], 2, generator=g)
    sig = flow_sigmas(STEPS, 3.0, torch.float32)
    for i in range(STEPS):
        x = x + (sig[i + 1] - sig[i]) * model(x, sig[i].expand(c.shape[0]), c)
    return x, c


def plot(path: str, curves: dict, final_samples: dict) -> None:
    matplotlib = _optional.require("matplotlib", "demos")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, *scatters) = plt.subplots(1, 1 + len(final_samples), figsize=(5 + 4 * len(final_samples), 4))
    for name, runs in curves.items():
        t = torch.tensor(runs)
        mean, std = t.mean(0), t.std(0) if t.shape[0] > 1 else torch.zeros(t.shape[1])
        ax.plot(mean.numpy(), label=name)
        ax.fill_between(range(t.shape[1]), (mean - std).numpy(), (mean + std).numpy(), alpha=0.2)
    ax.set(xlabel="GRPO update", ylabel="mean rollout reward", title="Flash-GRPO on a 2-D toy (mean +- std over seeds)")
    ax.legend()
    target = centres() + TARGET_SHIFT
    for axis, (name, (x, c)) in zip(scatters, final_samples.items()):
        axis.scatter(x[:, 0], x[:, 1], c=c, s=3, cmap="tab10")
        axis.scatter(target[:, 0], target[:, 1], marker="x", color="k", label="reward's optimum")
        axis.set(title=name, aspect="equal", xlim=(-4.5, 4.5), ylim=(-4.5, 5))
        axis.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out: str, quick: bool = False, seeds: int | None = None) -> dict:
    # The model is tiny: thread synchronisation would cost more than its matmuls.
    torch.set_num_threads(1)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    seeds = seeds or (1 if quick else 3)
    p = dict(updates=8, prompts=4, group=8, lr=1e-3) if quick else dict(updates=80, prompts=8, group=8, lr=1e-3)
    base = pretrain(200 if quick else 2000, seed=0)
    runs = {name: [grpo(base, name, seed=s, **p) for s in range(seeds)] for name in VARIANTS}
    curves = {name: [curve for curve, _ in rs] for name, rs in runs.items()}
    # the scatter panels: the pre-trained model and the itg+tgr policy of seed 0, sampled with the ODE
    final = {"pre-trained": samples(base, 64, 0), "after itg+tgr": samples(runs["itg+tgr"][0][1], 64, 0)}
    plot(os.path.join(out, "grpo_demo.png"), curves, final)
    window = max(1, p["updates"] // 10)
    table = {}
    for name, runs in curves.items():
        first, last = (torch.tensor([sum(r[part]) / window for r in runs])
                       for part in (slice(None, window), slice(-window, None)))
        table[name] = {"first": first.mean().item(), "last": last.mean().item(),
                       "last_std_over_seeds": last.std().item() if len(runs) > 1 else 0.0}
    result = {"params": p, "seeds": seeds, "quick": quick, "curves": curves, "table": table,
              "seconds": round(time.perf_counter() - start, 1)}
    with open(os.path.join(out, "grpo_demo.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for grpo_demo.json and grpo_demo.png")
    parser.add_argument("--quick", action="store_true", help="a few updates, one seed: a smoke run")
    parser.add_argument("--seeds", type=int, help="GRPO runs per variant (default 3, quick 1)")
    args = parser.parse_args(argv)
    result = run(args.out, args.quick, args.seeds)
    w = max(1, result["params"]["updates"] // 10)
    print(f"mean rollout reward, first vs last {w} updates, {result['seeds']} seed(s):")
    print(f"{'variant':10s} {'first':>8s} {'last':>8s} {'(std)':>7s} {'gain':>8s}")
    for name, row in result["table"].items():
        print(f"{name:10s} {row['first']:8.3f} {row['last']:8.3f} {row['last_std_over_seeds']:7.3f} "
              f"{row['last'] - row['first']:+8.3f}")
    print(f"wrote {args.out}/grpo_demo.json and grpo_demo.png in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
