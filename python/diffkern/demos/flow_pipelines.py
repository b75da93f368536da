"""NoiseTilt and Flash-GRPO on a diffusers SD3 pipeline: `python -m diffkern.demos.flow_pipelines --out DIR [--smoke]`.

Both run through one diffkern.flow.FlowAdapter (the pipeline's schedule, its transformer call with classifier-free
guidance, its VAE decode) on a tiny random-weight StableDiffusion3Pipeline (diffkern.testing.tiny_pipelines:
the real diffusers / transformers classes, nothing downloaded). The reward, fixed before any run: `redness`,
the mean over pixels of R - (G + B) / 2 of the decoded [0, 1] image (differentiable, through the VAE).

1. Reward guidance at a matched budget, from the same initial noise per (seed, prompt): the base SDE sampler
   (K velocity evaluations), NTRK and DPS (K evaluations + K VJPs, a VJP costing about 2 evaluations), SVDD with
   2 candidates (3K - 2 evaluations) and best-of-3 of the base sampler (3K): every guided method spends about 3K
   forward-equivalents. NTRK at its default rho; DPS at the best scale of a sweep on a held-out seed. Paired
   bootstrap intervals of each method's reward minus the base sampler's, over the (seed, prompt) units, and per
   method how many steps' injected noise still looks N(0, I) (diffkern.ntrk.diagnostics.looks_gaussian).
2. 20 GRPO updates of a LoRA (peft) on the transformer's attention projections: diffkern.grpo.rollout (Euler
   steps but one SDE step per rollout, std_rule "wan"), then grpo_train_step with FlashGRPOLoss and one Adam
   step. Variants from the same LoRA start and seeds: naive (each rollout its own SDE step, no TGR), itg (one
   step per prompt: IsoTimestepSampler), itg+tgr. Reward curves over updates, mean and spread over seeds.

Writes DIR/flow_pipelines.md (the tables), DIR/flow_pipelines.png (rewards and curves) and
DIR/flow_pipelines.json. A random tiny model shows the machinery, not the papers' claims.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from .. import _optional
from ..flow import FlowAdapter
from ..grpo import IsoTimestepSampler, grpo_train_step, rollout
from ..nn import FlashGRPOLoss
from ..ntrk.diagnostics import looks_gaussian
from ..sampling import BaseSampler, DPSSampler, FlowModel, NTRKSampler, SVDDSampler, best_of_n
from ..sinks.bootstrap import bootstrap_ci, paired_difference_ci
from ..testing.tiny_pipelines import tiny_sd3_pipeline

PROMPTS = ("a red cube", "a cat in snow", "a grey sea", "a clock tower")
# The rollout's and the loss's std rule (both must agree): "wan", std = c sigma; "sd3" (Flow-GRPO's SD3 form, finite
# at sigma = 1) works as well and would go here.
ROLLOUT_RULE = "wan"
# Attention projections of the SD3 blocks; not add_q_proj (the last block's text queries feed nothing).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "to_add_out"]
DEFAULTS = dict(size=32, steps=10, seeds=3, guidance=4.0, updates=20, group=4, grpo_seeds=2, lr=3e-3, rank=4,
                rho=0.5)
SMOKE = dict(size=16, steps=4, seeds=2, updates=2, group=2, grpo_seeds=1)
DPS_SCALES = (1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7)  # swept on CALIBRATION_SEED, never on the evaluation seeds
CALIBRATION_SEED = 10_000
STATEMENT = ("This run uses a tiny random-weight SD3 pipeline and a colour statistic as its reward: it shows the "
             "machinery (one adapter under NTRK, DPS, SVDD, best-of-N and the GRPO rollout and LoRA training step, "
             "NFE and VJP accounting, paired intervals, curves over seeds), not the papers' claims, which need a "
             "real checkpoint and a real reward model.")
REAL_CHECKPOINT = """\
```python
import diffusers, peft, torch
from diffkern.flow import FlowAdapter
from diffkern.grpo import IsoTimestepSampler, grpo_train_step, rollout
from diffkern.nn import FlashGRPOLoss
from diffkern.sampling import FlowModel, NTRKSampler

pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(
    "stabilityai/stable-diffusion-3-medium-diffusers", torch_dtype=torch.bfloat16).to("cuda")
adapter = FlowAdapter.from_pipe(pipe, num_inference_steps=28)  # FluxPipeline and WanPipeline alike
reward = my_reward  # images [B, 3, H, W] in [0, 1] -> [B], differentiable

# NTRK: reward-tilted sampling (the VJP through the transformer and the VAE, checkpointed per block)
cond = adapter.encode(["a red cube on a table"])  # the pipeline's encode_prompt and its guidance
sampler = NTRKSampler(FlowModel(adapter, reward_on="pixels", checkpoint=True), reward, rho=0.5)
x0, trace = sampler.sample(adapter.init_noise(1, torch.Generator().manual_seed(0)), **cond)
images = adapter.decode(x0)

# Flash-GRPO: a LoRA on the transformer, one rollout and one optimizer step per update
pipe.transformer.requires_grad_(False).add_adapter(
    peft.LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
opt = torch.optim.AdamW([p for p in pipe.transformer.parameters() if p.requires_grad], lr=1e-4)
steps, loss_fn = IsoTimestepSampler(28), FlashGRPOLoss()
for update in range(100):
    result = rollout(adapter, ["a red cube on a table", "a cat"], 8, steps, lambda images, _: reward(images),
                     decode=True)
    opt.zero_grad()
    grpo_train_step(adapter.velocity, result.step, loss_fn)
    opt.step()
```"""


def redness(images: torch.Tensor) -> torch.Tensor:
    """[B] rewards of [B, 3, H, W] images in [0, 1]: the mean over pixels of R - (G + B) / 2, in [-1, 1].
    Differentiable; NaN pixels give a NaN reward."""
    r, g, b = images.unbind(1)
    return (r - (g + b) / 2).flatten(1).mean(1)


class PerRolloutSampler(IsoTimestepSampler):
    """The naive ablation of Iso-Temporal Grouping: every rollout draws its own SDE step, uniform over the window
    (single process)."""

    def sample(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        draw = torch.randint(self.window.numel(), prompt_ids.shape, generator=self.generator)
        return self.window[draw].to(prompt_ids.device)


def _methods(model, p, dps_scale: float) -> dict:
    """name -> (sampler, n): the best of n runs of sampler, at the matched budget (module docstring)."""
    base = BaseSampler(model, redness, record=True)
    return {"base": (base, 1), "ntrk": (NTRKSampler(model, redness, rho=p["rho"], record=True), 1),
            "dps": (DPSSampler(model, redness, scale=dps_scale, record=True), 1),
            "svdd": (SVDDSampler(model, redness, k=2, record=True), 1), "best-of-3": (base, 3)}


def _runs(adapter, sampler, n: int, seeds, cond) -> tuple[list, object, list]:
    """(rewards of every (seed, prompt) unit, the last seed's trace, per recorded step whether its injected noise
    looks N(0, I)): best_of_n(sampler, n) per seed, its first run from that seed's initial noise (the same for
    every method), further runs from the sampler's generator."""
    rewards, gaussian = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        first = [adapter.init_noise(len(PROMPTS), torch.Generator().manual_seed(1000 + seed))]
        _, trace = best_of_n(sampler, lambda: first.pop() if first else adapter.init_noise(len(PROMPTS), g), n, g,
                             **cond)
        rewards += trace.reward.tolist()
        gaussian += [looks_gaussian(q) for q in trace.perturbations]
    return rewards, trace, gaussian


def _dps_scale(model, adapter, cond) -> tuple[float, dict]:
    """The DPS scale of DPS_SCALES with the best mean reward on CALIBRATION_SEED (a NaN run never wins)."""
    sweep = {}
    for scale in DPS_SCALES:
        r = torch.tensor(_runs(adapter, DPSSampler(model, redness, scale=scale), 1, [CALIBRATION_SEED], cond)[0])
        sweep[scale] = r.mean().item() if r.isfinite().all() else float("-inf")
    return max(sweep, key=sweep.get), sweep


def guidance(pipe, p) -> dict:
    """Part 1: per method its NFE and VJPs per trajectory, rewards per (seed, prompt) unit and wall time; and the
    DPS calibration sweep."""
    adapter = FlowAdapter.from_pipe(pipe, p["steps"], p["size"], p["size"])
    cond = adapter.encode(list(PROMPTS), guidance_scale=p["guidance"])
    model = FlowModel(adapter, reward_on="pixels")
    scale, sweep = _dps_scale(model, adapter, cond)
    out = {"dps_sweep": {"chosen": scale, "mean_reward": sweep}, "methods": {}}
    for name, (sampler, n) in _methods(model, p, scale).items():
        t0 = time.perf_counter()
        rewards, trace, gaussian = _runs(adapter, sampler, n, range(p["seeds"]), cond)
        out["methods"][name] = {"nfe": trace.nfe, "vjp": trace.grads, "rewards": rewards,
                                "gaussian_steps": [sum(gaussian), len(gaussian)],
                                "seconds": round(time.perf_counter() - t0, 1)}
    return out


VARIANTS = {"naive": dict(iso=False, tgr=False), "itg": dict(iso=True, tgr=False), "itg+tgr": dict(iso=True, tgr=True)}


def grpo_run(pipe, variant: str, seed: int, p) -> list:
    """Part 2: the mean rollout reward of each update (the policy before that update's step)."""
    cfg = VARIANTS[variant]
    transformer = copy.deepcopy(pipe.transformer).requires_grad_(False)
    peft = _optional.require("peft", "diffusers")
    torch.manual_seed(seed)
    transformer.add_adapter(peft.LoraConfig(r=p["rank"], lora_alpha=p["rank"], target_modules=LORA_TARGETS))
    adapter = FlowAdapter(transformer, pipe.scheduler, p["steps"], p["size"], p["size"], vae=pipe.vae, pipe=pipe)
    cond = adapter.encode(list(PROMPTS), guidance_scale=p["guidance"])
    K = p["steps"]
    sampler = (IsoTimestepSampler if cfg["iso"] else PerRolloutSampler)(K, seed=seed)
    loss_fn = FlashGRPOLoss(tgr=cfg["tgr"], std_rule=ROLLOUT_RULE)
    opt = torch.optim.Adam([q for q in transformer.parameters() if q.requires_grad], lr=p["lr"])
    g = torch.Generator().manual_seed(seed)  # the same noise stream for every variant
    curve = []
    for _ in range(p["updates"]):
        result = rollout(adapter, cond, p["group"], sampler, lambda images, _: redness(images), decode=True,
                         std_rule=ROLLOUT_RULE, generator=g)
        curve.append(result.rewards.mean().item())
        opt.zero_grad()
        grpo_train_step(adapter.velocity, result.step, loss_fn)
        opt.step()
    return curve


def summarise(part1: dict, curves: dict, p) -> dict:
    """The tables' numbers: per method its mean reward and the paired interval of its difference from base; per
    GRPO variant the mean reward of the first and last updates (a tenth of them, at least 1) over seeds."""
    base = part1["methods"]["base"]["rewards"]
    methods = {name: {"nfe": m["nfe"], "vjp": m["vjp"], "gaussian_steps": m["gaussian_steps"],
                      "reward": bootstrap_ci(m["rewards"]).__dict__,
                      "vs_base": paired_difference_ci(m["rewards"], base).__dict__, "seconds": m["seconds"]}
               for name, m in part1["methods"].items()}
    w = max(1, p["updates"] // 10)
    variants = {}
    for name, runs in curves.items():
        first = [sum(c[:w]) / w for c in runs]
        last = [sum(c[-w:]) / w for c in runs]
        gain = torch.tensor([b - a for a, b in zip(first, last)], dtype=torch.float64)
        variants[name] = {"first": sum(first) / len(first), "last": sum(last) / len(last),
                          "gain_mean": gain.mean().item(), "gain_std": gain.std().item() if len(runs) > 1 else 0.0,
                          "gains": gain.tolist()}
    return {"window": w, "methods": methods, "dps_sweep": part1["dps_sweep"], "variants": variants}


def _iv(d) -> str:
    return f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"


def report(summary: dict, p, seconds: float) -> str:
    n_units = p["seeds"] * len(PROMPTS)
    out = ["# NTRK and Flash-GRPO through diffkern.flow on a tiny SD3 pipeline", "", f"**{STATEMENT}**", "",
           f"Pipeline: tiny_sd3_pipeline (random weights), {p['size']}x{p['size']} px, {p['steps']} steps of its "
           f"FlowMatchEulerDiscreteScheduler (shift 3), classifier-free guidance {p['guidance']}, prompts "
           f"{', '.join(repr(q) for q in PROMPTS)}. Reward (fixed before any run): redness, the mean of "
           "R - (G + B) / 2 over the decoded image's pixels.", "",
           f"## 1. Reward guidance at a matched budget ({p['seeds']} seeds x {len(PROMPTS)} prompts = {n_units} "
           "paired units, same initial noise per unit)", "",
           "NFE: velocity evaluations per trajectory (one guided call = 1, its 2 transformer passes included); VJP: "
           f"reward-gradient backward passes. NTRK rho {p['rho']} (its default, not tuned); DPS scale "
           f"{summary['dps_sweep']['chosen']:g}, the best on a held-out seed (scale: its mean reward "
           f"{', '.join(f'{k:g}: {r:.4f}' for k, r in summary['dps_sweep']['mean_reward'].items())}); SVDD 2 "
           "candidates per step; best-of-3 of the base sampler. Intervals: 95% paired bootstrap over the units. "
           "N(0, I) steps: the steps whose injected noise (x' - mu_model) / s passes diffkern.ntrk.diagnostics."
           "looks_gaussian (moments and KS; the pretrained model's own noise passes), of all steps run. The reward "
           "alone does not say whether guidance left the model's distribution; this column is the noise-level "
           "check (no realism scorer exists for a random model).", "",
           "| method | NFE | VJP | reward [95% CI] | minus base [95% CI] | N(0, I) steps | seconds |",
           "|---" * 7 + "|"]
    for name, m in summary["methods"].items():
        out.append(f"| {name} | {m['nfe']:g} | {m['vjp']:g} | {_iv(m['reward'])} | "
                   f"{'-' if name == 'base' else _iv(m['vs_base'])} | {m['gaussian_steps'][0]} / "
                   f"{m['gaussian_steps'][1]} | {m['seconds']:.1f} |")
    w = summary["window"]
    out += ["", f"## 2. Flash-GRPO with LoRA: {p['updates']} updates x {p['grpo_seeds']} seeds", "",
            f"Each update: {len(PROMPTS)} prompts x {p['group']} rollouts (one SDE step each, std_rule "
            f"'{ROLLOUT_RULE}', window the first half of the schedule), then one Adam step (lr {p['lr']}) of a "
            f"rank-{p['rank']} LoRA on the attention projections. Mean rollout reward of the first and last {w} "
            "update(s), averaged over seeds; gain = last - first per seed.", "",
            "| variant | first | last | gain (mean +- std over seeds) |", "|---" * 4 + "|"]
    for name, v in summary["variants"].items():
        out.append(f"| {name} | {v['first']:+.4f} | {v['last']:+.4f} | {v['gain_mean']:+.4f} +- {v['gain_std']:.4f} |")
    out += ["", f"Wall time: {seconds:.0f} s on {torch.get_num_threads()} CPU thread(s).", "",
            "## With a real checkpoint", "", REAL_CHECKPOINT]
    return "\n".join(out) + "\n"


def plot(path: str, summary: dict, curves: dict) -> None:
    plt = _optional.pyplot("demos")
    fig, (bars, ax) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(summary["methods"])
    diffs = [summary["methods"][n]["vs_base"] for n in names]
    bars.bar(names, [d["mean"] for d in diffs],
             yerr=[[d["mean"] - d["lo"] for d in diffs], [d["hi"] - d["mean"] for d in diffs]], capsize=4)
    bars.axhline(0.0, color="k", lw=0.5)
    bars.set(ylabel="reward minus base (paired, 95% CI)", title="guidance at a matched budget")
    for name, runs in curves.items():
        t = torch.tensor(runs)
        mean = t.mean(0)
        std = t.std(0) if t.shape[0] > 1 else torch.zeros_like(mean)
        ax.plot(mean.numpy(), label=name)
        ax.fill_between(range(t.shape[1]), (mean - std).numpy(), (mean + std).numpy(), alpha=0.2)
    ax.set(xlabel="GRPO update", ylabel="mean rollout reward", title="Flash-GRPO + LoRA (mean +- std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out: str, **settings) -> dict:
    """Both parts at `settings` (DEFAULTS overridden); writes the report, plot and JSON into `out`."""
    p = {**DEFAULTS, **settings}
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    pipe = tiny_sd3_pipeline(seed=0)
    part1 = guidance(pipe, p)
    curves = {name: [grpo_run(pipe, name, seed, p) for seed in range(p["grpo_seeds"])] for name in VARIANTS}
    summary = summarise(part1, curves, p)
    seconds = round(time.perf_counter() - start, 1)
    text = report(summary, p, seconds)
    with open(os.path.join(out, "flow_pipelines.md"), "w") as f:
        f.write(text)
    plot(os.path.join(out, "flow_pipelines.png"), summary, curves)
    result = {"settings": p, "summary": summary, "curves": curves, "seconds": seconds, "report": text}
    with open(os.path.join(out, "flow_pipelines.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for flow_pipelines.md, .png and .json")
    parser.add_argument("--smoke", action="store_true", help=f"a tiny size for CI: {SMOKE}")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), help=f"default {value}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the tiny model gains little)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = {**(SMOKE if args.smoke else {}),
                **{k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}}
    result = run(args.out, **settings)
    print(result["report"])
    print(f"wrote {args.out}/flow_pipelines.md, flow_pipelines.png, flow_pipelines.json in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
