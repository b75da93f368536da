"""WanPipeline's view of WanTransformer3DModel (Wan2.1, diffusers 0.42): float32 latents
[B, C, (F-1)/ft + 1, H/fs, W/fs] fed in the transformer's dtype, timestep = sigma * num_train_timesteps,
classifier-free guidance as two calls."""
from __future__ import annotations

import torch

from .family import Family, check_sizes
from .guidance import guide, per_sample_scale
from .schedule import set_schedule


class Wan(Family):
    """What WanPipeline.__call__ does around the transformer, one method per stage."""
    transformer_class = "WanTransformer3DModel"
    guidance_default = 5.0
    latents_float32 = True

    def __init__(self, transformer, vae, height: int, width: int, num_frames=None, mu=None):
        if mu is not None:
            raise ValueError("mu (dynamic shifting) is not passed by WanPipeline")
        num_frames = 81 if num_frames is None else num_frames
        temporal = vae.config.scale_factor_temporal if vae is not None else 4
        spatial = vae.config.scale_factor_spatial if vae is not None else 8
        check_sizes(height, width, 16, "WanPipeline's check")
        if num_frames < 1 or (num_frames - 1) % temporal:
            raise ValueError(f"num_frames must be 1 + a multiple of {temporal} (the VAE's temporal factor), "
                             f"got {num_frames}")
        self.latent_size = ((num_frames - 1) // temporal + 1, height // spatial, width // spatial)
        self.channels = transformer.config.in_channels

    def schedule(self, scheduler, num_inference_steps: int, device):
        return set_schedule(scheduler, num_inference_steps, device=device)

    def encode(self, pipe, prompts, negative_prompts, guidance_scale, device, **kwargs) -> dict:
        cfg = guidance_scale > 1
        embeds, negative = pipe.encode_prompt(prompt=prompts, negative_prompt=negative_prompts,
                                              do_classifier_free_guidance=cfg, device=device, **kwargs)
        dtype = pipe.transformer.dtype
        cond = {"prompt_embeds": embeds.to(dtype)}
        if cfg:
            cond.update(negative_prompt_embeds=negative.to(dtype),
                        guidance_scale=per_sample_scale(embeds.shape[0], guidance_scale, embeds.device))
        return cond

    def velocity(self, transformer, num_train_timesteps: int, x, sigma, cond) -> torch.Tensor:
        timestep = sigma.to(torch.float32) * num_train_timesteps
        x_in = x.to(transformer.dtype)

        def call(embeds):
            return transformer(hidden_states=x_in, timestep=timestep, encoder_hidden_states=embeds,
                               return_dict=False)[0]

        v = call(cond["prompt_embeds"])
        if "negative_prompt_embeds" in cond:
            v = guide(call(cond["negative_prompt_embeds"]), v, cond["guidance_scale"])
        return v.to(x.dtype)

    def latents_to_vae(self, vae, x) -> torch.Tensor:
        shape = (1, vae.config.z_dim, 1, 1, 1)
        x = x.to(vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(x.device, x.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(x.device, x.dtype)
        return x / inv_std + mean
