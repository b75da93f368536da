"""What the three families (SD3, FLUX, Wan) share: the latent shape, the size check, the defaults."""
from __future__ import annotations

import torch


def image_vae_scale_factor(vae) -> int:
    """The SD3 / FLUX pipelines' vae_scale_factor: 2 ** (levels - 1) of the AutoencoderKL, 8 without one."""
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8


def check_sizes(height: int, width: int, multiple: int, why: str) -> None:
    if height % multiple or width % multiple or height < multiple or width < multiple:
        raise ValueError(f"height and width must be positive multiples of {multiple} ({why}), got height={height}, "
                         f"width={width}")


class Family:
    """One pipeline's stages around its transformer. Subclasses set transformer_class, guidance_default,
    channels and latent_size, and implement schedule, encode, velocity and latents_to_vae."""
    transformer_class: str
    guidance_default: float  # the pipeline's guidance_scale default
    latents_float32 = False  # True where the pipeline keeps float32 latents whatever the transformer's dtype
    channels: int
    latent_size: tuple

    def latent_shape(self, batch: int) -> tuple:
        """prepare_latents' shape before any packing."""
        return (batch, self.channels, *self.latent_size)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """prepare_latents' layout change after the draw (none but FLUX's)."""
        return latents
