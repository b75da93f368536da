"""Turn a standard residual DiT into its DAR form, keeping every pretrained weight.

The source is diffusers' DiTTransformer2DModel (layout map and numerical differences in
`diffkern.dar.convert_diffusers`) or any module with the usual DiT layout: x_embedder (a patch embedding
whose `proj` is a Conv2d), pos_embed [1, T, d], t_embedder.mlp, y_embedder.embedding_table, blocks[i] each with norm1,
attn (qkv, proj, num_heads), norm2, mlp (fc1, fc2) and adaLN_modulation producing 6 chunks, and
final_layer (norm_final, linear, adaLN_modulation producing 2 chunks). The architecture is read off
the source's weights, a `diffkern.dar.blocks.DiT` of that shape is built and the source's state dict
is loaded into it strictly; only the router's parameters are new, at their initialisation (uniform
routing: every sublayer input starts as the plain mean of its sources, which is not the residual sum).
"""
from __future__ import annotations

from torch import nn

from .blocks import DiT
from .convert_diffusers import _fail, architecture_and_weights, is_diffusers_dit

_REQUIRED = ("x_embedder", "t_embedder", "y_embedder", "blocks", "final_layer", "pos_embed")


def _architecture(src: nn.Module) -> dict:
    """The DiT constructor arguments that reproduce `src`'s weight shapes."""
    missing = [name for name in _REQUIRED if not hasattr(src, name)]
    if missing:
        _fail(f"model lacks {missing}; expected the standard DiT layout ({', '.join(_REQUIRED)})")
    conv = src.x_embedder.proj
    if not isinstance(conv, nn.Conv2d) or conv.kernel_size[0] != conv.kernel_size[1]:
        _fail(f"x_embedder.proj must be a square-kernel Conv2d, got {conv}")
    blocks = list(src.blocks)
    if not blocks:
        _fail("model.blocks is empty")
    d, patch = conv.out_channels, conv.kernel_size[0]
    block = blocks[0]
    for name in ("norm1", "attn", "norm2", "mlp", "adaLN_modulation"):
        if not hasattr(block, name):
            _fail(f"blocks[0] lacks {name!r}; expected DiTBlock(norm1, attn, norm2, mlp, adaLN_modulation)")
    if block.adaLN_modulation[-1].out_features != 6 * d:
        _fail(f"blocks[0].adaLN_modulation must produce 6 chunks of d={d}, "
              f"got {block.adaLN_modulation[-1].out_features} features")
    T = src.pos_embed.shape[-2]
    grid = int(round(T ** 0.5))
    if grid * grid != T:
        _fail(f"pos_embed must cover a square grid of patches, got {T} positions")
    table = src.y_embedder.embedding_table
    dropout = float(getattr(src.y_embedder, "dropout_prob", 0.0))
    out_channels = src.final_layer.linear.out_features // (patch * patch)
    in_channels = conv.in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        _fail(f"final_layer.linear gives {out_channels} channels per patch; "
              f"expected {in_channels} or {2 * in_channels}")
    return dict(input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=d, depth=len(blocks),
                num_heads=block.attn.num_heads, mlp_ratio=block.mlp.fc1.out_features / d, class_dropout_prob=dropout,
                num_classes=table.num_embeddings - int(dropout > 0), learn_sigma=out_channels == 2 * in_channels)


def to_dar(model: nn.Module, stream: str = "dar", chunk_size: int | None = 4, query: str = "timestep",
           summary: str = "sum", recompute: bool = False) -> DiT:
    """A `DiT` with `model`'s architecture and weights, its residual stream replaced by DAR routing.

    Args:
        model: a residual DiT in the standard layout, or diffusers' DiTTransformer2DModel (module docstring).
        stream: "dar", or "residual" for the same weights in diffkern's residual DiT (numerically the source:
            equal up to the rounding of a different operation order, e.g. the fused qkv projection).
        chunk_size, query, summary, recompute: the router's settings (see `diffkern.dar.blocks.DiT`).
    Returns the new model on `model`'s device and dtype, in `model`'s train/eval mode. Raises ValueError
    when `model` does not have the standard layout or a weight does not fit.
    """
    args, weights = architecture_and_weights(model) if is_diffusers_dit(model) else (_architecture(model),
                                                                                   model.state_dict())
    out = DiT(**args, stream=stream, chunk_size=chunk_size, query=query, summary=summary, recompute=recompute)
    ref = next(model.parameters())
    out = out.to(device=ref.device, dtype=ref.dtype)
    try:
        result = out.load_state_dict(weights, strict=False)
    except RuntimeError as error:
        _fail(f"a weight does not fit the DiT layout: {error}")
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if not k.startswith("router.")]
    if unexpected or missing:
        _fail(f"state dict does not match the DiT layout: unexpected {unexpected}, missing {missing}")
    return out.train(model.training)

