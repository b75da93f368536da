"""Flash-GRPO on a timestep-confounded toy: `python -m diffkern.demos.grpo --out DIR [--quick] [--seeds N]`.

The task (as in a video model, early steps decide the layout, late steps the detail):
1. Pre-train a tiny class-conditional flow model (an MLP velocity field) on a 2-D mixture: class c is two
   Gaussian blobs ("layouts") at opposite points of a ring, angle phi_c and phi_c + pi.
2. Align it with a black-box reward (no gradient through it):
       r(x, c) = layout + detail,  layout = 1 if x is nearer the preferred blob (angle phi_c) than the other, else 0
                                   detail = -min(|x - target_c|, 1), target_c = preferred blob + 0.5 along the ring
   A noise kick at a high-sigma step can flip the layout (a jump of about 1); one at a low-sigma step only moves
   the detail: the reward's spread depends on the step at which the SDE step was taken (measured in
   `sensitivity` and written to the table).
3. Each GRPO update: P prompts (classes) x G rollouts; the G rollouts of a prompt share their initial noise
   (so within a group only the SDE step differs), and every step is an Euler ODE step except one SDE step
   (diffkern.flow_sde_step) from WINDOW, whose (x_k, y, log p) is stored; then one Adam step on
   diffkern.nn.FlashGRPOLoss of that step (grpo_train_step). WINDOW is the whole schedule, not the paper's
   first half: on this toy the layout is decided over steps 0-14 and the first half alone has a flat sensitivity.
Three variants, from the same pre-trained model, prompts and noise for a given seed (so seeds pair them):
   naive     each rollout draws its own SDE step: a group's advantages mix noise levels, no TGR
   itg       one step per prompt for all its rollouts (IsoTimestepSampler), no TGR
   itg+tgr   ITG and TGR weights (1/lambda(t) normalised over the batch)
Evaluation: the ODE sampler from a fixed set of EVAL_PER_CLASS noises per class; a run "collapses" when its
final evaluation reward is below the pre-trained model's on the same set, or its samples' diversity below
COLLAPSE_DIVERSITY of the pre-trained model's. `gradient_agreement` measures the mechanism directly.
Across-seed intervals are Student-t (diffkern.demos.seeds). Writes DIR/grpo_demo.json, DIR/grpo_demo.md (the
tables) and DIR/grpo_demo.png. Everything runs on CPU through diffkern's C++ kernels.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import torch

from .. import _optional
from ..grpo import GRPOStep, IsoTimestepSampler, flow_sde_step, flow_sigmas, grpo_train_step
from ..nn import FlashGRPOLoss
from .seeds import fmt, t_interval, t_interval_dict

CLASSES, RADIUS, BLOB_STD, DETAIL_SHIFT = 4, 2.5, 0.25, 0.5
STEPS, SHIFT = 20, 3.0
WINDOW = range(STEPS)
EVAL_PER_CLASS = 256
COLLAPSE_DIVERSITY = 0.1
VARIANTS = {"naive": dict(iso=False, tgr=False), "itg": dict(iso=True, tgr=False),
            "itg+tgr": dict(iso=True, tgr=True)}
FULL = dict(updates=300, prompts=8, group=8, lr=3e-4, pretrain=3000, seeds=16, eval_every=10,
            grad_batches=256)
QUICK = dict(updates=6, prompts=4, group=4, lr=1e-3, pretrain=150, seeds=2, eval_every=3, grad_batches=4)


def blobs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(preferred, other, target): [CLASSES, 2] each; the class's two layout blobs and the reward's optimum."""
    angle = torch.arange(CLASSES) * (math.pi / CLASSES)
    radial = torch.stack([angle.cos(), angle.sin()], 1)
    tangent = torch.stack([-angle.sin(), angle.cos()], 1)
    return RADIUS * radial, -RADIUS * radial, RADIUS * radial + DETAIL_SHIFT * tangent


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
    """Flow matching on the two-layout mixture: x_sigma = (1 - sigma) x0 + sigma eps, target velocity eps - x0."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Velocity()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    preferred, other, _ = blobs()
    for _ in range(steps):
        c = torch.randint(CLASSES, (512,), generator=g)
        layout = torch.rand(512, generator=g) < 0.5
        centre = torch.where(layout[:, None], preferred[c], other[c])
        x0 = centre + BLOB_STD * torch.randn(512, 2, generator=g)
        eps, sigma = torch.randn(512, 2, generator=g), torch.rand(512, generator=g)
        xs = (1 - sigma[:, None]) * x0 + sigma[:, None] * eps
        loss = (model(xs, sigma, c) - (eps - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def reward_parts(x0: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(layout, detail) [B] each: the black box's two terms (module docstring); the reward is their sum."""
    preferred, other, target = blobs()
    layout = ((x0 - preferred[c]).norm(dim=1) < (x0 - other[c]).norm(dim=1)).to(x0.dtype)
    return layout, -(x0 - target[c]).norm(dim=1).clamp(max=1.0)


def reward(x0: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    layout, detail = reward_parts(x0, c)
    return layout + detail


@torch.no_grad()
def rollout(model, c, k, x, generator):
    """Samples of classes c from initial noise x with the SDE at step k[i] for sample i (ODE elsewhere, k[i] = -1:
    none); returns the final samples and what training needs of the SDE step: x_k, y, log p, sigma_k, sigma_k+1."""
    sig = flow_sigmas(STEPS, SHIFT, torch.float32)
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
    if not stored:
        return x, None
    parts = [torch.cat(t) for t in zip(*stored.values())]
    order = torch.argsort(parts[0])
    return x, [p[order] for p in parts[1:]]


@torch.no_grad()
def sensitivity(model, n_groups: int, group: int, seed: int) -> dict:
    """The task's timestep dependence under `model`: for each step k, n_groups initial noises x group SDE draws
    at step k (ODE elsewhere); per k the mean within-group std of the reward, the fraction of samples whose
    layout differs from the all-ODE sample's of the same noise, and the mean reward."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(CLASSES, (n_groups,), generator=g).repeat_interleave(group)
    x_init = torch.randn(n_groups, 2, generator=g).repeat_interleave(group, 0)
    ode, _ = rollout(model, c, torch.full_like(c, -1), x_init, g)
    ode_layout = reward_parts(ode, c)[0]
    rows = {"std": [], "flip": [], "mean": []}
    for step in range(STEPS):
        x0, _ = rollout(model, c, torch.full_like(c, step), x_init, g)
        r = reward(x0, c)
        rows["std"].append(r.view(n_groups, group).std(1).mean().item())
        rows["flip"].append((reward_parts(x0, c)[0] != ode_layout).double().mean().item())
        rows["mean"].append(r.mean().item())
    return rows


@torch.no_grad()
def samples(model, per_class: int, seed: int):
    """(x, c): per_class ODE samples of every class."""
    g = torch.Generator().manual_seed(seed)
    c = torch.arange(CLASSES).repeat_interleave(per_class)
    x0, _ = rollout(model, c, torch.full_like(c, -1), torch.randn(c.shape[0], 2, generator=g), g)
    return x0, c


@torch.no_grad()
def evaluate(model, per_class: int = EVAL_PER_CLASS, seed: int = 12345) -> dict:
    """The ODE sampler from fixed noises: mean reward, layout rate, detail, and diversity (the mean over classes
    of sqrt(trace of the samples' covariance))."""
    x0, c = samples(model, per_class, seed)
    layout, detail = reward_parts(x0, c)
    spread = x0.view(CLASSES, per_class, 2).var(1).sum(1).sqrt().mean()
    return {"reward": (layout + detail).mean().item(), "layout": layout.mean().item(),
            "detail": detail.mean().item(), "diversity": spread.item()}


def rollout_step(model, iso: bool, sampler: IsoTimestepSampler, g, g_naive, prompts: int, group: int) -> GRPOStep:
    """One update's rollouts: `prompts` random classes x `group` rollouts sharing their initial noise, the SDE step
    per prompt from the sampler (iso) or per rollout uniformly over WINDOW from g_naive; the GRPOStep to train."""
    prompt = torch.randint(CLASSES, (prompts,), generator=g).repeat_interleave(group)
    ids = torch.arange(prompts).repeat_interleave(group)
    window = torch.tensor(list(WINDOW))
    k = sampler.sample(ids) if iso else window[torch.randint(len(window), ids.shape, generator=g_naive)]
    x_init = torch.randn(prompts, 2, generator=g).repeat_interleave(group, 0)  # shared within a group
    x0, (x_k, y, log_prob_old, sigma, sigma_next) = rollout(model, prompt, k, x_init, g)
    return GRPOStep(x_k, y, sigma, sigma_next, log_prob_old, {"class": prompt}, prompt_ids=ids,
                    rewards=reward(x0, prompt))


def gradient_agreement(base: Velocity, variant: str, batches: int, prompts: int, group: int, seed: int) -> dict:
    """The mechanism's direct measure: `batches` independent one-update gradients of the pre-trained model, and
    per batch the cosine between its gradient and the mean of the others' (leave one out): near 0 when the
    advantages are mostly noise, near 1 when every batch points the same way. Its across-batch interval."""
    cfg, model = VARIANTS[variant], copy.deepcopy(base)
    loss_fn = FlashGRPOLoss(tgr=cfg["tgr"])
    sampler = IsoTimestepSampler(STEPS, WINDOW, seed=seed)
    g, g_naive = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 10_000)
    grads = []
    for _ in range(batches):
        step = rollout_step(model, cfg["iso"], sampler, g, g_naive, prompts, group)
        model.zero_grad()
        grpo_train_step(lambda x, s, cond: model(x, s, cond["class"]), step, loss_fn)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    grads = torch.stack(grads)
    others = (grads.sum(0) - grads) / (batches - 1)
    return t_interval_dict(torch.nn.functional.cosine_similarity(grads, others, dim=1).tolist())


def eval_points(updates: int, eval_every: int) -> list[int]:
    """The updates before which the evaluation runs, and the end of training."""
    return list(range(0, updates, eval_every)) + [updates]


def grpo(base: Velocity, variant: str, updates: int, prompts: int, group: int, lr: float, seed: int,
         eval_every: int) -> dict:
    """One GRPO run: per-update mean rollout reward (the policy before that update), the evaluation reward at
    eval_points(updates, eval_every), the final evaluation and the tuned model."""
    cfg, model = VARIANTS[variant], copy.deepcopy(base)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = FlashGRPOLoss(tgr=cfg["tgr"])
    sampler = IsoTimestepSampler(STEPS, WINDOW, seed=seed)
    # the naive variant's steps come from their own stream: every variant sees the same prompts and noises
    g, g_naive = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 10_000)
    train, evals = [], []
    for u in range(updates):
        if u % eval_every == 0:
            evals.append(evaluate(model)["reward"])
        step = rollout_step(model, cfg["iso"], sampler, g, g_naive, prompts, group)
        train.append(step.rewards.mean().item())
        opt.zero_grad()
        grpo_train_step(lambda x, s, cond: model(x, s, cond["class"]), step, loss_fn)
        opt.step()
    final = evaluate(model)
    evals.append(final["reward"])
    return {"train": train, "eval": evals, "final": final, "model": model}


def collapsed(final: dict, pre: dict) -> bool:
    """A run collapses when its final evaluation reward is below the pre-trained model's, or its samples' diversity
    fell below COLLAPSE_DIVERSITY of the pre-trained model's (the policy shrank to a point)."""
    return final["reward"] < pre["reward"] or final["diversity"] < COLLAPSE_DIVERSITY * pre["diversity"]


def summarise(runs: dict, pre: dict) -> dict:
    """Per variant: across-seed intervals of the final evaluation, the gain over the pre-trained model, the mean
    of the evaluation curve, and the collapse count; paired (same seed) differences between the variants."""
    table = {}
    for name, rs in runs.items():
        final = {key: [r["final"][key] for r in rs] for key in ("reward", "layout", "detail", "diversity")}
        area = [sum(r["eval"]) / len(r["eval"]) for r in rs]
        table[name] = {**{key: t_interval_dict(v) for key, v in final.items()},
                       "gain": t_interval_dict([f - pre["reward"] for f in final["reward"]]),
                       "curve_mean": t_interval_dict(area),
                       "collapsed": sum(collapsed(r["final"], pre) for r in rs)}
    pairs = {}
    for a, b in (("itg", "naive"), ("itg+tgr", "itg"), ("itg+tgr", "naive")):
        diff = [x["final"]["reward"] - y["final"]["reward"] for x, y in zip(runs[a], runs[b])]
        pairs[f"{a} - {b}"] = t_interval_dict(diff)
    return {"variants": table, "paired_final_reward": pairs}


def markdown(result: dict) -> str:
    p, pre, s = result["params"], result["pretrained"], result["summary"]
    lines = [f"# Flash-GRPO demo: timestep-confounded toy ({result['seeds']} seeds, 95% Student-t intervals)", "",
             f"{p['updates']} updates of {p['prompts']} prompts x {p['group']} rollouts, window steps "
             f"{WINDOW.start}..{WINDOW.stop - 1} of {STEPS}, lr {p['lr']}. Pre-trained model (evaluation set): reward "
             f"{pre['reward']:.3f}, layout {pre['layout']:.3f}, detail {pre['detail']:.3f}, diversity "
             f"{pre['diversity']:.3f}. Collapse: final evaluation reward below the pre-trained model's, or diversity "
             f"below {COLLAPSE_DIVERSITY} of its.", "",
             "| variant | final reward | gain over pre-trained | curve mean | layout rate | detail | diversity "
             "| collapsed |", "|---|---|---|---|---|---|---|---|"]
    for name, row in s["variants"].items():
        lines.append(f"| {name} | {fmt(row['reward'])} | {fmt(row['gain'])} | {fmt(row['curve_mean'])} | "
                     f"{fmt(row['layout'])} | {fmt(row['detail'])} | {fmt(row['diversity'])} | "
                     f"{row['collapsed']}/{result['seeds']} |")
    lines += ["", "Paired differences of the final reward (same seed: same prompts and noises):", "",
              "| difference | mean [95% CI] |", "|---|---|"]
    lines += [f"| {name} | {fmt(d)} |" for name, d in s["paired_final_reward"].items()]
    lines += ["", "Gradient agreement at the pre-trained model (cosine of one update's gradient with the mean of "
              f"{result['params_grad_batches']} - 1 others, mean [95% CI over batches]):", "",
              "| variant | cosine |", "|---|---|"]
    lines += [f"| {name} | {fmt(d)} |" for name, d in result["gradient_agreement"].items()]
    sens = result["sensitivity"]
    lines += ["", "The task's timestep dependence (pre-trained model, SDE step at k, ODE elsewhere, shared noise per "
              "group): within-group reward std, layout flips vs the ODE sample, mean reward.", "",
              "| k | sigma_k | std | flips | mean |", "|---|---|---|---|---|"]
    sig = flow_sigmas(STEPS, SHIFT)
    lines += [f"| {k} | {sig[k]:.3f} | {sens['std'][k]:.3f} | {sens['flip'][k]:.3f} | {sens['mean'][k]:.3f} |"
              for k in range(STEPS)]
    lines += ["", f"Wall {result['seconds']:.0f} s, CPU {result['cpu_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def plot(path: str, result: dict, final_samples: dict) -> None:
    plt = _optional.pyplot("demos")
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    (ax_eval, ax_train, ax_sens), scatters = axes
    for name, runs in result["curves"].items():
        xs = result["eval_at"]
        ev = torch.tensor(runs["eval"])
        ivs = [t_interval(ev[:, j].tolist()) for j in range(ev.shape[1])]
        ax_eval.plot(xs, [iv.mean for iv in ivs], label=name)
        ax_eval.fill_between(xs, [iv.lo for iv in ivs], [iv.hi for iv in ivs], alpha=0.2)
        tr = torch.tensor(runs["train"])
        w = max(1, tr.shape[1] // 20)
        smooth = torch.nn.functional.avg_pool1d(tr[:, None], w, 1)[:, 0].mean(0)
        ax_train.plot(range(w - 1, tr.shape[1]), smooth.numpy(), label=name)
    ax_eval.axhline(result["pretrained"]["reward"], color="k", ls=":", label="pre-trained")
    ax_eval.set(xlabel="GRPO update", ylabel="evaluation reward (ODE)", title="mean and 95% t-interval over seeds")
    ax_eval.legend(fontsize=8)
    ax_train.set(xlabel="GRPO update", ylabel="rollout reward", title="training rollouts (moving mean, seed mean)")
    ax_train.legend(fontsize=8)
    sens = result["sensitivity"]
    ax_sens.plot(sens["std"], "o-", label="within-group reward std")
    ax_sens.plot(sens["flip"], "s-", label="layout flips")
    ax_sens.axvspan(WINDOW.start - 0.5, WINDOW.stop - 0.5, color="grey", alpha=0.1, label="training window")
    ax_sens.set(xlabel="SDE step k", title="the reward's dependence on the step (pre-trained)")
    ax_sens.legend(fontsize=8)
    preferred, other, target = blobs()
    for axis, (name, (x, c)) in zip(scatters, final_samples.items()):
        axis.scatter(x[:, 0], x[:, 1], c=c, s=3, cmap="tab10", vmin=0, vmax=9)
        axis.scatter(target[:, 0], target[:, 1], marker="x", color="k", label="reward's optimum")
        axis.set(title=name, aspect="equal", xlim=(-4, 4), ylim=(-4, 4))
        axis.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(out: str, quick: bool = False, seeds: int | None = None) -> dict:
    """The whole demo (FULL, or QUICK for a smoke run) with `seeds` GRPO runs per variant (>= 2, default the
    configuration's); writes grpo_demo.json, .md and .png to `out` and returns what the JSON holds.
    Bad input: ValueError naming seeds when it is not an integer >= 2."""
    # The model is tiny: thread synchronisation would cost more than its matmuls.
    torch.set_num_threads(1)
    cfg = dict(QUICK if quick else FULL)
    default_seeds = cfg.pop("seeds")
    seeds = default_seeds if seeds is None else seeds
    if not isinstance(seeds, int) or seeds < 2:
        raise ValueError(f"grpo demo: seeds must be an integer >= 2 (the across-seed t interval), got {seeds!r}")
    os.makedirs(out, exist_ok=True)
    start, cpu = time.perf_counter(), time.process_time()
    base, grad_batches = pretrain(cfg.pop("pretrain"), seed=0), cfg.pop("grad_batches")
    runs = {name: [grpo(base, name, seed=s, **cfg) for s in range(seeds)] for name in VARIANTS}
    pre = evaluate(base)
    agreement = {name: gradient_agreement(base, name, grad_batches, cfg["prompts"], cfg["group"], seed=100)
                 for name in VARIANTS}
    result = {"params": cfg, "params_grad_batches": grad_batches, "seeds": seeds, "quick": quick,
              "window": [WINDOW.start, WINDOW.stop], "eval_at": eval_points(cfg["updates"], cfg["eval_every"]),
              "pretrained": pre, "sensitivity": sensitivity(base, 64, 8, seed=1), "gradient_agreement": agreement,
              "curves": {name: {"train": [r["train"] for r in rs], "eval": [r["eval"] for r in rs]}
                         for name, rs in runs.items()},
              "final": {name: [r["final"] for r in rs] for name, rs in runs.items()},
              "summary": summarise(runs, pre)}
    final = {"pre-trained": samples(base, 128, 0),
             **{f"{name}, seed 0": samples(runs[name][0]["model"], 128, 0) for name in ("naive", "itg+tgr")}}
    plot(os.path.join(out, "grpo_demo.png"), result, final)
    result["seconds"], result["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
    with open(os.path.join(out, "grpo_demo.md"), "w") as f:
        f.write(markdown(result))
    with open(os.path.join(out, "grpo_demo.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for grpo_demo.json, grpo_demo.md and grpo_demo.png")
    parser.add_argument("--quick", action="store_true", help="a few updates, two seeds: a smoke run")
    parser.add_argument("--seeds", type=int, help=f"GRPO runs per variant (default {FULL['seeds']}, quick 2)")
    args = parser.parse_args(argv)
    result = run(args.out, args.quick, args.seeds)
    print(markdown(result))
    print(f"wrote {args.out}/grpo_demo.json, grpo_demo.md and grpo_demo.png")


if __name__ == "__main__":
    main()
