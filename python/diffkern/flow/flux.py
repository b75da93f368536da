"""FluxPipeline's view of FluxTransformer2DModel (diffusers 0.42): packed latents [B, (H/2f)(W/2f), 4C],
image / text ids, the guidance embedding when the transformer has one, timestep = sigma * 1000 in the
latents' dtype then / 1000, true classifier-free guidance as two calls."""
from __future__ import annotations

import numpy as np
import torch

from .family import Family, check_sizes, image_vae_scale_factor
from .guidance import guide, per_sample_scale
from .schedule import dynamic_shift_mu, set_schedule


def _pipeline():
    from diffusers import FluxPipeline
    return FluxPipeline


class Flux(Family):
    """What FluxPipeline.__call__ does around the transformer, one method per stage."""
    transformer_class = "FluxTransformer2DModel"
    guidance_default = 3.5  # here the embedded guidance

    def __init__(self, transformer, vae, height: int, width: int, num_frames=None, mu=None):
        if num_frames is not None:
            raise ValueError("num_frames is for video models; FLUX makes images")
        self.vae_scale_factor = image_vae_scale_factor(vae)
        check_sizes(height, width, self.vae_scale_factor * 2, "vae_scale_factor x 2: the packing takes 2x2 latents")
        self.height, self.width = height, width
        self.latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        self.channels = transformer.config.in_channels // 4
        self.guidance_embeds = transformer.config.guidance_embeds
        self.mu = mu

    def schedule(self, scheduler, num_inference_steps: int, device):
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        h, w = self.latent_size
        mu = dynamic_shift_mu(scheduler.config, (h // 2) * (w // 2), 1.15) if self.mu is None else self.mu
        return set_schedule(scheduler, num_inference_steps, sigmas=sigmas, mu=mu, device=device)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return _pipeline()._pack_latents(latents, latents.shape[0], self.channels, *self.latent_size)

    def encode(self, pipe, prompts, negative_prompts, guidance_scale, device, true_cfg_scale: float = 1.0,
               **kwargs) -> dict:
        """guidance_scale: the embedded guidance (FLUX.1-dev); true_cfg_scale (> 1 with negative_prompts): the
        classifier-free guidance scale, carried in cond as "guidance_scale" like the other models'."""
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, **kwargs)
        cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if self.guidance_embeds:
            cond["guidance"] = per_sample_scale(embeds.shape[0], guidance_scale, embeds.device)
        if true_cfg_scale > 1 and negative_prompts is not None:
            negative, negative_pooled, _ = pipe.encode_prompt(prompt=negative_prompts, prompt_2=None, device=device,
                                                              **kwargs)
            cond.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled,
                        guidance_scale=per_sample_scale(embeds.shape[0], true_cfg_scale, embeds.device))
        return cond

    def velocity(self, transformer, num_train_timesteps: int, x, sigma, cond) -> torch.Tensor:
        if self.guidance_embeds and "guidance" not in cond:
            raise ValueError("cond lacks 'guidance': this FLUX transformer has a guidance embedding")
        timestep = (sigma.to(torch.float32) * num_train_timesteps).to(x.dtype) / 1000
        guidance = cond["guidance"] if self.guidance_embeds else None
        h, w = self.latent_size
        img_ids = _pipeline()._prepare_latent_image_ids(x.shape[0], h // 2, w // 2, x.device, x.dtype)

        def call(embeds, pooled):
            txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype)
            return transformer(hidden_states=x, timestep=timestep, guidance=guidance,
                               pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids,
                               img_ids=img_ids, return_dict=False)[0]

        v = call(cond["prompt_embeds"], cond["pooled_prompt_embeds"])
        if "negative_prompt_embeds" in cond:
            v = guide(call(cond["negative_prompt_embeds"], cond["negative_pooled_prompt_embeds"]), v,
                      cond["guidance_scale"])
        return v

    def latents_to_vae(self, vae, x) -> torch.Tensor:
        x = _pipeline()._unpack_latents(x, self.height, self.width, self.vae_scale_factor)
        return x / vae.config.scaling_factor + vae.config.shift_factor
