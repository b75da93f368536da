"""NoiseTilt on CPU in minutes: does reward guidance keep samples on the data distribution, at equal NFE?

Data: 16x16 images of one Gaussian bump (random centre and width) on a dark background. Model: an MLP
velocity field trained in-process by flow matching (x_t = (1 - t) x0 + t eps, v = eps - x0), one per
seed. Reward (analytic, differentiable): log of the share of softmax(4 x) mass in the top-left quadrant,
i.e. "the bump sits top-left" (0 is the best; a bump elsewhere scores about -3).

Methods at equal NFE (25 per trajectory, budgets N = 1, 4, 8 trajectories): best-of-N of base, DPS and
NTRK; SVDD with K = N - 1 candidates per step; at N = 1 also NTRK-raw, NTRK's step with the gradient
only scaled to unit rms instead of whitened (the ablation of W). Measures per method and seed: the
reward; MMD^2 (diffkern.ntrk.mmd, permutation test) against held-out draws of the data and of the data
given the goal (reward > TOP_LEFT: real bumps that sit top-left, what a guided sampler that stays on
the data manifold should produce); the nearest-bump MSE; and per step whether the injected noise passes
diffkern.ntrk.diagnostics.looks_gaussian (marginal) and looks_white (marginal + spectral).
Across seeds: Student-t intervals (diffkern.demos.seeds), paired for the NTRK - other differences.

    python -m diffkern.demos.ntrk --out DIR [--quick] [--seeds S]
writes DIR/ntrk_demo.md (tables), DIR/ntrk_demo.json (every number, per seed) and DIR/ntrk_demo.png
(reward and MMD^2 vs NFE); the trained models are kept in DIR and reused by a later run with the same DIR.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch
from torch import nn

from .. import _optional
from ..ntrk.diagnostics import common_direction_p, looks_gaussian, looks_white
from ..ntrk.mmd import median_bandwidth, mmd_test
from ..sampling import BaseSampler, DPSSampler, NTRKSampler, SVDDSampler, best_of_n
from .seeds import fmt, t_interval

SIDE = 16
TOP_LEFT = -0.7  # reward above which the bump sits top-left: the goal


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


def top_left_bumps(n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 1, 16, 16] draws of the data conditioned on the reward's goal (reward > TOP_LEFT), by rejection."""
    kept, have = [], 0
    while have < n:
        x = bumps(4 * n, generator)
        x = x[reward(x) > TOP_LEFT]
        kept.append(x)
        have += x.shape[0]
    return torch.cat(kept)[:n]


def _trained(out_dir: str, iters: int, seed: int, generator: torch.Generator) -> Velocity:
    """The seed's velocity model, trained now or loaded from an earlier run's
    out_dir/ntrk_demo_model_<iters>_<seed>.pt."""
    path = os.path.join(out_dir, f"ntrk_demo_model_{iters}_{seed}.pt")
    if os.path.exists(path):
        model = Velocity()
        model.load_state_dict(torch.load(path))
        return model.eval().requires_grad_(False)
    model = train(iters, generator)
    torch.save(model.state_dict(), path)
    return model


def _weakest_near_best(rewards: dict) -> float:
    """The smallest guidance strength whose one-run mean reward is within 0.05 of the best of its sweep
    (stronger guidance past that point only moves samples further off the data manifold)."""
    top = max(rewards.values())
    return min(k for k, r in rewards.items() if r >= top - 0.05)


def _samplers(model, n: int, scale: float, rho: float, record: bool) -> dict:
    """The methods at a budget of n trajectories' NFE (25 n): best-of-n of base / DPS / NTRK, SVDD with
    K = n - 1 candidates (1 + K NFE per step but the last), NTRK-raw (unwhitened g / rms g) at n = 1."""
    ntrk = dict(rho=rho, tile=16, record=record)
    methods = {"base": BaseSampler(model, reward, record=record),
               "DPS": DPSSampler(model, reward, scale=scale, record=record),
               "NTRK": NTRKSampler(model, reward, **ntrk)}
    if n == 1:
        methods["NTRK-raw"] = NTRKSampler(model, reward, domains=(), **ntrk)
    else:
        methods["SVDD"] = SVDDSampler(model, reward, k=n - 1)
    return methods


def _measure(x, r, refs: dict, p: dict, generator) -> dict:
    """Reward, goal share, nearest-bump MSE and MMD^2 (with its permutation p) against each reference set."""
    row = {"reward": r.mean().item(), "top_left": (r > TOP_LEFT).float().mean().item(),
           "off": off_manifold(x).mean().item()}
    for name, (ref, h) in refs.items():
        t = mmd_test(x, ref, bandwidth=h, permutations=p["permutations"], generator=generator)
        row[f"mmd_{name}"], row[f"p_{name}"] = t["mmd2"], t["p"]
    return row


def _noise_checks(trace) -> dict:
    """Per step of one run: does the injected noise pass the marginal check, the marginal + spectral check,
    and does the batch share a mean direction (p < 1e-3)?"""
    ps = trace.perturbations
    return {"steps": len(ps), "marginal": sum(looks_gaussian(z) for z in ps), "white": sum(looks_white(z) for z in ps),
            "shared": sum(common_direction_p(z) < 1e-3 for z in ps),
            "var": sum(z.double().var().item() for z in ps) / len(ps)}


def one_seed(seed: int, p: dict, out: str) -> dict:
    """Everything measured for one seed: its own model, held-out data, guidance sweep and the method rows."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    t0 = time.process_time()
    model = _trained(out, p["iters"], seed, gen)
    held = torch.Generator().manual_seed(10_000 + seed)  # held-out data: never seen in training
    data, goal = bumps(p["held_out"], held), top_left_bumps(p["held_out"], held)
    refs = {"data": (data, median_bandwidth(data)), "goal": (goal, median_bandwidth(goal))}
    start = lambda: torch.randn(p["batch"], 1, SIDE, SIDE, generator=gen)  # noqa: E731
    rows = {}
    for name, fresh in (("data", bumps(p["batch"], held)), ("goal data", top_left_bumps(p["batch"], held))):
        rows[f"{name}@0"] = {"NFE": 0, "VJP": 0, **_measure(fresh, reward(fresh), refs, p, gen)}
    dps = {s: best_of_n(DPSSampler(model, reward, scale=s), start, 1, gen)[1].reward.mean().item() for s in p["scales"]}
    ntrk = {r: best_of_n(NTRKSampler(model, reward, rho=r, tile=16), start, 1, gen)[1].reward.mean().item()
            for r in p["rhos"]}
    scale, rho = _weakest_near_best(dps), _weakest_near_best(ntrk)
    noise = {}
    for n in p["ns"]:
        for name, sampler in _samplers(model, n, scale, rho, record=n == 1).items():
            c0 = time.process_time()
            x, trace = best_of_n(sampler, start, 1 if name == "SVDD" else n, gen)
            rows[f"{name}@{n}"] = {"NFE": trace.nfe, "VJP": trace.grads, **_measure(x, trace.reward, refs, p, gen),
                                   "cpu_s": time.process_time() - c0}
            if n == 1:
                noise[name] = _noise_checks(trace)
    return {"seed": seed, "scale": scale, "rho": rho, "sweep": {"DPS": dps, "NTRK": ntrk}, "rows": rows,
            "noise": noise, "cpu_s": time.process_time() - t0}


METRICS = ("reward", "top_left", "mmd_data", "mmd_goal", "off")
FULL = dict(seeds=5, iters=2500, batch=256, held_out=512, ns=(1, 4, 8), scales=(1.0, 3.0, 10.0),
            rhos=(0.03, 0.1, 0.3), permutations=200)
QUICK = dict(seeds=2, iters=150, batch=16, held_out=48, ns=(1, 2), scales=(3.0,), rhos=(0.1,), permutations=20)


def summarise(seeds: list) -> dict:
    """Across seeds: per row and metric a Student-t interval; per budget the paired NTRK - other differences."""
    rows = {}
    for key in seeds[0]["rows"]:
        per = [s["rows"][key] for s in seeds]
        rows[key] = {m: t_interval([r[m] for r in per]) for m in METRICS}
        rows[key]["NFE"], rows[key]["VJP"] = per[0]["NFE"], per[0]["VJP"]
        rows[key]["reject_data"] = sum(r["p_data"] < 0.05 for r in per)
        rows[key]["reject_goal"] = sum(r["p_goal"] < 0.05 for r in per)
    diffs = {}
    for key in rows:
        method, n = key.split("@")
        if method != "NTRK":
            continue
        for other in ("base", "DPS", "SVDD", "NTRK-raw"):
            if f"{other}@{n}" in rows:
                diffs[f"NTRK - {other} @{n}"] = {
                    m: t_interval([s["rows"][key][m] - s["rows"][f"{other}@{n}"][m] for s in seeds])
                    for m in ("reward", "mmd_goal", "mmd_data")}
    noise = {name: {k: sum(s["noise"][name][k] for s in seeds) for k in ("steps", "marginal", "white", "shared")}
             for name in seeds[0]["noise"]}
    for name in noise:
        noise[name]["var"] = sum(s["noise"][name]["var"] for s in seeds) / len(seeds)
    return {"rows": rows, "diffs": diffs, "noise": noise}


def _table(summary: dict, seeds: list, p: dict) -> list:
    n_seeds = len(seeds)
    lines = ["| method @ N | NFE | VJP | reward | share top-left | MMD^2 vs data | MMD^2 vs goal data | "
             "nearest-bump MSE | seeds p<0.05 (data / goal) |", "|---|---|---|---|---|---|---|---|---|"]
    for key, r in sorted(summary["rows"].items(), key=lambda kv: (kv[1]["NFE"], kv[0])):
        lines.append(f"| {key} | {r['NFE']:.0f} | {r['VJP']:.0f} | {fmt(r['reward'])} | {fmt(r['top_left'])} | "
                     f"{fmt(r['mmd_data'])} | {fmt(r['mmd_goal'])} | {fmt(r['off'])} | "
                     f"{r['reject_data']}/{n_seeds} / {r['reject_goal']}/{n_seeds} |")
    lines += ["", "Paired across seeds (NTRK minus the other method at the same N; 95% t intervals):", "",
              "| difference | reward | MMD^2 vs goal data | MMD^2 vs data |", "|---|---|---|---|"]
    for key, d in summary["diffs"].items():
        lines.append(f"| {key} | {fmt(d['reward'])} | {fmt(d['mmd_goal'])} | {fmt(d['mmd_data'])} |")
    lines += ["", f"## Injected noise (x' - mu_model) / s, every step of one N = 1 run per seed "
              f"({p['batch']} x {SIDE * SIDE} entries per step)", "",
              "| sampler | steps passing marginal (looks_gaussian) | passing marginal + spectral (looks_white) | "
              "steps with a shared batch direction (p < 1e-3) | mean variance |", "|---|---|---|---|---|"]
    for name, c in summary["noise"].items():
        lines.append(f"| {name} | {c['marginal']}/{c['steps']} | {c['white']}/{c['steps']} | "
                     f"{c['shared']}/{c['steps']} | {c['var']:.4f} |")
    return lines


def run(out: str, quick: bool = False, seeds: int | None = None) -> dict:
    """The whole demo into `out`: ntrk_demo.md, ntrk_demo.json, ntrk_demo.png; returns the JSON's content."""
    p = dict(QUICK if quick else FULL)
    p["seeds"] = seeds or p["seeds"]
    os.makedirs(out, exist_ok=True)
    wall, cpu = time.perf_counter(), time.process_time()
    per_seed = [one_seed(s, p, out) for s in range(p["seeds"])]
    summary = summarise(per_seed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    lines = [f"# NoiseTilt demo: 16x16 bump images, top-left reward; {p['seeds']} seeds (each its own model, "
             f"{p['iters']} training steps), {p['batch']} samples per method and seed, 25 SDE steps", "",
             f"MMD^2: unbiased, Gaussian kernel at the median-heuristic bandwidth of the reference set, against "
             f"{p['held_out']} held-out draws of the data ('data') and of the data given the goal, reward > "
             f"{TOP_LEFT} ('goal data'); permutation test with {p['permutations']} relabellings. "
             f"Guidance strength per seed by a one-run sweep (weakest within 0.05 of the best reward): "
             f"DPS scale {[s['scale'] for s in per_seed]}, NTRK rho {[s['rho'] for s in per_seed]}. "
             f"Cells: mean [95% t interval over seeds].", "", *_table(summary, per_seed, p), "",
             f"Wall {wall:.0f} s, CPU {cpu:.0f} s."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "ntrk_demo.md"), "w") as f:
        f.write(text)
    result = {"params": p, "seeds": per_seed, "summary": _jsonable(summary), "wall_s": wall, "cpu_s": cpu}
    with open(os.path.join(out, "ntrk_demo.json"), "w") as f:
        json.dump(result, f, indent=1)
    _plot(summary, os.path.join(out, "ntrk_demo.png"))
    print(text)
    return result


def _jsonable(summary: dict) -> dict:
    conv = lambda v: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v  # noqa: E731
    return {"rows": {k: {m: conv(v) for m, v in r.items()} for k, r in summary["rows"].items()},
            "diffs": {k: {m: conv(v) for m, v in d.items()} for k, d in summary["diffs"].items()},
            "noise": summary["noise"]}


def _plot(summary: dict, path: str):
    plt = _optional.pyplot("demos")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in ((axes[0], "reward", "mean reward (0 best)"),
                              (axes[1], "mmd_goal", "MMD^2 vs held-out goal data")):
        for method in ("base", "DPS", "NTRK", "SVDD", "NTRK-raw"):
            pts = sorted((r["NFE"], r[metric]) for k, r in summary["rows"].items() if k.split("@")[0] == method)
            if pts:
                ax.errorbar([q[0] for q in pts], [q[1].mean for q in pts],
                            [[q[1].mean - q[1].lo for q in pts], [q[1].hi - q[1].mean for q in pts]],
                            marker="o", capsize=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE per sample (velocity evaluations)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("16x16 bumps, top-left reward: mean and 95% t interval over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for ntrk_demo.md, .json and .png")
    ap.add_argument("--quick", action="store_true", help="the CI smoke size (2 seeds, tiny model and batch)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5, quick 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (small ops: 1 is fastest)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run(args.out, args.quick, args.seeds)


if __name__ == "__main__":
    main()
