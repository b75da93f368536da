"""The catalogue gpu_check runs: every public op at real model shapes and at awkward ones.

Real shapes: DiT-XL/2 DAR routing (B*T = 2*256 tokens, d = 1152; 18 sources for the chunked scheme S=4,
57 for the full one), Wan2.1 480p latents (16x21x60x104 per sample) for Flow-GRPO and NoiseTilt, FLUX
latents (16x128x128) for the 2OS projection and whitening, SD3 attention at 1024^2 (N = 4096 image +
154 text tokens, 24 heads, head_dim 64) for the sink ops, the Sudoku R-MDM (B=64 boards of 81 cells,
d=256, 8 heads, K=2 blocks, L=4). Awkward shapes: one row / one element (M=1, D=1), odd sizes, inputs
whose storage starts one element into a buffer (misaligned) and strided views where the op takes them.
`catalogue(tiny=True)` gives the same cases at sizes the CPU dry run (Triton interpreter) affords.

A case builds its own seeded inputs, so every backend, dtype and repetition sees the same values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

import diffkern
from ..bench.dar import ROUTE
from ..bench.workload import Case as BenchCase
from ..dar import dar_gather
from ..grpo import reference as grpo_reference
from ..rmdm.reference import param_shapes

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
WAN, FLUX = (16, 21, 60, 104), (16, 128, 128)


@dataclass(frozen=True)
class OpCase:
    """One op at one shape.

    make(dtype, device, grad, seed=0) -> the positional arguments of `call` (drawn from `seed`; with grad,
        the inputs the backward differentiates require grad); call(*args) -> a tensor or a tuple of tensors.
    kernel / bwd_kernel: the registered ops (diffkern._registry) whose backends run the forward and the
        backward (bwd_kernel None: the backward is the forward's ops under autograd, or there is none).
    n: the error model's fan-in of one output, or one per argument (diffkern.testing.numerics).
    differentiable: whether a backward row runs; deterministic: whether the op's docstring or kernels
        promise the same bits on every run (fixed-order reductions, no atomics).
    """
    op: str
    shape: str
    kernel: str
    make: Callable
    call: Callable
    n: int | tuple
    differentiable: bool = False
    bwd_kernel: str | None = None
    deterministic: bool = True
    real: bool = False
    dtypes: tuple = DTYPES

    @property
    def name(self) -> str:
        return f"{self.op} {self.shape}"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g, shape, dtype, device, scale=1.0, shift=0.0, offset=0) -> torch.Tensor:
    """A seeded normal tensor; offset > 0 places it `offset` elements into its storage (contiguous but
    misaligned: a bf16 row then starts 2 bytes off every vector boundary)."""
    x = (torch.randn(shape, generator=g) * scale + shift).to(dtype)
    buf = torch.empty(x.numel() + offset, dtype=dtype, device=device)
    out = buf[offset:].view(shape)
    out.copy_(x)
    return out


def _grad(tensors, grad: bool):
    for t in tensors:
        t.requires_grad_(grad)
    return tensors


# ---- DAR
def _route_make(B, T, d, n, layout="plain"):
    def make(dtype, device, grad, seed=0):
        g = _gen(seed)
        if layout == "real" and seed == 0:
            sources, q, gain = ROUTE.make_args(BenchCase("", dict(n=n, B=B, T=T, d=d, q="[B,d]"), B * T), dtype, device)
        else:
            off = 1 if layout == "misaligned" else 0
            sources = [randn(g, (B, T, d), dtype, device, 0.5 + i % 3, offset=off) for i in range(n)]
            if layout == "strided":  # token-major storage seen as [B, T, d], and a slice of a wider buffer
                sources[0] = randn(g, (T, B, d), dtype, device).transpose(0, 1)
                sources[-1] = randn(g, (B, T, 2 * d + 1), dtype, device)[..., 1:d + 1]
            q, gain = randn(g, (B, d), dtype, device, 2.0), randn(g, (d,), dtype, device, 0.2, 1.0)
        return [_grad(list(sources), grad), *_grad([q, gain], grad)]
    return make


def _gather_make(B, T, d, n, n_add, offset=0):
    route = _route_make(B, T, d, n, "misaligned" if offset else "plain")

    def make(dtype, device, grad, seed=0):
        sources, q, gain = route(dtype, device, grad, seed)
        g = _gen(seed + 1)
        addends = _grad([randn(g, (B, T, d), dtype, device, offset=offset) for _ in range(n_add)], grad)
        return [sources, addends, q, gain]
    return make


def _dar(tiny: bool) -> list[OpCase]:
    xl = dict(B=1, T=8, d=40) if tiny else dict(B=2, T=256, d=1152)
    n_tok = xl["B"] * xl["T"] * xl["d"]
    cases = []
    for n, label in ((18, "dit-xl S=4"), (57, "dit-xl full")):
        n = min(n, 5) if tiny else n
        cases.append(OpCase("dar_route", f"{label} n={n} B={xl['B']} T={xl['T']} d={xl['d']}", "dar_route_fwd",
                            _route_make(**xl, n=n, layout="real"), diffkern.dar_route, n * n_tok,
                            True, "dar_route_bwd", real=True))
    for shape, (B, T, d, n), layout in (("M=1 D=1", (1, 1, 1, 1), "plain"), ("odd", (2, 5, 130, 3), "plain"),
                                        ("misaligned", (2, 3, 40, 2), "misaligned"),
                                        ("strided", (2, 3, 40, 3), "strided")):
        cases.append(OpCase("dar_route", shape, "dar_route_fwd", _route_make(B, T, d, n, layout),
                            diffkern.dar_route, n * B * T * d, True, "dar_route_bwd"))
    n_src = 4 if tiny else 15
    cases.append(OpCase("dar_gather", f"dit-xl n={n_src}+3", "dar_gather_fwd", _gather_make(**xl, n=n_src, n_add=3),
                        dar_gather, (n_src + 3) * n_tok, True, "dar_gather_bwd", real=True))
    cases.append(OpCase("dar_gather", "odd misaligned", "dar_gather_fwd", _gather_make(2, 5, 33, 2, 2, offset=1),
                        dar_gather, 4 * 2 * 5 * 33, True, "dar_gather_bwd"))
    return cases


# ---- Flow-GRPO
def _step_inputs(g, B, latent, dtype, device, offset=0):
    sigmas = grpo_reference.flow_sigmas()
    steps = torch.arange(B) % 10
    sigma, sigma_next = sigmas[steps].float().to(device), sigmas[steps + 1].float().to(device)
    x, v, eps = (randn(g, (B, *latent), dtype, device, offset=offset) for _ in range(3))
    return x, v, sigma, sigma_next, eps


def _sde_make(B, latent, offset=0):
    def make(dtype, device, grad, seed=0):
        return list(_step_inputs(_gen(seed), B, latent, dtype, device, offset))
    return make


def _sde_call(x, v, sigma, sigma_next, eps):
    """(x_next, y, inv_lambda): log_prob is of y as stored (rounded to x's dtype; the op's contract), which
    the float64 oracle does not model; the grpo_iso_loss cases check the same log-prob math."""
    x_next, y, _, inv_lambda = diffkern.flow_sde_step(x, v, sigma, sigma_next, eps)
    return x_next, y, inv_lambda


def _loss_make(B, latent, form, offset=0):
    def make(dtype, device, grad, seed=0):
        g = _gen(seed)
        x, v, sigma, sigma_next, eps = _step_inputs(g, B, latent, dtype, device, offset)
        x_next, y, log_prob, _ = grpo_reference.flow_sde_step(x, v, sigma, sigma_next, eps, 0,
                                                              grpo_reference.WAN_STD_COEF)
        v_new = (v.float() + 0.05 * randn(g, v.shape, torch.float32, device)).to(dtype)
        v_new = randn(g, v.shape, dtype, device, offset=offset).copy_(v_new).requires_grad_(grad)
        advantages = torch.linspace(-1.0, 1.0, B, device=device)
        stored = [None, None, y.detach()] if form == "y" else [x, x_next.detach(), None]
        return [v_new, *stored, sigma, sigma_next, (log_prob - 1e-3).detach(), advantages]
    return make


def _loss_call(v, x, x_next, y, sigma, sigma_next, log_prob_old, advantages):
    loss, stats = diffkern.grpo_iso_loss(v, x, x_next, sigma, sigma_next, log_prob_old, advantages, y=y)
    return loss, stats["approx_kl"].detach()  # the backward differentiates the loss


def _latent_fan_in(numel: int, latents: str) -> tuple:
    """Per argument ("L" a latent, "-" anything else): a latent's fan-in is the whole batch's size (log p
    sums a sample, the loss the batch); per-sample tensors are read exactly into scalars of their sample,
    so they are not perturbed (None), as in tests/test_grpo.py."""
    return tuple(numel if c == "L" else None for c in latents)


def _grpo(tiny: bool) -> list[OpCase]:
    B, latent = (2, (4, 3, 5, 7)) if tiny else (4, WAN)
    cases = []
    for shape, (b, lat, off) in ((f"wan B={B}", (B, latent, 0)), ("B=1 D=1", (1, (1,), 0)),
                                 ("odd misaligned", (3, (7, 13), 1))):
        sde = _sde_make(b, lat, off)
        cases.append(OpCase("flow_sde_step", shape, "flow_sde_step", sde, _sde_call,
                            _latent_fan_in(b * math.prod(lat), "LL--L"),
                            real=shape.startswith("wan")))
        for form in ("y", "pair"):
            loss = _loss_make(b, lat, form, off)
            cases.append(OpCase("grpo_iso_loss", f"{form} {shape}", "grpo_log_prob", loss, _loss_call,
                                _latent_fan_in(b * math.prod(lat), "LLLL----"), True, "grpo_log_prob_bwd",
                                real=shape.startswith("wan")))
    return cases


# ---- NoiseTilt
def _ntrk_make(B, latent, offset=0):
    def make(dtype, device, grad, seed=0):
        g = _gen(seed)
        mu, w, eps = (randn(g, (B, *latent), dtype, device, offset=offset) for _ in range(3))
        sigma = torch.full((B,), 0.3, device=device)
        rho = torch.linspace(0.2, 0.8, B, device=device)
        return [*_grad([mu], grad), sigma, *_grad([w], grad), rho, *_grad([eps], grad)]
    return make


def _project_make(B, N, offset=0, scale=1.0, shift=0.0):
    def make(dtype, device, grad, seed=0):
        return [randn(_gen(seed), (B, N), dtype, device, scale, shift, offset=offset)]
    return make


def _project_call(tile):
    return lambda x: diffkern.twoos_project(x, tile=tile)


def _ntrk(tiny: bool) -> list[OpCase]:
    flux_n = 64 if tiny else math.prod(FLUX)
    wan = (3, 4, 5) if tiny else WAN
    ntrk_fan_in = (0, None, 0, None, 0)  # mu, w, eps elementwise; the per-sample sigma, rho not perturbed
    cases = [OpCase("ntrk_step", shape, "ntrk_step", _ntrk_make(B, lat, off), diffkern.ntrk_step, ntrk_fan_in, True,
                    real=real)
             for shape, (B, lat, off), real in (("wan B=1", (1, wan, 0), True), ("B=1 D=1", (1, (1,), 0), False),
                                                ("odd misaligned", (3, (5, 7), 1), False))]
    tile = 8 if tiny else 256
    for shape, (B, N, t, off), real in ((f"flux N={flux_n} tile={tile}", (2, flux_n, tile, 0), True),
                                        ("M=1", (2, 24, 24, 0), False), ("D=1", (1, 7, 1, 0), False),
                                        ("odd misaligned", (3, 15 * 11, 15, 1), False)):
        # scaled by 2 so that the projection moves entries (a typical draw would be left as it is)
        cases.append(OpCase("twoos_project", shape, "twoos_project", _project_make(B, N, off, 2.0), _project_call(t),
                            0, real=real))
    cases.append(OpCase("whiten", f"flux N={flux_n}", "twoos_project", _project_make(2, flux_n, 0, 1.0, 0.5),
                        diffkern.whiten, flux_n, real=True))
    return cases


# ---- R-MDM
def _recurse_make(B, T, d, f, K, offset=0):
    def make(dtype, device, grad, seed=0):
        g = _gen(seed)
        blocks = [_grad([randn(g, s, dtype, device, 1 / math.sqrt(s[-1]) if len(s) > 1 else 0.1,
                               1.0 if i in (0, 6) else 0.0) for i, s in enumerate(param_shapes(d, f))], grad)
                  for _ in range(K)]
        x = randn(g, (B, T, d), dtype, device, offset=offset).requires_grad_(grad)
        return [blocks, x]
    return make


def _recurse_call(L, heads):
    return lambda blocks, x: diffkern.recurse(blocks, x, L, heads=heads)


def _rmdm(tiny: bool) -> list[OpCase]:
    real = dict(B=2, T=9, d=16, f=64, K=2) if tiny else dict(B=64, T=81, d=256, f=1024, K=2)
    heads = 2 if tiny else 8
    cases = []
    for shape, p, h, L, is_real in ((f"sudoku B={real['B']} T={real['T']} d={real['d']} K=2 L=4", real, heads, 4, True),
                                    ("T=1", dict(B=1, T=1, d=8, f=16, K=1), 2, 2, False),
                                    ("odd misaligned", dict(B=3, T=7, d=24, f=40, K=1), 3, 2, False)):
        fan_in = 5 * p["d"] + p["T"] + p["f"]  # tests/test_rmdm_recurse.py: one block's chain of reductions
        cases.append(OpCase("recurse", shape, "rmdm_recurse", _recurse_make(**p, offset=int(shape.startswith("odd"))),
                            _recurse_call(L, h), fan_in, True, "rmdm_recurse_bwd", real=is_real,
                            dtypes=(torch.bfloat16, torch.float32)))
    return cases


# ---- attention sinks
def _qkv_make(B, H, N, d, n_txt, layout="plain", sink=0.0):
    """q, k, v [B, H, N, d]; with sink > 0, the keys are halved and key 0 gets `sink` times a direction
    every query shares, so it draws a clear top mass in every head (at SD3's N and seed 0, sink = 0.5:
    >= 4.5x the second key's, under 30% of any row; sink = 1.1: the paper's dominant sink, holding from a
    small to most of a row's mass, so rows land on both sides of the suppression's recompute thresholds)."""
    def make(dtype, device, grad, seed=0):
        g = _gen(seed)
        u = torch.randn(d, generator=g) if sink else torch.zeros(d)
        q, k, v = (torch.randn(B, H, N, d, generator=g) for _ in range(3))
        q = q + u
        if sink:
            k = 0.5 * k
            k[:, :, 0] += sink * u
        out = []
        for t in (q, k, v):
            if layout == "strided":  # diffusers' [B, N, H, d] projection output seen as [B, H, N, d]
                out.append(t.transpose(1, 2).contiguous().to(device, dtype).transpose(1, 2))
            else:
                out.append(randn(g, t.shape, dtype, device, offset=int(layout == "misaligned")).copy_(t.to(dtype)))
        return out
    return make


def _first_and_last(q, k):
    """idx [B, H, K]: the first and the last key of every head (one key where N_k = 1)."""
    keys = torch.tensor(sorted({0, k.shape[2] - 1}), device=q.device)
    return keys.expand(q.shape[0], q.shape[1], len(keys)).contiguous()


def _sinks(tiny: bool) -> list[OpCase]:
    sd3 = dict(B=1, H=2, N=70, d=32, n_txt=6) if tiny else dict(B=1, H=24, N=4096 + 154, d=64, n_txt=154)
    cases = []
    name = f"sd3 N={sd3['N']} H={sd3['H']} d={sd3['d']}"
    for shape, p, layout, real, sink in ((name, sd3, "plain", True, 0.0 if tiny else 0.5),
                                         (f"{name} dominant sink", sd3, "plain", True, 1.1),
                                         ("N=1", dict(B=1, H=1, N=1, d=16, n_txt=0), "plain", False, 0.0),
                                         ("odd strided", dict(B=2, H=3, N=37, d=40, n_txt=5), "strided", False, 0.0),
                                         ("misaligned", dict(B=1, H=2, N=20, d=64, n_txt=4), "misaligned", False,
                                          0.0)):
        n_img = p["N"] - p["n_txt"]
        fan_in = p["d"] + 2 * p["N"]  # tests/test_sinks.py: head_dim + N_k + N_q
        make = _qkv_make(**p, layout=layout, sink=sink)
        cases.append(OpCase("sink_mass", shape, "sink_mass", make,
                            lambda q, k, v, n=n_img: diffkern.sink_mass(q, k, n_query=n), fan_in, real=real))
        cases.append(OpCase("sink_attention", shape, "sink_attention_fwd", make,
                            lambda q, k, v, n=n_img: diffkern.sink_attention(q, k, v, k_sink=1, n_query=n),
                            fan_in, real=real))
        # the fused forward's five outputs with each row's top-5 probabilities (the statistics' pass)
        cases.append(OpCase("sink_attention", f"{shape} row_top=5", "sink_attention_fwd", make,
                            lambda q, k, v, n=n_img: torch.ops.diffkern.sink_attention_fwd(
                                q, k, v, n, q.shape[-1] ** -0.5, 5), fan_in, real=real))
        # keys known before the call (the first and the last key of every head): one biased flash forward
        cases.append(OpCase("sink_attention_given", shape, "sink_attention_given", make,
                            lambda q, k, v, n=n_img: diffkern.sink_attention_given(q, k, v, _first_and_last(q, k),
                                                                                   n_query=n), fan_in, real=real))
        # the control and the ablations' interventions (value path, amplification), each through the fused path
        for label, kw in (("anti_sink", dict(mode="anti_sink")), ("value", dict(intervention="value")),
                          ("scale alpha=3", dict(mode="head_union", intervention="scale", alpha=3.0))):
            cases.append(OpCase("sink_attention", f"{shape} {label}", "sink_attention_fwd", make,
                                lambda q, k, v, n=n_img, kw=kw: diffkern.sink_attention(q, k, v, k_sink=1, n_query=n,
                                                                                       **kw), fan_in, real=real))
    return cases


def catalogue(tiny: bool) -> list[OpCase]:
    """Every case, awkward shapes before real ones within each op (cheap first when time runs short)."""
    cases = _dar(tiny) + _grpo(tiny) + _ntrk(tiny) + _rmdm(tiny) + _sinks(tiny)
    return sorted(cases, key=lambda c: c.real)
