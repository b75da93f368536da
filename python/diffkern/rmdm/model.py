"""RecursiveMDM: a (K x L) masked diffusion model whose K shared blocks run L times per denoising step.

specs/rmdm.md "Model" and "Training objective": tokens z_t (vocab + [MASK]), e = Emb(z_t) + pos,
h_0 = e, h_k = Blocks(h_{k-1}; t) for k = 1..L (diffkern.recurse, no re-injection of e), and
logits_k = Head(LN(h_k)) after every iteration (deep supervision). The MDLM loss with the log-linear
schedule weights each sample by 1/t; prompt tokens are never masked and carry no loss; the head never
predicts [MASK] (SUBS). The number of iterations is an argument of every call, so inference may use
L_s != L_t.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from .op import recurse
from .reference import N_MOD, param_shapes


def _init_block(d: int, f: int, std: float) -> list[nn.Parameter]:
    params = []
    for name, shape in zip(("ln1_w", "ln1_b", "w_qkv", "b_qkv", "w_o", "b_o", "ln2_w", "ln2_b", "w_1", "b_1",
                            "w_2", "b_2"), param_shapes(d, f)):
        if name.startswith("ln") and name.endswith("_w"):
            t = torch.ones(shape)
        elif name.startswith("w_"):
            t = torch.randn(shape) * std
        else:
            t = torch.zeros(shape)
        params.append(nn.Parameter(t))
    return params


def timestep_features(t: torch.Tensor, d: int) -> torch.Tensor:
    """Sinusoidal features [B, d] of t in [0, 1]."""
    half = d // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class RecursiveMDM(nn.Module):
    """A (K x L) recursive masked diffusion model over sequences of `seq_len` tokens from `vocab` symbols.

    Args: vocab (real tokens; [MASK] is id `vocab`), d, heads, K shared blocks, L training iterations,
    seq_len, mlp (MLP width, 4d by default), time_cond (adaLN-zero on t; off by default, as is common
    for Sudoku MDMs), supervision ("uniform" or "linear": w_k = 1/L or k / sum(1..L)).
    """

    def __init__(self, vocab: int, d: int, heads: int, K: int, L: int, seq_len: int, mlp: int | None = None,
                 time_cond: bool = False, supervision: str = "uniform", eps: float = 1e-5):
        super().__init__()
        if supervision not in ("uniform", "linear"):
            raise ValueError(f"RecursiveMDM: supervision must be 'uniform' or 'linear', got {supervision!r}")
        self.vocab, self.mask_id, self.d, self.heads, self.K, self.L = vocab, vocab, d, heads, K, L
        self.supervision, self.eps = supervision, eps
        std = 0.02
        self.embed = nn.Embedding(vocab + 1, d)
        nn.init.normal_(self.embed.weight, std=std)
        self.pos = nn.Parameter(torch.randn(seq_len, d) * std)
        self.blocks = nn.ParameterList([p for _ in range(K) for p in _init_block(d, mlp or 4 * d, std)])
        self.time = None
        if time_cond:
            self.time = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, K * N_MOD * d))
            nn.init.zeros_(self.time[2].weight)
            nn.init.zeros_(self.time[2].bias)
        self.norm = nn.LayerNorm(d, eps=eps)
        self.head = nn.Linear(d, vocab)

    def block_params(self) -> list[list[torch.Tensor]]:
        n = len(self.blocks) // self.K
        return [list(self.blocks[k * n:(k + 1) * n]) for k in range(self.K)]

    def forward(self, z: torch.Tensor, t: torch.Tensor | None = None, n_iter: int | None = None,
                return_all: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab] after n_iter (default L) iterations, or [n_iter, B, T, vocab] for every one."""
        if _checks.tensor("RecursiveMDM", "z", z).is_floating_point() or z.is_complex() or z.dtype == torch.bool:
            raise ValueError(f"RecursiveMDM: z must be an integer tensor of token ids [B, T], got {z.dtype}")
        h = self.embed(z) + self.pos[: z.shape[1]]
        mod = None
        if self.time is not None:
            mod = self.time(timestep_features(t, self.d).to(h.dtype)).view(z.shape[0], self.K, N_MOD, self.d)
        states = recurse(self.block_params(), h.contiguous(), n_iter or self.L, heads=self.heads, mod=mod,
                         eps=self.eps, return_all=True)
        logits = self.head(self.norm(states if return_all else states[-1]))
        return logits

    def supervision_weights(self, n: int) -> torch.Tensor:
        w = torch.ones(n) if self.supervision == "uniform" else torch.arange(1, n + 1, dtype=torch.float32)
        return w / w.sum()

    def loss(self, x: torch.Tensor, prompt: torch.Tensor, generator: torch.Generator | None = None,
             t_min: float = 1e-3) -> torch.Tensor:
        """MDLM loss with deep supervision: sum_k w_k E_t[(1/t) sum_masked -log p(x | z_t)] / n_answer.

        x: [B, T] clean tokens; prompt: bool [B, T], True where a token is given (never masked, no loss).
        t ~ U(t_min, 1) per sample; each answer token is masked with probability t.
        """
        B = x.shape[0]
        # no generator=None argument: fake tensors refuse it under dynamic shapes (torch.compile)
        draw = dict(device=x.device) if generator is None else dict(device=x.device, generator=generator)
        t = torch.rand(B, **draw) * (1 - t_min) + t_min
        masked = (torch.rand(x.shape, **draw) < t[:, None]) & ~prompt
        z = torch.where(masked, torch.full_like(x, self.mask_id), x)
        logits = self(z, t, return_all=True)  # [L, B, T, V]
        nll = F.cross_entropy(logits.flatten(0, 2).float(), x.repeat(logits.shape[0], 1).flatten(),
                              reduction="none").view(logits.shape[:3])
        per_sample = (nll * masked).sum(-1) / t / (~prompt).sum(-1).clamp(min=1)  # [L, B]
        w = self.supervision_weights(logits.shape[0]).to(per_sample)
        return (w @ per_sample).mean()
