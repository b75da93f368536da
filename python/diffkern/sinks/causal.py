"""The paper's causal test on a diffusers pipeline (specs/sinks.md): generate every (prompt, seed) pair
unsuppressed and with sinks (or an equal-budget control set) suppressed at the chosen layers and every
denoising step, and measure how far each image moves, with paired bootstrap intervals.

Needs only a pipeline object (diffusers' StableDiffusion3Pipeline, or any pipeline whose `transformer`
or `unet` install_sink_processors accepts); imports neither diffusers nor transformers itself.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from .bootstrap import bootstrap_ci, paired_difference_ci
from .op import MODES
from .processors import SinkRecorder, _layer_names, install_sink_processors

KS = (1, 5, 10, 50)
CONTROLS = ("random", "anti_sink")
BASELINE = ("measure", 0)
PIXEL_MSE = "pixel_mse"


@dataclasses.dataclass
class CausalResult:
    """What run_causal_test measured; plain data (floats, lists, dicts) apart from the Intervals.

    settings: the arguments of the run (prompts, seeds, layers as processor names, ks, modes, ...).
    timesteps: the scheduler's timesteps, one per denoising step.
    deviation[metric][mode][k]: Interval over pairs of the image's deviation from the unsuppressed one.
        Metrics: "pixel_mse" (mean over pixels and channels of the squared difference of the pipeline's
        [0, 1] images), each distances[name] (its value on (suppressed, unsuppressed)) and, for each
        scorers[name], "delta_<name>" (score of the suppressed image minus the unsuppressed one's).
    delta_delta[metric][control][k]: paired Interval of deviation(sink_mode) - deviation(control), the
        paper's ΔΔ (positive: suppressing the sinks moves the image more than the control does).
    baseline_scores[name]: Interval of scorers[name] on the unsuppressed images.
    curves[mode][k][stat][layer]: per-step means over pairs (and over the calls of a step) of every scalar
        statistic the processors record (max_mass, index0_mass, row_entropy, top_sink_mass_after, ...);
        the unsuppressed run is curves["measure"][0].
    selection[mode][k]: where the suppressed keys sit, over every call, sample, head group and selected key:
        fractions at key 0 ("index0"), among the other image tokens ("image") and among the text tokens
        ("text"); "top1_*" the same for each call's first selected key (per_head: j* = argmax_j m[b,h,j] of
        every (b, h)); "mass_before" the mean first selected key's mass (index_mass[..., 0]) and "mass_after"
        the mean top_sink_mass_after over calls; "top1_keys": the 5 most frequent first selected keys and
        their counts.
    seconds: wall time of the run.
    """
    settings: dict
    timesteps: list
    deviation: dict
    delta_delta: dict
    baseline_scores: dict
    curves: dict
    selection: dict
    seconds: float


def run_causal_test(pipe, prompts, seeds, layers, ks: Sequence[int] = KS, controls: Sequence[str] = CONTROLS,
                    sink_mode: str = "head_union", extra_modes: Sequence[str] = ("per_head",),
                    num_inference_steps: int = 28, guidance_scale: float = 7.0, height: int | None = None,
                    width: int | None = None, row_scope: str = "image",
                    scorers: Mapping[str, Callable] | None = None, distances: Mapping[str, Callable] | None = None,
                    processor_settings: Mapping | None = None, pipe_kwargs: Mapping | None = None,
                    n_image_tokens: int | None = None, control_seed: int = 0, n_boot: int = 10_000,
                    level: float = 0.95, bootstrap_seed: int = 0, log: Callable[[str], None] | None = None
                    ) -> CausalResult:
    """Runs the causal test: for every (prompt, seed) pair, the unsuppressed image and, for every mode and
    k in ks, the image with that mode's keys suppressed at `layers`, at every step, from the same noise.

    Unsuppressed: the processors in mode "measure" (the pipeline's output is bit-identical to the stock
    pipeline's) record the per-call statistics that become curves["measure"][0]. Suppressed: the same
    pipeline call with sink_attention's mode at every chosen layer; each call selects its keys afresh.
    Budgets (specs/sinks.md): sink_mode (default "head_union": the top k*H keys of the head-mean mass of each
    sample) and each control ("random": k*H keys drawn per call; "anti_sink"; "bottom") suppress k*H keys per
    sample, shared by the heads, so ΔΔ compares sink_mode with each control at equal budget. extra_modes
    (default "per_head", the paper's main mode: the top k keys of each head) are measured and reported in
    `deviation`, not in ΔΔ.

    Args:
        pipe: a diffusers pipeline taking (prompt, num_inference_steps, guidance_scale, height, width,
            generator, output_type="pt") and returning .images [1, C, H, W] in [0, 1]; the processors go on
            pipe.transformer (or pipe.unet) and the stock ones are put back after every call.
        prompts: strings; seeds: ints (each pair's noise: torch.Generator("cpu").manual_seed(seed)).
        layers: as install_sink_processors takes them (SD3: transformer block indices). Each layer's random
            control draws from its own seed, derived from control_seed, the pair and the layer.
        ks: budgets (ints >= 1); controls, sink_mode, extra_modes: suppressing modes of sink_attention.
        row_scope: "image" or "all" (sink_attention's). processor_settings: more install_sink_processors
            settings for the suppressed runs (bias, ...). pipe_kwargs: more pipeline arguments (SD3:
            max_sequence_length, ...). height, width: default the pipeline's default size.
        scorers: name -> fn(images [N, C, H, W] in [0, 1], float64 on the CPU; prompts, a list of N str) -> [N]
            scores (e.g. CLIP-T: move the images to the scorer's device and dtype);
            reported as "delta_<name>" = score(suppressed) - score(unsuppressed). distances: name ->
            fn(images_a, images_b) -> [N] paired distances of a[n] from b[n] (e.g. LPIPS). Each is called
            once per pair, on that pair's images of every condition at once.
        n_image_tokens: the image tokens (keys before it are image keys, from it on text), default
            (height / (vae_scale_factor * patch_size)) * (width / ...) from the pipeline.
        n_boot, level, bootstrap_seed: the paired bootstrap over pairs (bootstrap.bootstrap_ci).
        log: called with a line of progress per pair.
    Returns: CausalResult.
    Bad input: ValueError naming the argument (no prompts or seeds, a k < 1, a mode sink_attention lacks,
        a scorer or distance returning other than one value per image).
    """
    prompts, seeds = _strings("prompts", prompts), _ints("seeds", seeds, lo=0)
    ks = _ints("ks", ks, lo=1)
    modes = _modes(sink_mode, extra_modes, controls)
    scorers, distances = dict(scorers or {}), dict(distances or {})
    model = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet
    chosen = _layer_names(model, layers, list(model.attn_processors))
    names = [n for n in model.attn_processors if n in chosen]  # in the model's order
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    n_img = n_image_tokens or _image_tokens(pipe, model, height, width)
    call = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
                **(pipe_kwargs or {}))
    conditions = [(m, k) for m in modes for k in ks]
    pairs = list(itertools.product(prompts, seeds))
    start = time.perf_counter()
    values: dict = {}          # metric -> condition -> [per pair]
    base_scores: dict = {name: [] for name in scorers}
    curve_sums: dict = {}      # condition -> stat -> layer -> [per step sums]
    picks = {c: _Selection(n_img) for c in conditions}
    timesteps = None
    for p, (prompt, seed) in enumerate(pairs):
        layer_seeds = [(control_seed * len(pairs) + p) * len(names) + i for i in range(len(names))]

        def generate(mode, k):
            settings = {} if mode == "measure" else dict(processor_settings or {})
            return _generate(pipe, model, names, layer_seeds, prompt, seed, call,
                             dict(mode=mode, k_sink=k, row_scope=row_scope, **settings))
        base, records, timesteps = generate(*BASELINE)
        _add_curves(curve_sums, BASELINE, records, names, len(timesteps))
        images = []
        for c in conditions:
            img, records, _ = generate(*c)
            images.append(img)
            _add_curves(curve_sums, c, records, names, len(timesteps))
            picks[c].add(records)
        images = torch.cat(images)
        per_metric = {PIXEL_MSE: (images - base).square().mean((1, 2, 3))}
        for name, fn in distances.items():
            per_metric[name] = _per_image(f"distances[{name!r}]", fn(images, base.expand_as(images)), len(images))
        for name, fn in scorers.items():
            s = _per_image(f"scorers[{name!r}]", fn(torch.cat([base, images]), [prompt] * (1 + len(images))),
                           1 + len(images))
            base_scores[name].append(s[0].item())
            per_metric[f"delta_{name}"] = s[1:] - s[0]
        for metric, v in per_metric.items():
            for c, x in zip(conditions, v.tolist()):
                values.setdefault(metric, {}).setdefault(c, []).append(x)
        if log:
            log(f"pair {p + 1}/{len(pairs)} ({prompt!r}, seed {seed}): {1 + len(conditions)} images, "
                f"{time.perf_counter() - start:.0f} s")
    boot = dict(n_boot=n_boot, level=level, seed=bootstrap_seed)
    deviation = {metric: {m: {k: bootstrap_ci(by[(m, k)], **boot) for k in ks} for m in modes}
                 for metric, by in values.items()}
    delta_delta = {metric: {c: {k: paired_difference_ci(by[(sink_mode, k)], by[(c, k)], **boot) for k in ks}
                            for c in modes if c in controls} for metric, by in values.items()}
    curves: dict = {}
    for (m, k), stats in curve_sums.items():
        curves.setdefault(m, {})[k] = {s: {layer: [x / len(pairs) for x in v] for layer, v in by_layer.items()}
                                       for s, by_layer in stats.items()}
    settings = dict(prompts=prompts, seeds=seeds, layers=[n.removesuffix(".processor") for n in names], ks=ks,
                    modes=modes, sink_mode=sink_mode, controls=[m for m in modes if m in controls],
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                    width=width, row_scope=row_scope, n_image_tokens=n_img, control_seed=control_seed,
                    processor_settings=dict(processor_settings or {}), n_boot=n_boot, level=level,
                    bootstrap_seed=bootstrap_seed)
    return CausalResult(settings, timesteps, deviation, delta_delta,
                        {name: bootstrap_ci(v, **boot) for name, v in base_scores.items()}, curves,
                        {m: {k: picks[(m, k)].summary() for k in ks} for m in modes},
                        time.perf_counter() - start)


def _generate(pipe, model, names, seeds_by_layer, prompt, seed, call, settings):
    """One pipeline call with sink processors (settings) on `names`: ([1, C, H, W] float64 images on the CPU,
    the records, the scheduler's timesteps). The model's own processors are put back afterwards."""
    stock = dict(model.attn_processors)
    recorder = SinkRecorder()
    try:
        for name, layer_seed in zip(names, seeds_by_layer):
            install_sink_processors(model, name, recorder=recorder, seed=layer_seed, **settings)
        with torch.no_grad():
            images = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="pt",
                          **call).images
    finally:
        model.set_attn_processor(dict(stock))  # set_attn_processor empties the dict it is given
    return images.detach().cpu().double(), recorder.records, [float(t) for t in pipe.scheduler.timesteps]


def _add_curves(sums, condition, records, names, n_steps) -> None:
    """Adds each record's scalar statistics to sums[condition][stat][layer][step]; a layer called c times per
    step (c = its calls / n_steps) has its call i in step i // c."""
    by_layer = {n.removesuffix(".processor"): [] for n in names}
    for r in records:
        by_layer[r["layer"]].append(r)
    for layer, recs in by_layer.items():
        if not recs or len(recs) % n_steps:
            raise RuntimeError(f"run_causal_test: layer {layer} was called {len(recs)} times in {n_steps} "
                               "denoising steps; the calls of a step cannot be told apart")
        per_step = len(recs) // n_steps
        for r in recs:
            for stat, x in r.items():
                if isinstance(x, float):
                    curve = sums.setdefault(condition, {}).setdefault(stat, {}).setdefault(layer, [0.0] * n_steps)
                    curve[r["call"] // per_step] += x / per_step


class _Selection:
    """Running tallies of where one condition's selected keys sit (CausalResult.selection): the records'
    indices are counted as they come, never kept (at SD3's size they would take gigabytes)."""

    def __init__(self, n_img: int):
        self.n_img = n_img
        self.counts = {p: {"index0": 0, "image": 0, "text": 0, "all": 0} for p in ("", "top1_")}
        self.top1 = collections.Counter()
        self.before, self.after, self.calls, self.calls_after = 0.0, 0.0, 0, 0

    def add(self, records) -> None:
        for r in records:
            idx = r["indices"].flatten(0, 1)                          # [B * G, K]
            for prefix, x in (("", idx), ("top1_", idx[:, 0])):
                n = self.counts[prefix]
                n["all"] += x.numel()
                n["index0"] += (x == 0).sum().item()
                n["image"] += ((x > 0) & (x < self.n_img)).sum().item()
                n["text"] += (x >= self.n_img).sum().item()
            self.top1.update(idx[:, 0].tolist())
            self.before += r["index_mass"][..., 0].double().mean().item()
            self.calls += 1
            if r["top_sink_mass_after"] is not None:
                self.after += r["top_sink_mass_after"]
                self.calls_after += 1

    def summary(self) -> dict:
        out = {prefix + c: n[c] / n["all"] for prefix, n in self.counts.items() for c in ("index0", "image", "text")}
        return {**out, "mass_before": self.before / self.calls,
                "mass_after": self.after / self.calls_after if self.calls_after else None,
                "top1_keys": [[j, n] for j, n in self.top1.most_common(5)]}


def _image_tokens(pipe, model, height, width) -> int:
    patch = getattr(model.config, "patch_size", None)
    factor = getattr(pipe, "vae_scale_factor", None)
    if patch is None or factor is None:
        raise ValueError("run_causal_test: n_image_tokens is needed for a pipeline without vae_scale_factor and a "
                         "transformer patch_size")
    return (height // (factor * patch)) * (width // (factor * patch))


def _per_image(what, scores, n) -> torch.Tensor:
    s = torch.as_tensor(scores).detach().cpu().double()
    if s.shape != (n,):
        raise ValueError(f"run_causal_test: {what} must return one value per image, shape [{n}], got "
                         f"{list(s.shape)}")
    return s


def _strings(name, value) -> list:
    value = [value] if isinstance(value, str) else list(value)
    if not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"run_causal_test: {name} must be a non-empty list of strings, got {value!r}")
    return value


def _ints(name, value, lo) -> list:
    value = list(value)
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= lo for v in value):
        raise ValueError(f"run_causal_test: {name} must be a non-empty list of ints >= {lo}, got {value!r}")
    return value


def _modes(sink_mode, extra_modes, controls) -> list:
    known = [m for m in MODES if m != "measure"]
    for name, given in (("sink_mode", [sink_mode]), ("extra_modes", list(extra_modes)), ("controls", list(controls))):
        for m in given:
            if m not in known:
                raise ValueError(f"run_causal_test: {name} holds {m!r}, which is not a suppressing mode of "
                                 f"sink_attention {tuple(known)}")
    if not controls:
        raise ValueError("run_causal_test: controls must name at least one control mode")
    return list(dict.fromkeys([sink_mode, *extra_modes, *controls]))
