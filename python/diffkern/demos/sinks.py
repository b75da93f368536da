"""The attention-sink causal test on an SD3 pipeline: `python -m diffkern.demos.sinks --out DIR [--model-id ID]`.

For every prompt x seed: the unsuppressed image (processors in measure mode, bit-identical to the stock
pipeline) and, for every k, the image with the sinks suppressed at the chosen blocks and every step (head-
union and per-head) and with each equal-budget control (diffkern.sinks.causal.run_causal_test). Writes
DIR/sinks_report.md (deviation per mode and k with bootstrap intervals, ΔΔ, the sink statistics and
positions), DIR/sinks_mass.png (incoming mass over timesteps), DIR/sinks_deviation.png (deviation and ΔΔ
vs k) and DIR/sinks_demo.json.

Without --model-id the pipeline is a tiny random-weight StableDiffusion3Pipeline built from the real
diffusers and transformers classes (nothing is downloaded): it shows the machinery and the statistics, not
the paper's conclusions, which need the real SD3 checkpoint and perceptual / alignment scorers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch

from .. import _optional
from ..sinks.causal import CONTROLS, KS, run_causal_test
from ..sinks.op import INTERVENTIONS
from ..testing.tiny_pipelines import tiny_sd3_pipeline as tiny_pipeline

PROMPTS = ("a red cube on a wooden table", "a cat asleep in the snow", "two birds over a grey sea",
           "an old clock tower at night")
# the tiny pipeline's demo defaults: 6 blocks suppressed at 1, 3, 5 (SD3-medium's 24 at 6, 12, 18), 64 px
# (256 image tokens), 32 CLIP + 8 (zero) T5 text tokens (SD3: 4096 image, 77 + 256 text); a CLIP token is a
# character here, so the default prompts fit in 32
TINY = dict(blocks=6, layers=[1, 3, 5], size=64, steps=20, clip_tokens=32, t5_tokens=8)
STATEMENT = ("This run uses a tiny random-weight SD3 pipeline: it shows the machinery (the suppression at every "
             "step, the equal-budget controls, the statistics, the paired intervals), not the paper's conclusions. "
             "Those need the real SD3 checkpoint (`--model-id`) and perceptual / text-alignment scorers (LPIPS, "
             "CLIP-T: `run_causal_test(..., scorers=..., distances=...)`).")


def _interval(iv) -> str:
    return f"{iv.mean:.3g} [{iv.lo:.3g}, {iv.hi:.3g}]"


def _intervention(settings) -> str:
    kind = settings.get("intervention", "mask")
    return f"mask (logit bias {settings.get('bias', -1e4):g})" if kind == "mask" else f"{kind}, alpha {settings['alpha']:g}"


def report(result, title: str, statement: str | None) -> str:
    """The Markdown report of a CausalResult: settings, deviation and ΔΔ tables with their intervals, the
    unsuppressed run's sink statistics and where the suppressed keys sit."""
    s = result.settings
    ks = s["ks"]
    level = f"{s['level']:.0%}"
    head = "| " + " | ".join(f"k={k}" for k in ks) + " |"
    rule = "|---" * (len(ks) + 1) + "|"
    out = [f"# Attention sinks: the causal test on {title}", ""]
    if statement:
        out += [f"**{statement}**", ""]
    out += [f"{len(s['prompts'])} prompts x {len(s['seeds'])} seeds, {s['height']}x{s['width']} px, "
            f"{s['num_inference_steps']} steps, guidance {s['guidance_scale']}; suppressed at "
            f"{', '.join(s['layers'])} (every step; rows: {s['row_scope']}); {s['n_image_tokens']} image tokens. "
            f"Budgets: {s['sink_mode']} and the controls suppress k x heads keys per sample; per_head, the "
            f"paper's main mode, k keys per head. pixel_mse: the mean squared difference of the [0, 1] RGB images "
            f"from the unsuppressed one's (same prompt, seed and noise). Intervals: {level} paired bootstrap over the "
            f"(prompt, seed) pairs ({s['n_boot']} resamples, seed {s['bootstrap_seed']}). Intervention: "
            f"{_intervention(s['processor_settings'])}. {result.seconds:.0f} s.", ""]
    for metric, by_mode in result.deviation.items():
        out += [f"## Deviation from the unsuppressed image: {metric} (mean [{level} interval])", "",
                "| mode " + head, rule]
        out += [f"| {m} | " + " | ".join(_interval(by_mode[m][k]) for k in ks) + " |" for m in s["modes"]]
        out += ["", f"ΔΔ = {metric}({s['sink_mode']}) - {metric}(control), paired:", "", "| control " + head, rule]
        out += [f"| {c} | " + " | ".join(_interval(iv[k]) for k in ks) + " |"
                for c, iv in result.delta_delta[metric].items()]
        out.append("")
    for name, iv in result.baseline_scores.items():
        out += [f"Unsuppressed images' {name}: {_interval(iv)}.", ""]
    out += ["## Sink statistics of the unsuppressed run (mean over pairs)", "",
            "| layer | statistic | mean over steps | first step | last step | peak at step |", "|---" * 6 + "|"]
    for stat, by_layer in result.curves["measure"][0].items():
        for layer, curve in by_layer.items():
            peak = max(range(len(curve)), key=curve.__getitem__)
            out.append(f"| {layer} | {stat} | {sum(curve) / len(curve):.4g} | {curve[0]:.4g} | {curve[-1]:.4g} | "
                       f"{peak} (t={result.timesteps[peak]:.0f}) |")
    out += ["", "## Where the suppressed keys sit (fractions over calls, samples, heads and keys)", "",
            "Key 0, other image tokens, text tokens; top-1: each call's first selected key (per_head: the argmax "
            "key of every (sample, head)); its incoming mass before suppression and after (the mean probability "
            "image rows give it).", "",
            "| mode | k | key 0 | image | text | top-1 key 0 | top-1 image | top-1 text | top-1 mass before | after | "
            "most frequent top-1 keys (count) |", "|---" * 11 + "|"]
    for m in s["modes"]:
        for k in ks:
            p = result.selection[m][k]
            after = "-" if p["mass_after"] is None else f"{p['mass_after']:.3g}"
            keys = ", ".join(f"{j} ({n})" for j, n in p["top1_keys"])
            out.append(f"| {m} | {k} | {p['index0']:.3f} | {p['image']:.3f} | {p['text']:.3f} | {p['top1_index0']:.3f} "
                       f"| {p['top1_image']:.3f} | {p['top1_text']:.3f} | {p['mass_before']:.3g} | {after} | {keys} |")
    return "\n".join(out) + "\n"


def plot(result, out: str) -> None:
    """DIR/sinks_mass.png (the unsuppressed run's max and index-0 mass over timesteps, per layer) and
    DIR/sinks_deviation.png (pixel MSE per mode and ΔΔ per control against k, with their intervals)."""
    plt = _optional.pyplot("demos")
    base = result.curves["measure"][0]
    stats = [s for s in ("max_mass", "index0_mass") if s in base]
    fig, axes = plt.subplots(1, len(stats), figsize=(5.5 * len(stats), 4), squeeze=False)
    for ax, stat in zip(axes[0], stats):
        for layer, curve in base[stat].items():
            ax.plot(result.timesteps, curve, marker="o", ms=3, label=layer)
        ax.set(xlabel="timestep", ylabel=stat, title=f"{stat}, unsuppressed run")
        ax.invert_xaxis()  # denoising runs left to right
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sinks_mass.png"), dpi=110)
    plt.close(fig)
    ks = result.settings["ks"]
    fig, (dev, dd) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, series in ((dev, result.deviation["pixel_mse"]), (dd, result.delta_delta["pixel_mse"])):
        for name, by_k in series.items():
            mean = [by_k[k].mean for k in ks]
            err = [[by_k[k].mean - by_k[k].lo for k in ks], [by_k[k].hi - by_k[k].mean for k in ks]]
            ax.errorbar(ks, mean, yerr=err, marker="o", capsize=3, label=name)
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    dev.set(xlabel="k", ylabel="pixel MSE vs unsuppressed", title="deviation per mode")
    dd.set(xlabel="k", ylabel="ΔΔ pixel MSE", title=f"ΔΔ: {result.settings['sink_mode']} minus control")
    dd.axhline(0.0, color="k", lw=0.5)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sinks_deviation.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for sinks_report.md, the PNGs and sinks_demo.json")
    p.add_argument("--model-id", help="a diffusers SD3 checkpoint (from_pretrained); default: a tiny random pipeline")
    p.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    p.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 per prompt")
    p.add_argument("--steps", type=int, help=f"denoising steps (tiny default {TINY['steps']}, else 28)")
    p.add_argument("--layers", type=int, nargs="+", help=f"transformer blocks (tiny default {TINY['layers']}, else 12)")
    p.add_argument("--ks", type=int, nargs="+", default=list(KS))
    p.add_argument("--controls", nargs="+", default=list(CONTROLS))
    p.add_argument("--size", type=int, help=f"image height and width (tiny default {TINY['size']})")
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--row-scope", default="image", choices=("image", "all"))
    p.add_argument("--intervention", default="mask", choices=INTERVENTIONS,
                   help="what suppression does to the selected keys (sink_attention's; mask: the -1e4 logit bias)")
    p.add_argument("--alpha", type=float, default=0.0, help="the scale / value interventions' factor")
    p.add_argument("--blocks", type=int, default=TINY["blocks"], help="the tiny transformer's blocks")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="of the --model-id pipeline (e.g. bfloat16 on a GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the tiny model gains little from more)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    if args.model_id:
        diffusers = _optional.require("diffusers", "diffusers")
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(args.model_id, torch_dtype=getattr(torch, args.dtype))
        pipe, title, statement, extra = pipe.to(args.device), args.model_id, None, {}
        defaults = dict(steps=28, layers=[12], size=None)
    else:
        pipe = tiny_pipeline(blocks=args.blocks, clip_tokens=TINY["clip_tokens"])
        title, statement = "a tiny random-weight SD3 pipeline", STATEMENT
        extra = {"max_sequence_length": TINY["t5_tokens"]}
        defaults = dict(steps=TINY["steps"], layers=TINY["layers"], size=TINY["size"])
    size = args.size or defaults["size"]
    result = run_causal_test(pipe, args.prompts, range(args.seeds), args.layers or defaults["layers"], ks=args.ks,
                             controls=args.controls, num_inference_steps=args.steps or defaults["steps"],
                             guidance_scale=args.guidance, height=size, width=size, row_scope=args.row_scope,
                             pipe_kwargs=extra, log=None if args.quiet else print,
                             processor_settings={} if args.intervention == "mask" else
                             {"intervention": args.intervention, "alpha": args.alpha})
    text = report(result, title, statement)
    with open(os.path.join(args.out, "sinks_report.md"), "w") as f:
        f.write(text)
    plot(result, args.out)
    with open(os.path.join(args.out, "sinks_demo.json"), "w") as f:
        json.dump(dataclasses.asdict(result), f, indent=1)
    print(text)
    print(f"wrote {args.out}/sinks_report.md, sinks_mass.png, sinks_deviation.png, sinks_demo.json")
    return result


if __name__ == "__main__":
    main()
