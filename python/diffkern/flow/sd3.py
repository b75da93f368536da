"""StableDiffusion3Pipeline's view of SD3Transformer2DModel (diffusers 0.42): latents [B, C, H/f, W/f],
timestep = sigma * num_train_timesteps, pooled projections, guidance on a [negative, positive] batch."""
from __future__ import annotations

import torch

from .family import Family, check_sizes, image_vae_scale_factor
from .guidance import guide, per_sample_scale
from .schedule import dynamic_shift_mu, set_schedule


class SD3(Family):
    """What StableDiffusion3Pipeline.__call__ does around the transformer, one method per stage."""
    transformer_class = "SD3Transformer2DModel"
    guidance_default = 7.0

    def __init__(self, transformer, vae, height: int, width: int, num_frames=None, mu=None):
        if num_frames is not None:
            raise ValueError("num_frames is for video models; SD3 makes images")
        self.vae_scale_factor = image_vae_scale_factor(vae)
        check_sizes(height, width, self.vae_scale_factor * transformer.config.patch_size,
                    "vae_scale_factor x patch size")
        self.latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        self.channels = transformer.config.in_channels
        self.patch_size = transformer.config.patch_size
        self.mu = mu

    def schedule(self, scheduler, num_inference_steps: int, device):
        mu = self.mu
        if scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            h, w = self.latent_size
            mu = dynamic_shift_mu(scheduler.config, (h // self.patch_size) * (w // self.patch_size), 1.16)
        return set_schedule(scheduler, num_inference_steps, mu=mu, device=device)

    def encode(self, pipe, prompts, negative_prompts, guidance_scale, device, **kwargs) -> dict:
        cfg = guidance_scale > 1
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, negative_prompt=negative_prompts,
            do_classifier_free_guidance=cfg, device=device, **kwargs)
        cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if cfg:
            cond.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled,
                        guidance_scale=per_sample_scale(embeds.shape[0], guidance_scale, embeds.device))
        return cond

    def velocity(self, transformer, num_train_timesteps: int, x, sigma, cond) -> torch.Tensor:
        timestep = sigma.to(torch.float32) * num_train_timesteps
        embeds, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
        cfg = "negative_prompt_embeds" in cond
        if cfg:
            x, timestep = torch.cat([x, x]), torch.cat([timestep, timestep])
            embeds = torch.cat([cond["negative_prompt_embeds"], embeds])
            pooled = torch.cat([cond["negative_pooled_prompt_embeds"], pooled])
        v = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds, pooled_projections=pooled,
                        return_dict=False)[0]
        if cfg:
            uncond, text = v.chunk(2)
            v = guide(uncond, text, cond["guidance_scale"])
        return v

    def latents_to_vae(self, vae, x) -> torch.Tensor:
        return x / vae.config.scaling_factor + vae.config.shift_factor
