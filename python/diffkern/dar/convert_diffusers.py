"""diffusers' DiTTransformer2DModel as `diffkern.dar.blocks.DiT` constructor arguments and a DiT state dict.

Layout map (diffusers -> DiT):
    pos_embed.proj, pos_embed.pos_embed (buffer)       -> x_embedder.proj, pos_embed
    transformer_blocks[0].norm1.emb.timestep_embedder  -> t_embedder.mlp (linear_1 -> mlp[0], linear_2 -> mlp[2])
    transformer_blocks[0].norm1.emb.class_embedder     -> y_embedder.embedding_table
    transformer_blocks[i].norm1.linear                 -> blocks[i].adaLN_modulation[1]  (same 6-chunk order)
    transformer_blocks[i].attn1.to_q | to_k | to_v     -> blocks[i].attn.qkv (rows stacked q, k, v)
    transformer_blocks[i].attn1.to_out[0]              -> blocks[i].attn.proj
    transformer_blocks[i].ff.net[0].proj, ff.net[2]    -> blocks[i].mlp.fc1, mlp.fc2
    proj_out_1, proj_out_2                             -> final_layer.adaLN_modulation[1], final_layer.linear
Numerical differences between the two layouts, and how they are matched:
- every block has its own CombinedTimestepLabelEmbeddings, and the output head uses block 0's; a
  converted DiT checkpoint holds equal copies, so the DiT's single embedder is block 0's, and a block
  whose embedder differs from block 0's is refused (ValueError naming the block and the weight);
- timestep features: Timesteps(flip_sin_to_cos=True, downscale_freq_shift=1) divides the frequency
  exponent by 127 instead of DiT's 128 -> DiT(timestep_freq_shift=1) (cos then sin in both);
- the MLP sublayer's LayerNorm (norm3) has eps = config.norm_eps (1e-5 by default) where DiT's norm2 has
  1e-6 -> DiT(mlp_norm_eps=norm_eps); norm1 and norm_out are 1e-6 in both;
- MLP: activation "gelu-approximate" is DiT's GELU(tanh); any other activation is refused;
- attention: separate q/k/v projections are the rows of the fused qkv (a missing bias, attention_bias=False,
  becomes a zero bias); scaled dot product attention with scale head_dim^-1/2 in both;
- dropout (config.dropout > 0) and elementwise-affine norms have no place in the DiT and are refused.
"""
from __future__ import annotations

import torch
from torch import nn


def _fail(msg: str):
    raise ValueError(f"to_dar: {msg}")


def is_diffusers_dit(model: nn.Module) -> bool:
    """Whether `model` has diffusers' DiTTransformer2DModel layout (checked by structure, not by import)."""
    return all(hasattr(model, name) for name in ("transformer_blocks", "pos_embed", "proj_out_1", "proj_out_2"))


def _check_config(cfg) -> None:
    if cfg.norm_type != "ada_norm_zero":
        _fail(f"config.norm_type must be 'ada_norm_zero' (DiT's adaLN-Zero), got {cfg.norm_type!r}")
    if cfg.activation_fn != "gelu-approximate":
        _fail(f"config.activation_fn must be 'gelu-approximate' (DiT's GELU with the tanh approximation), "
              f"got {cfg.activation_fn!r}")
    if cfg.norm_elementwise_affine:
        _fail("config.norm_elementwise_affine=True: the blocks' norm3 has an affine the DiT layout does not have")
    if cfg.dropout:
        _fail(f"config.dropout={cfg.dropout}: the DiT layout has no dropout")


def _check_embedders(blocks) -> None:
    """Every block's conditioning embedder must equal block 0's (the one the DiT keeps)."""
    first = blocks[0].norm1.emb
    proj = first.time_proj
    if not proj.flip_sin_to_cos or proj.scale != 1:
        _fail("transformer_blocks[0].norm1.emb.time_proj must be Timesteps(flip_sin_to_cos=True, scale=1)")
    ref = first.state_dict()
    for i, block in enumerate(blocks[1:], start=1):
        emb = block.norm1.emb
        for name, w in emb.state_dict().items():
            if name not in ref or ref[name].shape != w.shape or not torch.equal(ref[name], w):
                _fail(f"transformer_blocks[{i}].norm1.emb.{name} differs from block 0's; the DiT has one timestep "
                      f"and label embedder, so every block's must be an equal copy")
        theirs = (emb.time_proj.num_channels, emb.time_proj.downscale_freq_shift, emb.time_proj.flip_sin_to_cos,
                  emb.time_proj.scale, emb.class_embedder.num_classes, emb.class_embedder.dropout_prob)
        ours = (proj.num_channels, proj.downscale_freq_shift, proj.flip_sin_to_cos, proj.scale,
                first.class_embedder.num_classes, first.class_embedder.dropout_prob)
        if theirs != ours:
            _fail(f"transformer_blocks[{i}].norm1.emb's timestep/label settings {theirs} differ from block 0's {ours}")


def _bias(linear: nn.Linear) -> torch.Tensor:
    return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)


def _state_dict(model: nn.Module) -> dict:
    """The DiT state dict holding `model`'s weights (pos_embed included); raises if a weight is left unmapped."""
    blocks, emb = model.transformer_blocks, model.transformer_blocks[0].norm1.emb
    pairs = {"x_embedder.proj": model.pos_embed.proj, "t_embedder.mlp.0": emb.timestep_embedder.linear_1,
             "t_embedder.mlp.2": emb.timestep_embedder.linear_2,
             "final_layer.adaLN_modulation.1": model.proj_out_1, "final_layer.linear": model.proj_out_2}
    for i, block in enumerate(blocks):
        pairs |= {f"blocks.{i}.adaLN_modulation.1": block.norm1.linear, f"blocks.{i}.attn.proj": block.attn1.to_out[0],
                  f"blocks.{i}.mlp.fc1": block.ff.net[0].proj, f"blocks.{i}.mlp.fc2": block.ff.net[2]}
    out = {f"{name}.{p}": w for name, layer in pairs.items() for p, w in layer.state_dict().items()}
    out["y_embedder.embedding_table.weight"] = emb.class_embedder.embedding_table.weight
    out["pos_embed"] = model.pos_embed.pos_embed
    for i, block in enumerate(blocks):
        a = block.attn1
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight])
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([_bias(a.to_q), _bias(a.to_k), _bias(a.to_v)])
    used = {id(w) for layer in pairs.values() for w in layer.parameters()}
    used |= {id(w) for block in blocks for w in [*block.attn1.to_q.parameters(), *block.attn1.to_k.parameters(),
                                                 *block.attn1.to_v.parameters(), *block.norm1.emb.parameters()]}
    left = [name for name, w in model.named_parameters() if id(w) not in used]
    if left:
        _fail(f"weights with no place in the DiT layout: {left}")
    return out


def architecture_and_weights(model: nn.Module) -> tuple[dict, dict]:
    """(DiT constructor arguments, DiT state dict) for a diffusers DiTTransformer2DModel; ValueError naming
    the config field, block or weight that does not fit the DiT layout (module docstring)."""
    cfg = model.config
    _check_config(cfg)
    blocks = list(model.transformer_blocks)
    if not blocks:
        _fail("model.transformer_blocks is empty")
    _check_embedders(blocks)
    if getattr(model.pos_embed, "pos_embed", None) is None or model.pos_embed.norm is not None:
        _fail("pos_embed must be a PatchEmbed with a sincos position embedding and no layer norm")
    if cfg.sample_size % cfg.patch_size:
        _fail(f"config.sample_size {cfg.sample_size} must be a multiple of config.patch_size {cfg.patch_size}")
    out_channels = model.out_channels
    if out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
        _fail(f"config.out_channels={out_channels}: expected in_channels ({cfg.in_channels}) or twice that")
    d = cfg.num_attention_heads * cfg.attention_head_dim
    emb = blocks[0].norm1.emb
    dropout = float(emb.class_embedder.dropout_prob)
    args = dict(input_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels, hidden_size=d,
                depth=len(blocks), num_heads=cfg.num_attention_heads,
                mlp_ratio=blocks[0].ff.net[0].proj.out_features / d, class_dropout_prob=dropout,
                num_classes=emb.class_embedder.num_classes, learn_sigma=out_channels == 2 * cfg.in_channels,
                timestep_freq_shift=float(emb.time_proj.downscale_freq_shift), mlp_norm_eps=float(cfg.norm_eps))
    return args, _state_dict(model)
