"""NoiseTilt on CPU in minutes: reward vs NFE for base, DPS, best-of-N, SVDD-like and NTRK, and how
Gaussian the injected noise stays (DPS vs NTRK).

Data: 16x16 images of one Gaussian bump (random centre and width) on a dark background. Model: an MLP
velocity field trained in-process by flow matching (x_t = (1 - t) x0 + t eps, v = eps - x0). Reward
(analytic, differentiable): log of the share of softmax(4 x) mass in the top-left quadrant, i.e. "the
bump sits top-left" (0 is the best; a bump elsewhere scores about -3). Realism: the mean squared
distance of a sample to the nearest image of the data family (a grid of bump centres and widths):
guidance that leaves the data manifold raises it.

    python -m diffkern.demos.ntrk --out DIR [--quick]
writes DIR/ntrk_demo.md (the tables) and DIR/ntrk_demo.png (reward vs NFE); the trained model is kept
in DIR and reused by a later run with the same DIR.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
from torch import nn

from .. import _optional
from ..ntrk.diagnostics import gaussianity, looks_gaussian
from ..sampling import BaseSampler, DPSSampler, NTRKSampler, SVDDSampler, best_of_n

SIDE = 16


def _bump(c, w):
    ys, xs = torch.meshgrid(torch.arange(SIDE, dtype=torch.float32), torch.arange(SIDE, dtype=torch.float32),
                            indexing="ij")
    d2 = (ys - c[:, 0, None, None]) ** 2 + (xs - c[:, 1, None, None]) ** 2
    return 2 * torch.exp(-d2 / (2 * w[:, None, None] ** 2)) - 1


def bumps(n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 1, 16, 16] images: 2 exp(-|p - c|^2 / (2 w^2)) - 1, c uniform in [2, 13]^2, w in [1.2, 2.5]."""
    c = 2 + 11 * torch.rand(n, 2, generator=generator)
    w = 1.2 + 1.3 * torch.rand(n, generator=generator)
    return _bump(c, w).unsqueeze(1)


def off_manifold(x: torch.Tensor) -> torch.Tensor:
    """Per image, the mean squared distance to the nearest bump of a grid (centres step 0.5, widths step 0.1)."""
    grid = torch.arange(2, 13.01, 0.5)
    widths = torch.arange(1.2, 2.51, 0.1)
    cy, cx, w = torch.meshgrid(grid, grid, widths, indexing="ij")
    t = _bump(torch.stack([cy.flatten(), cx.flatten()], 1), w.flatten()).flatten(1)
    f = x.flatten(1)
    d2 = f.pow(2).sum(1, keepdim=True) - 2 * f @ t.T + t.pow(2).sum(1)
    return d2.min(1).values / f.shape[1]


def reward(x: torch.Tensor) -> torch.Tensor:
    """log(softmax(4 x) mass in the top-left 8x8 quadrant), per image: [B]."""
    z = 4 * x.flatten(1)
    quad = (4 * x[:, :, : SIDE // 2, : SIDE // 2]).flatten(1)
    return torch.logsumexp(quad, 1) - torch.logsumexp(z, 1)


class Velocity(nn.Module):
    """v(x, t): an MLP on the flattened image and Fourier features of t."""

    def __init__(self, width: int = 512):
        super().__init__()
        n = SIDE * SIDE
        self.net = nn.Sequential(nn.Linear(n + 16, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, n))
        self.register_buffer("freqs", torch.pi * 2.0 ** torch.arange(8))

    def forward(self, x, t):
        tf = t[:, None] * self.freqs
        h = torch.cat([x.flatten(1), torch.sin(tf), torch.cos(tf)], 1)
        return self.net(h).reshape(x.shape)


def train(iters: int, generator: torch.Generator) -> Velocity:
    model = Velocity()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    for _ in range(iters):
        x0 = bumps(256, generator)
        eps = torch.randn(x0.shape, generator=generator)
        t = torch.rand(256, generator=generator)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
        loss = (model(xt, t) - (eps - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval().requires_grad_(False)


def run(name, sampler, n, batch, generator):
    start = lambda: torch.randn(batch, 1, SIDE, SIDE, generator=generator)  # noqa: E731
    t0 = time.perf_counter()
    x, trace = best_of_n(sampler, start, n, generator)
    r = trace.reward
    return {"method": name, "NFE": trace.nfe, "VJP": trace.grads, "reward": r.mean().item(),
            "se": r.std().item() / math.sqrt(r.numel()), "top_left": (r > -0.7).float().mean().item(),
            "off": off_manifold(x).mean().item(),
            "seconds": time.perf_counter() - t0, "trace": trace, "x": x}


def noise_check(trace) -> dict:
    """The injected perturbation of every step, pooled over the batch: moments, KS, pass rate."""
    stats = [gaussianity(p) for p in trace.perturbations]
    passed = sum(looks_gaussian(p) for p in trace.perturbations)
    mean = lambda k: sum(abs(s[k]) for s in stats) / len(stats)  # noqa: E731
    return {"steps": len(stats), "pass": passed, "|mean|": mean("mean"),
            "var": sum(s["var"] for s in stats) / len(stats),
            "|skew|": mean("skew"), "|kurt|": mean("kurt"), "KS": mean("ks"), "KS max": max(s["ks"] for s in stats)}


def _weakest_near_best(sweeps, prefix: str) -> float:
    """The smallest guidance strength whose one-run reward is within 0.05 of the best of its sweep
    (stronger guidance past that point only moves samples further off the data manifold)."""
    rows = [s for s in sweeps if s["method"].startswith(prefix)]
    top = max(r["reward"] for r in rows)
    return min(float(r["method"].split("=")[1]) for r in rows if r["reward"] >= top - 0.05)


def _trained(out_dir: str, iters: int, generator: torch.Generator) -> tuple[Velocity, str]:
    """The velocity model, trained now or loaded from an earlier run's out_dir/ntrk_demo_model_<iters>.pt."""
    path = os.path.join(out_dir, f"ntrk_demo_model_{iters}.pt")
    if os.path.exists(path):
        model = Velocity()
        model.load_state_dict(torch.load(path))
        return model.eval().requires_grad_(False), f"loaded from {path}"
    t0 = time.perf_counter()
    model = train(iters, generator)
    torch.save(model.state_dict(), path)
    return model, f"trained in {time.perf_counter() - t0:.0f} s"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for ntrk_demo.md and ntrk_demo.png")
    ap.add_argument("--quick", action="store_true", help="a smaller model, batch and N grid (smoke test)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (small ops: 1 is fastest)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    iters, batch, ns = (300, 16, (1, 2)) if args.quick else (2500, 64, (1, 2, 4, 8))
    model, how = _trained(args.out, iters, gen)
    lines = [f"# NoiseTilt demo: 16x16 bump images, top-left reward ({iters} training steps, {how}; "
             f"batch {batch}; 25 SDE steps)", ""]
    data = bumps(4096, gen)
    data_r = reward(data)
    lines.append(f"Data: mean reward {data_r.mean():.3f}, share with reward > -0.7 (bump top-left): "
                 f"{(data_r > -0.7).float().mean():.3f}, off-manifold MSE {off_manifold(data[:512]).mean():.4f}")
    # one-run sweeps of the guidance strength, best value kept for the NFE-matched runs
    sweeps = []
    for scale in (1.0, 3.0, 10.0):
        sweeps.append(run(f"DPS scale={scale}", DPSSampler(model, reward, scale=scale), 1, batch, gen))
    for rho in (0.03, 0.1, 0.3):
        sweeps.append(run(f"NTRK rho={rho}", NTRKSampler(model, reward, rho=rho, tile=16), 1, batch, gen))
    scale, rho = _weakest_near_best(sweeps, "DPS"), _weakest_near_best(sweeps, "NTRK")
    rows = []
    for n in ns:
        rows.append(run(f"base (best-of-{n})", BaseSampler(model, reward), n, batch, gen))
        rows.append(run(f"DPS scale={scale} (best-of-{n})", DPSSampler(model, reward, scale=scale), n, batch, gen))
        rows.append(run(f"NTRK rho={rho} (best-of-{n})", NTRKSampler(model, reward, rho=rho, tile=16), n, batch, gen))
    for k in ((1, 3) if args.quick else (1, 3, 7)):
        rows.append(run(f"SVDD K={k}", SVDDSampler(model, reward, k=k), 1, batch, gen))
    header = "| method | NFE | VJP | mean reward (+- se) | share top-left | off-manifold MSE | seconds |"
    rule = "|---|---|---|---|---|---|---|"
    fmt = lambda r: (f"| {r['method']} | {r['NFE']:.0f} | {r['VJP']:.0f} | "  # noqa: E731
                     f"{r['reward']:.3f} +- {r['se']:.3f} | {r['top_left']:.2f} | {r['off']:.4f} | "
                     f"{r['seconds']:.1f} |")
    lines += ["", "## Guidance strength sweep (one run each)", "", header, rule, *map(fmt, sweeps), "",
              "## Reward vs NFE (matched NFE through best-of-N / K)", "", header, rule,
              *map(fmt, sorted(rows, key=lambda r: (r["NFE"], r["method"])))]
    checks = [("base", run("base", BaseSampler(model, reward, record=True), 1, batch, gen)),
              (f"DPS scale={scale}", run("DPS", DPSSampler(model, reward, scale=scale, record=True), 1, batch, gen)),
              (f"NTRK rho={rho}", run("NTRK", NTRKSampler(model, reward, rho=rho, tile=16, record=True), 1, batch,
                                      gen))]
    lines += ["", "## Injected noise (x' - mu_model) / s per step, pooled over the batch "
              f"({batch * SIDE * SIDE} entries): Gaussianity", "",
              "| sampler | steps passing (moments within 5 se, KS p >= 1e-3) | mean abs mean | mean var | "
              "mean abs skew | mean abs excess kurt | mean KS | max KS |", "|---|---|---|---|---|---|---|---|"]
    for name, r in checks:
        c = noise_check(r["trace"])
        lines.append(f"| {name} | {c['pass']}/{c['steps']} | {c['|mean|']:.4f} | {c['var']:.3f} | {c['|skew|']:.3f} | "
                     f"{c['|kurt|']:.3f} | {c['KS']:.4f} | {c['KS max']:.4f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "ntrk_demo.md"), "w") as f:
        f.write(text)
    _plot(rows, os.path.join(args.out, "ntrk_demo.png"))
    print(text)


def _plot(rows, path):
    matplotlib = _optional.require("matplotlib", "demos")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for prefix in ("base", "DPS", "NTRK", "SVDD"):
        pts = sorted((r["NFE"], r["reward"], r["se"]) for r in rows if r["method"].startswith(prefix))
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], marker="o", capsize=3, label=prefix)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("NFE per sample (velocity evaluations)")
    ax.set_ylabel("mean reward")
    ax.set_title("16x16 bumps, top-left reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
