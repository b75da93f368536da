"""NoiseTilt and its baselines on diffusers flow-matching models through diffkern.flow (tiny random-config SD3,
FLUX and Wan2.1 pipelines; nothing is downloaded): the reward gain at equal NFE judged against the seed-to-seed
spread, the reduction to the stock Euler loop, gradient checkpointing of the VJP, NFE accounting, bad input."""
import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from scipy import stats  # noqa: E402

from diffkern.flow import FlowAdapter, sample  # noqa: E402
from diffkern.sampling import (BaseSampler, DPSSampler, FlowModel, NTRKSampler, SVDDSampler, Trace,  # noqa: E402
                               best_of_n)
from diffkern.testing.tiny_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_wan_pipeline  # noqa: E402

STEPS = 8
SEEDS = 8  # one initial noise per seed; base and NTRK runs are paired on it
PROMPT = "a red cube"
# per model: the pipeline, the sizes, the encode arguments (SD3 with classifier-free guidance, so the gradient
# goes through the guided velocity; FLUX with its guidance embedding) and where the reward reads x0
MODELS = {
    "sd3": (lambda: tiny_sd3_pipeline(blocks=2), dict(height=32, width=32), dict(guidance_scale=7.0), "pixels"),
    "flux": (tiny_flux_pipeline, dict(height=16, width=16), dict(max_sequence_length=16), "latents"),
    "wan": (tiny_wan_pipeline, dict(height=16, width=16, num_frames=5),
            dict(guidance_scale=1.0, max_sequence_length=16), "latents"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def red(images):
    """The mean of the decoded images' red channel: a pixel reward through the VAE."""
    return images[:, 0].flatten(1).mean(1)


def pattern_reward(adapter):
    """The mean of x0 times a fixed seeded +-1 pattern: a latent reward with a structured, zero-mean gradient."""
    pattern = torch.randint(0, 2, adapter.init_noise(1).shape[1:], generator=torch.Generator().manual_seed(9)) * 2.0 - 1
    return lambda x0: (x0 * pattern).flatten(1).mean(1)


def setup(name, steps=STEPS, batch=SEEDS):
    """(adapter, cond for `batch` copies of the prompt, reward, reward_on, noise [batch, ...] one seed each)."""
    build, sizes, encode, reward_on = MODELS[name]
    adapter = FlowAdapter.from_pipe(build(), steps, **sizes)
    cond = adapter.encode([PROMPT] * batch, negative_prompts=[""] * batch if name == "sd3" else None, **encode)
    reward = red if reward_on == "pixels" else pattern_reward(adapter)
    noise = torch.cat([adapter.init_noise(1, torch.Generator().manual_seed(s)) for s in range(batch)])
    return adapter, cond, reward, reward_on, noise


@pytest.mark.parametrize("name", MODELS)
def test_ntrk_raises_the_reward_over_the_base_sampler_at_equal_nfe(name):
    """Paired on the initial noise of each seed: the gain NTRK - base must be positive beyond its seed-to-seed
    spread, by a one-sided paired t-test at level 1e-4 (t > the Student quantile with SEEDS - 1 dof)."""
    adapter, cond, reward, reward_on, noise = setup(name)
    model = FlowModel(adapter, reward_on=reward_on)
    assert adapter.sigmas[0] == 1  # the schedule's first sigma: the SDE step is finite there
    _, base = BaseSampler(model, reward).sample(noise, torch.Generator().manual_seed(100), **cond)
    x, ntrk = NTRKSampler(model, reward, rho=0.5).sample(noise, torch.Generator().manual_seed(100), **cond)
    assert torch.isfinite(x).all()
    assert base.nfe == ntrk.nfe == STEPS and ntrk.grads == STEPS and base.grads == 0
    gain = ntrk.reward - base.reward
    t = gain.mean() / (gain.std() / SEEDS ** 0.5)
    assert t > stats.t.ppf(1 - 1e-4, SEEDS - 1), (gain, t)


@pytest.mark.parametrize("name", MODELS)
def test_without_noise_and_guidance_the_samplers_are_the_stock_euler_loop(name):
    """std_coef = 0 makes the SDE step a = 1, b = sigma_next - sigma, no noise: BaseSampler and NTRKSampler at
    rho = 0 with no reward compute x + b v in float32 (b is the float32 difference, exact in float64) on the
    adapter's velocity, the operations of diffkern.flow.sample (the pipeline's loop, bit for bit): identical."""
    adapter, cond, _, _, noise = setup(name, steps=4, batch=2)
    with torch.no_grad():
        stock = sample(adapter, noise, cond)
    for sampler in (BaseSampler(adapter, None, std_coef=0.0), NTRKSampler(adapter, None, std_coef=0.0, rho=0.0)):
        x, trace = sampler.sample(noise, torch.Generator().manual_seed(1), **cond)
        assert torch.equal(x, stock), type(sampler).__name__
        assert trace.nfe == 4 and trace.grads == 0 and trace.reward is None


def test_the_samplers_step_is_finite_at_every_sigma_of_the_pipelines_schedules():
    """std_t = c sigma (Flow-GRPO's "wan" rule) at sigma = 1, where the "sd3" rule c sqrt(sigma / (1 - sigma))
    is infinite: the step coefficients the samplers use are finite over each pipeline's whole schedule."""
    for name, (build, sizes, _, _) in MODELS.items():
        sampler = BaseSampler(FlowAdapter.from_pipe(build(), 20, **sizes), None)
        sigmas = sampler.schedule("cpu")
        assert sigmas[0] == 1, name
        for k in range(sampler.steps):
            a, b, noise_scale = sampler._coef(sigmas[k], sigmas[k + 1], sigmas)[:3]
            assert math.isfinite(a) and math.isfinite(b) and math.isfinite(noise_scale), (name, k)


def _grad_and_saved_bytes(sampler, noise, cond):
    """g of the first step's VJP and the bytes autograd saved for it."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, g = sampler._v_and_grad(noise, sampler.schedule(noise.device)[0], cond, Trace(), noise.shape[0])
    return g, sum(saved)


def test_gradient_checkpointing_gives_the_same_gradient_and_saves_less():
    """The VJP through the SD3 transformer and the VAE with per-block checkpointing: the same gradient (the
    recomputation repeats the forward's operations: bit for bit on CPU), a fraction of the saved activations,
    and the modules left as they were."""
    adapter, cond, _, _, noise = setup("sd3", steps=4, batch=2)
    plain, plain_bytes = _grad_and_saved_bytes(NTRKSampler(FlowModel(adapter, "pixels"), red), noise, cond)
    ckpt, ckpt_bytes = _grad_and_saved_bytes(NTRKSampler(FlowModel(adapter, "pixels", checkpoint=True), red),
                                             noise, cond)
    assert torch.equal(ckpt, plain)
    assert ckpt_bytes < plain_bytes / 2, (ckpt_bytes, plain_bytes)
    assert not adapter.transformer.is_gradient_checkpointing and not adapter.vae.is_gradient_checkpointing


def test_baselines_run_through_the_same_adapter_and_count_nfe():
    adapter, cond, reward, _, noise = setup("sd3", steps=3, batch=2)
    model = FlowModel(adapter, reward_on="pixels")
    gen = torch.Generator().manual_seed(5)
    _, dps = DPSSampler(model, reward, scale=10.0).sample(noise, gen, **cond)
    assert dps.nfe == 3 and dps.grads == 3
    _, svdd = SVDDSampler(model, reward, k=2).sample(noise, gen, **cond)
    assert svdd.nfe == 3 + 2 * 2  # the last step's candidates are already at sigma = 0
    x, best = best_of_n(BaseSampler(model, reward), lambda: adapter.init_noise(2, gen), 2, gen, **cond)
    assert best.nfe == 6 and x.shape == noise.shape
    torch.testing.assert_close(best.reward, red(adapter.decode(x)))


def test_bad_input_names_the_argument():
    adapter, cond, reward, _, noise = setup("flux", steps=2, batch=1)
    with pytest.raises(ValueError, match="steps"):
        NTRKSampler(adapter, reward, steps=5)
    with pytest.raises(ValueError, match="reward_on"):
        FlowModel(adapter, reward_on="rgb")
    with pytest.raises(TypeError, match="checkpoint"):
        FlowModel(adapter, checkpoint="yes")
    with pytest.raises(TypeError, match="adapter"):
        FlowModel(lambda x, t: x)
    with pytest.raises(TypeError, match="model"):
        BaseSampler(3, reward)
    with pytest.raises(ValueError, match="reward"):
        NTRKSampler(adapter, None, rho=0.5).sample(noise, **cond)
    components = FlowAdapter(adapter.transformer, adapter.scheduler, 2, 16, 16)
    with pytest.raises(ValueError, match="reward_on"):
        FlowModel(components, reward_on="pixels")
