"""The causal-test runner (diffkern.sinks.causal) on a tiny random-weight diffusers SD3 pipeline (nothing is
downloaded), and its paired bootstrap (diffkern.sinks.bootstrap)."""
import math

import pytest
import torch
from scipy import stats

from diffkern.demos.sinks import tiny_pipeline
from diffkern.sinks.bootstrap import bootstrap_ci, paired_difference_ci
from diffkern.sinks.causal import run_causal_test
from diffkern.sinks.processors import install_sink_processors

PROMPTS, SEEDS, LAYERS, KS = ["a red cube", "two cats"], [0, 3], [0, 1], (1, 2)
CONTROLS = ("random", "bottom")  # controls that every sink_attention has (anti_sink is the default's other)
CALL = dict(num_inference_steps=3, guidance_scale=7.0, height=16, width=16)
PIPE_KWARGS = dict(max_sequence_length=8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matmuls are far too small for thread synchronisation to pay (5x faster on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(blocks=2)


def stock_images(pipe, prompt, seed):
    with torch.no_grad():
        return pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="pt", **CALL,
                    **PIPE_KWARGS).images


@pytest.fixture(scope="module")
def run(pipe):
    """One run with a scorer and a distance that log what they are given."""
    scored, baselines = [], []

    def brightness(images, prompts):
        scored.append((tuple(images.shape), list(prompts)))
        return images.mean((1, 2, 3))

    def brightness_shift(a, b):
        baselines.append(b[0].clone())
        return a.mean((1, 2, 3)) - b.mean((1, 2, 3))

    result = run_causal_test(pipe, PROMPTS, SEEDS, LAYERS, ks=KS, controls=CONTROLS, pipe_kwargs=PIPE_KWARGS,
                             scorers={"brightness": brightness}, distances={"brightness_shift": brightness_shift},
                             n_boot=2000, **CALL)
    return result, scored, baselines


def test_bootstrap_interval_of_a_binary_sample_is_the_binomial_quantiles():
    # Resampling 16 values, 8 of them 1, gives means distributed exactly as Binomial(16, 1/2) / 16; both
    # quantiles sit inside an atom by more than 10 Monte Carlo standard deviations at 20000 resamples, so the
    # interval is that atom exactly.
    n, ones, n_boot = 16, 8, 20_000
    lo_atom, hi_atom = stats.binom.ppf([0.025, 0.975], n, ones / n)
    mc_sd = math.sqrt(0.025 * 0.975 / n_boot)
    for atom, q in ((lo_atom, 0.025), (hi_atom, 0.975)):
        assert stats.binom.cdf(atom - 1, n, 0.5) + 10 * mc_sd < q < stats.binom.cdf(atom, n, 0.5) - 10 * mc_sd
    iv = bootstrap_ci([1.0] * ones + [0.0] * (n - ones), n_boot=n_boot, level=0.95, seed=7)
    assert (iv.mean, iv.lo, iv.hi) == (0.5, lo_atom / n, hi_atom / n)


def test_bootstrap_is_seeded_and_degenerate_samples_give_a_point():
    x = [0.3, 1.7, -2.0, 5.5, 0.1]
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    assert bootstrap_ci(x, seed=3).lo != bootstrap_ci(x, seed=4).lo
    iv = bootstrap_ci([2.5] * 6)
    assert (iv.mean, iv.lo, iv.hi) == (2.5, 2.5, 2.5)
    assert all(math.isnan(v) for v in (lambda i: (i.mean, i.lo, i.hi))(bootstrap_ci([1.0, math.nan])))


@pytest.mark.parametrize("args, name", [(([],), "values"), (([[1.0, 2.0]],), "values"), (([1.0], 0), "n_boot"),
                                        (([1.0], 10, 1.0), "level")])
def test_bootstrap_bad_input_names_the_argument(args, name):
    with pytest.raises(ValueError, match=name):
        bootstrap_ci(*args)


def test_paired_difference_resamples_units_not_conditions():
    # The units differ wildly, the per-unit difference is exactly 2: only a paired resampling gives [2, 2].
    a = [0.0, 10.0, 3.0, 100.0, 7.0, -40.0]
    iv = paired_difference_ci(a, [x - 2.0 for x in a])
    assert (iv.mean, iv.lo, iv.hi) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="a and b"):
        paired_difference_ci([1.0, 2.0], [1.0])


def test_unsuppressed_run_is_bit_identical_to_the_stock_pipeline_and_the_pipeline_is_restored(pipe, run):
    result, _, baselines = run
    stock = [stock_images(pipe, prompt, seed) for prompt in PROMPTS for seed in SEEDS]
    assert len(baselines) == len(stock)
    for got, want in zip(baselines, stock):
        assert torch.equal(got, want[0].double())
    assert {type(p).__name__ for p in pipe.transformer.attn_processors.values()} == {"JointAttnProcessor2_0"}
    assert torch.equal(stock_images(pipe, PROMPTS[0], SEEDS[0]), stock[0])


def test_per_step_statistics_are_mapped_to_their_layer_and_step(pipe, run):
    result = run[0]
    records = []
    for prompt in PROMPTS:
        for seed in SEEDS:
            stock = dict(pipe.transformer.attn_processors)
            recorder = install_sink_processors(pipe.transformer, LAYERS, mode="measure")
            stock_images(pipe, prompt, seed)
            pipe.transformer.set_attn_processor(stock)
            records.append(recorder.records)
    assert result.timesteps == [float(t) for t in pipe.scheduler.timesteps]
    curves = result.curves["measure"][0]
    for stat in ("max_mass", "index0_mass", "row_entropy"):
        for layer in ("transformer_blocks.0.attn", "transformer_blocks.1.attn"):
            want = [sum(r[stat] for recs in records for r in recs if r["layer"] == layer and r["call"] == step)
                    / len(records) for step in range(CALL["num_inference_steps"])]
            assert curves[stat][layer] == want
            assert len(set(want)) == len(want)  # the steps differ: a mix-up of steps would show
    for mode in ("head_union", "per_head", *CONTROLS):
        for k in KS:
            for layer, curve in result.curves[mode][k]["top_sink_mass_after"].items():
                assert len(curve) == CALL["num_inference_steps"] and all(0 <= x < 1 for x in curve)


def test_delta_delta_pairs_each_sink_run_with_the_same_pairs_control(run):
    result = run[0]
    modes = ["head_union", "per_head", *CONTROLS]
    assert result.settings["modes"] == modes and set(result.delta_delta["pixel_mse"]) == set(CONTROLS)
    for metric in ("pixel_mse", "brightness_shift", "delta_brightness"):
        dev = result.deviation[metric]
        for c in CONTROLS:
            for k in KS:
                want = paired_difference_ci(dev["head_union"][k].values, dev[c][k].values, n_boot=2000)
                assert result.delta_delta[metric][c][k] == want
    for m in modes:
        for k in KS:
            assert len(result.deviation["pixel_mse"][m][k].values) == len(PROMPTS) * len(SEEDS)
    # suppressing the top keys moves the image (pixel MSE > 0); the sink's mass is gone after the -1e4 bias
    assert all(v > 0 for v in result.deviation["pixel_mse"]["head_union"][2].values)
    assert result.selection["per_head"][1]["mass_after"] < 1e-4 * result.selection["per_head"][1]["mass_before"]


def test_user_scorer_and_distance_are_called_per_pair_and_reported(run):
    result, scored, _ = run
    n_images = 1 + len(result.settings["modes"]) * len(KS)
    assert scored == [((n_images, 3, 16, 16), [prompt] * n_images) for prompt in PROMPTS for _ in SEEDS]
    for m in result.settings["modes"]:
        for k in KS:
            # the scorer's delta (score(suppressed) - score(unsuppressed)) equals the paired brightness shift
            dev = result.deviation
            assert dev["delta_brightness"][m][k].values == dev["brightness_shift"][m][k].values
    assert len(result.baseline_scores["brightness"].values) == len(PROMPTS) * len(SEEDS)


@pytest.mark.parametrize("kwargs, name", [(dict(prompts=[]), "prompts"), (dict(seeds=[-1]), "seeds"),
                                          (dict(ks=(0,)), "ks"), (dict(controls=("nope",)), "controls"),
                                          (dict(sink_mode="measure"), "sink_mode")])
def test_bad_arguments_name_the_argument(pipe, kwargs, name):
    args = dict(prompts=PROMPTS, seeds=SEEDS, ks=KS, controls=CONTROLS) | kwargs
    with pytest.raises(ValueError, match=name):
        run_causal_test(pipe, args.pop("prompts"), args.pop("seeds"), LAYERS, **args, **CALL)


def test_a_scorer_returning_other_than_one_score_per_image_is_named(pipe):
    with pytest.raises(ValueError, match="scorers\\['bad'\\]"):
        run_causal_test(pipe, PROMPTS[:1], SEEDS[:1], LAYERS, ks=(1,), controls=("random",), extra_modes=(),
                        pipe_kwargs=PIPE_KWARGS, scorers={"bad": lambda images, prompts: images.mean()}, **CALL)
