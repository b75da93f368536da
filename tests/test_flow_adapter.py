"""diffkern.flow on tiny random-config diffusers pipelines (SD3, FLUX, Wan2.1; nothing is downloaded): the
adapter's schedule, noise, Euler loop and decode against the stock pipeline's own run."""
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffkern.flow import FlowAdapter, sample  # noqa: E402
from diffkern.testing.tiny_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_wan_pipeline  # noqa: E402

PROMPTS = ["a red cube", "two birds over a grey sea"]
NEGATIVE = ["blurry", "a dog"]
# per model: the pipeline, the sizes and the pipe(...) / encode arguments with classifier-free guidance on
MODELS = {
    "sd3": (tiny_sd3_pipeline, dict(height=32, width=48), dict(guidance_scale=7.0)),
    "flux": (tiny_flux_pipeline, dict(height=16, width=24),
             dict(guidance_scale=3.5, true_cfg_scale=4.0, max_sequence_length=16)),
    "wan": (tiny_wan_pipeline, dict(height=16, width=32, num_frames=5), dict(guidance_scale=5.0, max_sequence_length=16)),
}
# scheduler configs the pipelines meet: plain shift, resolution-dependent shifting, a terminal sigma
SCHEDULES = [("sd3", {}), ("sd3", dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.16)),
             ("sd3", dict(shift_terminal=0.05)), ("flux", {}), ("flux", dict(shift_terminal=0.1)),
             ("flux", dict(use_dynamic_shifting=False)), ("wan", {}), ("wan", dict(shift_terminal=0.02))]


pytestmark = pytest.mark.usefixtures("one_thread")


def _adapter(name, steps, dtype=torch.float32, **scheduler_config):
    build, sizes, _ = MODELS[name]
    pipe = build(**scheduler_config).to(dtype)
    return pipe, FlowAdapter.from_pipe(pipe, steps, **sizes), sizes


@pytest.mark.parametrize("name,config", SCHEDULES)
def test_schedule_is_the_pipelines(name, config):
    pipe, adapter, sizes = _adapter(name, 5, **config)
    kwargs = {"max_sequence_length": 16} if name != "sd3" else {}
    pipe(PROMPTS[0], num_inference_steps=5, guidance_scale=1.0, output_type="latent", **sizes, **kwargs)
    assert torch.equal(adapter.sigmas, pipe.scheduler.sigmas)
    assert torch.equal(adapter.timesteps, pipe.scheduler.timesteps)
    assert adapter.sigmas.shape == (6,) and adapter.sigmas[-1] == 0


@pytest.mark.parametrize("name,dtype", [(name, torch.float32) for name in MODELS] +
                         [("sd3", torch.bfloat16), ("flux", torch.bfloat16)])
def test_euler_loop_is_bit_identical_to_the_pipeline(name, dtype):
    """Same noise, same transformer calls (inputs bit for bit: FLUX's timestep rounded to bf16 as the pipeline
    does), same guidance and Euler arithmetic: identical. (Wan in bf16 is not: its pipeline drops the latents
    to bf16 after the first step, the adapter keeps them in float32.)"""
    pipe, adapter, sizes = _adapter(name, 6, dtype)
    guidance = MODELS[name][2]
    noise = adapter.init_noise(len(PROMPTS), torch.Generator().manual_seed(0))
    assert noise.dtype == (torch.float32 if name == "wan" else dtype)
    stock = pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=6, latents=noise.clone(), output_type="latent",
                 **sizes, **guidance)[0]
    encode_kwargs = {k: v for k, v in guidance.items() if k != "guidance_scale"}
    cond = adapter.encode(PROMPTS, NEGATIVE, guidance_scale=guidance["guidance_scale"], **encode_kwargs)
    assert "negative_prompt_embeds" in cond
    with torch.no_grad():
        ours = sample(adapter, noise, cond)
    assert ours.shape == stock.shape and ours.dtype == stock.dtype
    assert torch.equal(ours, stock)


def _prepare_latents(name, pipe, adapter, sizes, generator):
    c = adapter.family.channels
    if name == "wan":
        return pipe.prepare_latents(2, c, sizes["height"], sizes["width"], sizes["num_frames"], torch.float32,
                                    adapter.device, generator)
    latents = pipe.prepare_latents(2, c, sizes["height"], sizes["width"], adapter.dtype, adapter.device, generator)
    return latents[0] if name == "flux" else latents


@pytest.mark.parametrize("name", MODELS)
def test_init_noise_is_the_pipelines_draw(name):
    pipe, adapter, sizes = _adapter(name, 2)
    want = _prepare_latents(name, pipe, adapter, sizes, torch.Generator().manual_seed(3))
    assert torch.equal(adapter.init_noise(2, torch.Generator().manual_seed(3)), want)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_decode_is_the_pipelines_image(name):
    pipe, adapter, sizes = _adapter(name, 2)
    noise = adapter.init_noise(1, torch.Generator().manual_seed(1))
    kwargs = {"max_sequence_length": 16} if name == "flux" else {}
    with torch.no_grad():
        latents = pipe(PROMPTS[0], num_inference_steps=2, latents=noise, output_type="latent", guidance_scale=1.0,
                       **sizes, **kwargs)[0]
        image = pipe(PROMPTS[0], num_inference_steps=2, latents=noise, output_type="pt", guidance_scale=1.0,
                     **sizes, **kwargs)[0]
        ours = adapter.decode(latents)
    assert ours.shape == (1, 3, sizes["height"], sizes["width"])
    assert torch.equal(ours, image)


def test_wan_decode_is_the_pipelines_video():
    pipe, adapter, sizes = _adapter("wan", 2)
    noise = adapter.init_noise(1, torch.Generator().manual_seed(1))
    with torch.no_grad():
        run = dict(num_inference_steps=2, latents=noise, guidance_scale=1.0, max_sequence_length=16, **sizes)
        latents = pipe(PROMPTS[0], output_type="latent", **run)[0]
        video = pipe(PROMPTS[0], output_type="pt", **run)[0]  # [B, F, C, H, W]
        ours = adapter.decode(latents)
    assert ours.shape == (1, 3, sizes["num_frames"], sizes["height"], sizes["width"])
    assert torch.equal(ours, video.permute(0, 2, 1, 3, 4))


@pytest.mark.parametrize("name", MODELS)
def test_velocity_is_differentiable_and_keeps_layout(name):
    _, adapter, _ = _adapter(name, 2)
    guidance = MODELS[name][2]
    cond = adapter.encode(PROMPTS, NEGATIVE, guidance_scale=guidance["guidance_scale"],
                          **{k: v for k, v in guidance.items() if k != "guidance_scale"})
    x = adapter.init_noise(2, torch.Generator().manual_seed(2)).requires_grad_()
    v = adapter.velocity(x, torch.tensor([1.0, 0.5]), cond)
    assert v.shape == x.shape and v.dtype == x.dtype
    (g,) = torch.autograd.grad(v.square().sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_bad_input_names_the_argument():
    diffusers = pytest.importorskip("diffusers")
    pipe = tiny_sd3_pipeline(blocks=1)
    with pytest.raises(ValueError, match="height and width"):
        FlowAdapter.from_pipe(pipe, 2, height=30, width=32)
    with pytest.raises(ValueError, match="num_inference_steps"):
        FlowAdapter.from_pipe(pipe, 0, height=32, width=32)
    with pytest.raises(ValueError, match="num_frames"):
        FlowAdapter.from_pipe(pipe, 2, height=32, width=32, num_frames=5)
    with pytest.raises(ValueError, match="transformer must be one of"):
        FlowAdapter(pipe.vae, pipe.scheduler, 2, 32, 32)
    with pytest.raises(ValueError, match="scheduler must be a FlowMatchEulerDiscreteScheduler"):
        FlowAdapter(pipe.transformer, diffusers.DDIMScheduler(), 2, 32, 32)
    with pytest.raises(ValueError, match="pipe must be"):
        FlowAdapter.from_pipe(object(), 2)
    adapter = FlowAdapter(pipe.transformer, pipe.scheduler, 2, 32, 32)
    with pytest.raises(ValueError, match="encode needs"):
        adapter.encode(PROMPTS)
    with pytest.raises(ValueError, match="sigma must be"):
        adapter.velocity(adapter.init_noise(2), torch.ones(1), {})
    wan = tiny_wan_pipeline()
    with pytest.raises(ValueError, match="num_frames"):
        FlowAdapter.from_pipe(wan, 2, height=16, width=16, num_frames=6)
    with pytest.raises(ValueError, match="height and width"):
        FlowAdapter.from_pipe(wan, 2, height=24, width=16, num_frames=5)


def test_imports_without_diffusers():
    code = ("import sys; sys.modules['diffusers'] = None; import diffkern.flow as f\n"
            "try:\n    f.FlowAdapter(None, None, 2, 32, 32)\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "diffkern[diffusers]" in out.stdout


def test_flux_without_guidance_embedding_is_bit_identical():
    """FLUX.1-schnell's shape: no guidance embedding, no classifier-free guidance (cond holds no 'guidance')."""
    pipe = tiny_flux_pipeline(guidance_embeds=False)
    sizes = MODELS["flux"][1]
    adapter = FlowAdapter.from_pipe(pipe, 3, **sizes)
    noise = adapter.init_noise(2, torch.Generator().manual_seed(4))
    stock = pipe(PROMPTS, num_inference_steps=3, latents=noise.clone(), output_type="latent", max_sequence_length=16,
                 **sizes)[0]
    cond = adapter.encode(PROMPTS, max_sequence_length=16)
    assert set(cond) == {"prompt_embeds", "pooled_prompt_embeds"}
    with torch.no_grad():
        assert torch.equal(sample(adapter, noise, cond), stock)
