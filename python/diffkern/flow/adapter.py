"""FlowAdapter: the sampling loop's view of a diffusers flow-matching model (SD3, FLUX, Wan2.1)."""
from __future__ import annotations

import torch

from .. import _optional
from .flux import Flux
from .sd3 import SD3
from .wan import Wan

FAMILIES = (SD3, Flux, Wan)


def _family(transformer):
    diffusers = _optional.require("diffusers", "diffusers")
    for family in FAMILIES:
        if isinstance(transformer, getattr(diffusers, family.transformer_class)):
            return family
    names = ", ".join(f.transformer_class for f in FAMILIES)
    raise ValueError(f"transformer must be one of {names}, got {type(transformer).__name__}")


class FlowAdapter:
    """A diffusers flow-matching transformer + FlowMatchEulerDiscreteScheduler as a loop sees them.

    Convention (diffusers' flow matching): x_sigma = (1 - sigma) x0 + sigma noise, the model predicts
    v = noise - x0, an Euler step is x + (sigma_next - sigma) v; sigma runs down `sigmas` [K+1] (float32, from
    1 to the terminal 0, exactly the scheduler's as the pipeline sets them), `timesteps` [K] = sigmas[:K] *
    num_train_timesteps are the values the pipeline feeds the transformer (FLUX: / 1000).

    Latents are in the transformer's own layout: SD3 [B, C, H/f, W/f]; FLUX packed [B, (H/2f)(W/2f), 4C]; Wan
    [B, C, (F-1)/ft + 1, H/fs, W/fs] (float32, as WanPipeline keeps them). cond is a dict of batch-first
    tensors from `encode` ("prompt_embeds", "pooled_prompt_embeds" (SD3, FLUX), "guidance" (FLUX's guidance
    embedding), and for classifier-free guidance "negative_prompt_embeds", "negative_pooled_prompt_embeds" and
    "guidance_scale" [B]); slice every entry along dim 0 to take samples.

    Build with `FlowAdapter.from_pipe(pipe, ...)` (encode then uses the pipeline's own encode_prompt) or
    `FlowAdapter(transformer, scheduler, ...)` from components (then cond is built by the caller, with the
    keys above). The scheduler must be a FlowMatchEulerDiscreteScheduler; the adapter never changes it.
    """

    def __init__(self, transformer, scheduler, num_inference_steps: int, height: int, width: int, *,
                 num_frames: int | None = None, vae=None, pipe=None, mu: float | None = None):
        diffusers = _optional.require("diffusers", "diffusers")
        if not isinstance(scheduler, diffusers.FlowMatchEulerDiscreteScheduler):
            raise ValueError(f"scheduler must be a FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__} "
                             "(swap it: FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, shift=...))")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        self.family = _family(transformer)(transformer, vae, height, width, num_frames, mu)
        self.transformer, self.scheduler, self.vae, self.pipe = transformer, scheduler, vae, pipe
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.sigmas, self.timesteps = self.family.schedule(scheduler, num_inference_steps, transformer.device)

    @classmethod
    def from_pipe(cls, pipe, num_inference_steps: int, height: int | None = None, width: int | None = None, *,
                  num_frames: int | None = None, mu: float | None = None) -> "FlowAdapter":
        """The adapter of a StableDiffusion3Pipeline, FluxPipeline or WanPipeline (dispatch on pipe.transformer),
        for the sizes and step count a pipe(...) call would take (height / width default to the pipeline's:
        SD3 and FLUX default_sample_size x vae_scale_factor, Wan 480 x 832 and 81 frames). mu: the dynamic-shift
        mu instead of the one computed from the image size (SD3's pipe(mu=...)). Wan2.2's two-expert and
        expanded-timestep pipelines are refused."""
        if getattr(pipe, "transformer", None) is None or getattr(pipe, "scheduler", None) is None:
            raise ValueError(f"pipe must be a diffusers pipeline with a transformer and a scheduler, got "
                             f"{type(pipe).__name__}")
        if getattr(pipe, "transformer_2", None) is not None or getattr(pipe.config, "expand_timesteps", False):
            raise ValueError("pipe: Wan2.2's two-expert / expanded-timestep pipelines are not supported")
        if height is None or width is None:
            if hasattr(pipe, "default_sample_size"):
                size = pipe.default_sample_size * pipe.vae_scale_factor
                height, width = height or size, width or size
            else:
                height, width = height or 480, width or 832
        return cls(pipe.transformer, pipe.scheduler, num_inference_steps, height, width, num_frames=num_frames,
                   vae=getattr(pipe, "vae", None), pipe=pipe, mu=mu)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        """The latents' dtype: the transformer's (SD3, FLUX: the prompt embeddings'), float32 for Wan."""
        return torch.float32 if self.family.latents_float32 else self.transformer.dtype

    def encode(self, prompts, negative_prompts=None, guidance_scale: float | None = None, **kwargs) -> dict:
        """cond for `prompts` (a str or list of B str) through the pipeline's own encode_prompt. guidance_scale
        defaults to the pipeline's (SD3 7.0, Wan 5.0: classifier-free guidance when > 1; FLUX 3.5: the guidance
        embedding, with `true_cfg_scale=` > 1 and negative_prompts for classifier-free guidance); other keyword
        arguments go to encode_prompt (e.g. max_sequence_length). Runs without grad, as the pipeline's __call__
        does (a text encoder's float32 output under grad can differ in the last bits)."""
        if self.pipe is None:
            raise ValueError("encode needs the pipeline's text encoders: build the adapter with from_pipe(pipe, ...)")
        guidance_scale = self.family.guidance_default if guidance_scale is None else guidance_scale
        with torch.no_grad():
            return self.family.encode(self.pipe, prompts, negative_prompts, guidance_scale, self.device, **kwargs)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        """v = noise - x0 predicted at x (the latent layout above) and sigma [B] (float, per sample), with
        classifier-free guidance when cond carries negative embeddings: exactly the transformer call(s) of the
        pipeline's loop. Differentiable when grad is enabled; v has x's shape and dtype."""
        if sigma.dim() != 1 or sigma.shape[0] != x.shape[0]:
            raise ValueError(f"sigma must be [B] = [{x.shape[0]}], got {tuple(sigma.shape)}")
        return self.family.velocity(self.transformer, self.num_train_timesteps, x, sigma.to(x.device), cond)

    def init_noise(self, batch: int, generator: torch.Generator | list | None = None) -> torch.Tensor:
        """The pipeline's prepare_latents draw: N(0, I) latents of `batch` samples in the layout above."""
        from diffusers.utils.torch_utils import randn_tensor
        noise = randn_tensor(self.family.latent_shape(batch), generator=generator, device=self.device,
                             dtype=self.dtype)
        return self.family.pack(noise)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (SD3, FLUX [B, 3, H, W]; Wan videos [B, 3, F, H, W]): the pipeline's unpacking, VAE
        scaling / shift and decode, and its image processor's denormalisation. Differentiable."""
        if self.vae is None:
            raise ValueError("decode needs a vae: pass vae= (or build the adapter with from_pipe)")
        from diffusers.image_processor import VaeImageProcessor
        images = self.vae.decode(self.family.latents_to_vae(self.vae, x).to(self.vae.dtype), return_dict=False)[0]
        return VaeImageProcessor.denormalize(images)
