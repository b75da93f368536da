"""Tiny random-weight diffusers pipelines built from the real diffusers and transformers classes (nothing is
downloaded): StableDiffusion3Pipeline, FluxPipeline and WanPipeline with character-level tokenizers written
here, small text encoders, VAEs and transformers from configs. Seeded; for tests and demos on CPU."""
from __future__ import annotations

import string

import torch

from .. import _optional

_CHARS = string.ascii_lowercase + string.digits + string.punctuation


def _clip_tokenizer(tokens: int):
    """A CLIPTokenizer whose tokens are characters (inside or at the end of a word), `tokens` long."""
    transformers = _optional.require("transformers", "diffusers")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [c for c in _CHARS] + [c + "</w>" for c in _CHARS]:
        vocab[token] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=tokens), len(vocab)


def _t5_tokenizer():
    """A T5Tokenizer (unigram) whose pieces are characters and the word boundary '▁'."""
    transformers = _optional.require("transformers", "diffusers")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "▁" + _CHARS]
    return transformers.T5Tokenizer(vocab=vocab, extra_ids=0), len(vocab)


def _clip_config(vocab: int, tokens: int, hidden: int, projection: int):
    transformers = _optional.require("transformers", "diffusers")
    return transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokens,
                                       projection_dim=projection, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build().eval()


def tiny_sd3_pipeline(blocks: int = 6, heads: int = 2, head_dim: int = 32, clip_tokens: int = 32, seed: int = 0,
                      shift: float = 3.0, **scheduler_config):
    """A random-weight StableDiffusion3Pipeline: an SD3Transformer2DModel of `blocks` joint blocks, a 2-level
    AutoencoderKL (vae_scale_factor 2), two tiny CLIPTextModelWithProjection encoders with character-level CLIP
    tokenizers (`clip_tokens` tokens each) and no T5 (SD3 then feeds zeros in its place); the scheduler a
    FlowMatchEulerDiscreteScheduler(shift=shift, **scheduler_config)."""
    diffusers = _optional.require("diffusers", "diffusers")
    transformers = _optional.require("transformers", "diffusers")
    tokenizer, vocab = _clip_tokenizer(clip_tokens)
    transformer = _seeded(seed, lambda: diffusers.SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=blocks, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=64, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=32, out_channels=4, pos_embed_max_size=32, qk_norm="rms_norm"))
    vae = _seeded(seed + 1, lambda: diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
        norm_num_groups=8, shift_factor=0.0609, scaling_factor=1.5035))
    encoders = [_seeded(seed + s, lambda: transformers.CLIPTextModelWithProjection(
        _clip_config(vocab, clip_tokens, 32, 16))) for s in (2, 3)]
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=shift, **scheduler_config),
        vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
        tokenizer_2=_clip_tokenizer(clip_tokens)[0], text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _t5_config(cls_config, vocab: int):
    return cls_config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def tiny_flux_pipeline(guidance_embeds: bool = True, clip_tokens: int = 32, seed: int = 0, **scheduler_config):
    """A random-weight FluxPipeline: a FluxTransformer2DModel (1 double and 1 single block, 4 latent channels
    packed to 16), a 1-level AutoencoderKL (vae_scale_factor 1), a tiny CLIPTextModel and T5EncoderModel with
    character-level tokenizers; the scheduler FLUX.1's FlowMatchEulerDiscreteScheduler config (dynamic
    shifting) updated with `scheduler_config`."""
    diffusers = _optional.require("diffusers", "diffusers")
    transformers = _optional.require("transformers", "diffusers")
    clip_tokenizer, clip_vocab = _clip_tokenizer(clip_tokens)
    t5_tokenizer, t5_vocab = _t5_tokenizer()
    transformer = _seeded(seed, lambda: diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8), guidance_embeds=guidance_embeds))
    vae = _seeded(seed + 1, lambda: diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
        scaling_factor=0.3611))
    clip = _seeded(seed + 2, lambda: transformers.CLIPTextModel(_clip_config(clip_vocab, clip_tokens, 32, 32)))
    t5 = _seeded(seed + 3, lambda: transformers.T5EncoderModel(_t5_config(transformers.T5Config, t5_vocab)))
    config = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                  max_image_seq_len=4096)
    config.update(scheduler_config)
    pipe = diffusers.FluxPipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**config), vae=vae,
        text_encoder=clip, tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan_pipeline(seed: int = 0, shift: float = 5.0, **scheduler_config):
    """A random-weight WanPipeline: a WanTransformer3DModel (2 blocks, 16 latent channels), a tiny
    AutoencoderKLWan (spatial factor 8, temporal 4), a tiny UMT5EncoderModel with a character-level T5
    tokenizer; the scheduler a FlowMatchEulerDiscreteScheduler(shift=shift, **scheduler_config)."""
    diffusers = _optional.require("diffusers", "diffusers")
    transformers = _optional.require("transformers", "diffusers")
    tokenizer, vocab = _t5_tokenizer()
    transformer = _seeded(seed, lambda: diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32))
    vae = _seeded(seed + 1, lambda: diffusers.AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]))
    encoder = _seeded(seed + 2, lambda: transformers.UMT5EncoderModel(_t5_config(transformers.UMT5Config, vocab)))
    pipe = diffusers.WanPipeline(transformer=transformer, vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=shift, **scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe
