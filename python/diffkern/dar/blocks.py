"""DiT/SiT with DAR routing in place of the residual stream, and the plain-residual baseline from the same code.

One network, two streams (specs/dar.md):
  stream="residual":  x <- x + gate_msa * Attn(mod(LN(x)));  x <- x + gate_mlp * MLP(mod(LN(x)))
  stream="dar":       each sublayer input is h_l = DARRouter(history, l), the history being the patch
                      embedding and every earlier sublayer output (the branch output after its adaLN
                      gate); nothing is added back. The final layer reads the router's final aggregate.
Each block has two sublayers (attention, MLP), so a depth-D model routes 2D sublayer inputs plus the
final aggregate. Conditioning is adaLN-Zero (the gates and the final layer start at zero). SiT is this
network trained on the velocity objective of `diffkern.dar.sit`.

The submodule names follow the widely used DiT layout (x_embedder.proj, t_embedder.mlp,
y_embedder.embedding_table, blocks[i].{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2,
adaLN_modulation}, final_layer.{norm_final, linear, adaLN_modulation}, pos_embed), so a pretrained
residual checkpoint loads as is (see `diffkern.dar.convert`).
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

# The paper's DiT family with patch 2: hidden size d, depth (blocks), heads.
CONFIGS = {
    "DiT-S/2": dict(hidden_size=384, depth=12, num_heads=6, patch_size=2),
    "DiT-B/2": dict(hidden_size=768, depth=12, num_heads=12, patch_size=2),
    "DiT-L/2": dict(hidden_size=1024, depth=24, num_heads=16, patch_size=2),
    "DiT-XL/2": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2),
}
STREAMS = ("residual", "dar")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with [B, d] shift/scale broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal features [B, dim] of (possibly fractional) timesteps t [B]: cos(t f_k) then sin(t f_k) with
    f_k = max_period^(-k / (dim/2 - freq_shift)), k < dim/2. freq_shift = 0 is DiT's; diffusers' DiT uses
    Timesteps(downscale_freq_shift=1), i.e. freq_shift = 1 (its lowest frequency is exactly 1/max_period)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def sincos_pos_embed_2d(d: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding [grid*grid, d]: half of d encodes the row, half the column."""
    if d % 4:
        raise ValueError(f"hidden_size must be a multiple of 4 for the 2-D position embedding, got {d}")
    omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def axis(pos):
        a = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)
    return torch.cat([axis(cols), axis(rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of a [B, C, H, W] image to tokens [B, (H/p)(W/p), d]."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"input_size {img_size} must be a multiple of patch_size {patch_size}")
        self.patch_size, self.grid_size = patch_size, img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # tokens [B, T, d], d contiguous


class TimestepEmbedder(nn.Module):
    """t [B] -> [B, d]: sinusoidal features (`timestep_embedding`, with `freq_shift`) through a two-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.frequency_embedding_size, self.freq_shift = frequency_embedding_size, freq_shift
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels [B] -> [B, d]. With dropout_prob > 0 an extra "null" row serves classifier-free guidance:
    in training each label is replaced by it with probability dropout_prob."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, y: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention (fused qkv projection, scaled dot product, output projection)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} must be a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, d))


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Two adaLN-Zero sublayers. `branches` gives each sublayer's gated output; the stream decides how
    their inputs are formed (residual sum in `forward`, DAR routing in `DiT`). mlp_norm_eps: norm2's eps."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(shift, scale, gate) of the attention sublayer then of the MLP sublayer, each [B, d]."""
        return self.adaLN_modulation(c).chunk(6, dim=1)

    def attn_branch(self, h: torch.Tensor, mod) -> torch.Tensor:
        shift, scale, gate = mod[:3]
        return gate[:, None] * self.attn(modulate(self.norm1(h), shift, scale))

    def mlp_branch(self, h: torch.Tensor, mod) -> torch.Tensor:
        shift, scale, gate = mod[3:]
        return gate[:, None] * self.mlp(modulate(self.norm2(h), shift, scale))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The residual stream through this block."""
        mod = self.modulation(c)
        x = x + self.attn_branch(x, mod)
        return x + self.mlp_branch(x, mod)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from tokens to patches."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional diffusion transformer on [B, C, H, W] inputs, with a residual or a DAR stream.

    Args:
        input_size, patch_size, in_channels: image side, patch side, channels (T = (input_size/patch)^2).
        hidden_size, depth, num_heads, mlp_ratio: the transformer (2 * depth sublayers).
        class_dropout_prob, num_classes: label conditioning (a null class when the dropout is > 0).
        learn_sigma: output 2*in_channels (mean and variance, DiT) instead of in_channels (SiT velocity);
            `diffkern.dar.sit` takes the first in_channels of a 2*in_channels output as the velocity.
        stream: "residual" (the baseline) or "dar".
        chunk_size, query, summary: the DARRouter's chunking (None = full scheme), query variant
            ("static", "timestep" = w_l + e_l(c) with c the adaLN conditioning, "dynamic") and chunk
            summary rule ("sum" or "last"); used when stream="dar".
        recompute: with chunked DAR, recompute each chunk's sublayers in backward (activation
            checkpointing per chunk) so autograd keeps about S + N stream tensors instead of 2 * depth.
        timestep_freq_shift, mlp_norm_eps: the timestep features' frequency shift (`timestep_embedding`) and
            the eps of each block's MLP LayerNorm (norm2); the defaults (0, 1e-6) are DiT's, diffusers'
            DiTTransformer2DModel has 1 and its config's norm_eps (`diffkern.dar.convert`).
    forward(x [B, C, H, W], t [B], y [B] int64) -> [B, out_channels, H, W].
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, stream: str = "dar", chunk_size: int | None = 4,
                 query: str = "timestep", summary: str = "sum", recompute: bool = False,
                 timestep_freq_shift: float = 0.0, mlp_norm_eps: float = 1e-6):
        super().__init__()
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
        if recompute and (stream != "dar" or chunk_size is None):
            raise ValueError("recompute=True needs stream='dar' with a chunk_size (chunked routing)")
        self.stream, self.in_channels, self.recompute = stream, in_channels, recompute
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size, self.num_heads = patch_size, num_heads
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.x_embedder.grid_size)[None])
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, mlp_norm_eps) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._init_weights()
        if stream == "dar":  # built after the init above, so the router keeps its own (uniform-routing) init
            from ..nn import DARRouter
            self.router = DARRouter(hidden_size, 2 * depth, chunk_size=chunk_size, query=query,
                                    cond_dim=hidden_size if query == "timestep" else None, summary=summary)

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every sublayer starts switched off
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def n_sublayers(self) -> int:
        return 2 * len(self.blocks)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, p*p*C] -> [B, C, H, W]."""
        p, C = self.patch_size, self.out_channels
        g = int(round(x.shape[1] ** 0.5))
        x = x.reshape(x.shape[0], g, g, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], C, g * p, g * p)

    def _residual(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, c)
        return x

    def _dar(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sublayers = []
        for block in self.blocks:
            mod = block.modulation(c)
            sublayers += [partial(block.attn_branch, mod=mod), partial(block.mlp_branch, mod=mod)]
        return self.router.run(x, sublayers, cond=c, recompute=self.recompute)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        x = self._residual(x, c) if self.stream == "residual" else self._dar(x, c)
        return self.unpatchify(self.final_layer(x, c))


def dit(name: str, stream: str = "dar", **kwargs) -> DiT:
    """A DiT of the paper's family by name ("DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"); kwargs override."""
    if name not in CONFIGS:
        raise ValueError(f"name must be one of {sorted(CONFIGS)}, got {name!r}")
    return DiT(**{**CONFIGS[name], **kwargs}, stream=stream)
