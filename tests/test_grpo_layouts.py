"""Flow-GRPO ops on latents no 16-byte vector access may start: every backend against float64.

Contiguous latents can still sit at any element offset of their storage (a slice of a larger buffer).
The CUDA kernels read rows as a scalar head, 16-byte vectors and a scalar tail when every latent has
the same misalignment, and scalars only when they differ; these cases reach each path, with rows
shorter than one vector, with a head and a tail in one row, and with several tiles per sample.
"""
import pytest
import torch

from diffkern.grpo import reference
from diffkern.testing.backends import backends_under_test, device_for, forced, supports

from test_grpo import check_log_prob, check_log_prob_bwd, check_sde_step

BACKENDS = backends_under_test("grpo_log_prob")
SIGMAS = reference.flow_sigmas()
WAN = reference.STD_RULES["wan"], reference.WAN_STD_COEF
# (B, D): rows shorter than a bf16 vector, a head and a tail in one short row, several 2048-element
# tiles per sample with odd D, more tiles than the harness runs blocks (8).
SHAPES = ((3, 3), (2, 9), (5, 4099))
# Element offsets of (x, v, target, eps / v_ref, v_uncond) in their buffers: all alike (vectors after a
# scalar head), or different (scalars only).
OFFSETS = {"same": (1, 1, 1, 1, 1), "mixed": (0, 1, 2, 3, 5)}


def at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of t starting `offset` elements into its storage."""
    buf = torch.full((t.numel() + offset,), float("nan"), dtype=t.dtype, device=t.device)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.storage_offset() == offset
    return view


def latents(shape, dtype, device, offsets, seed=3):
    g = torch.Generator().manual_seed(seed)
    ts = [(torch.randn(shape, generator=g) * s).to(device, dtype) for s in (1.0, 1.5, 1.0, 1.5, 1.5)]
    return [at_offset(t, o) for t, o in zip(ts, offsets)]


def sigmas(B, device):
    steps = torch.arange(B) % 10
    return SIGMAS[steps].float().to(device), SIGMAS[steps + 1].float().to(device)


def params():
    return [(b, dt) for b in BACKENDS for dt in (torch.float32, torch.bfloat16, torch.float16) if supports(b, dt)]


@pytest.mark.parametrize("offsets", OFFSETS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend,dtype", params())
def test_sde_step_on_misaligned_latents(backend, dtype, shape, offsets):
    device = device_for(backend)
    x, v, _, eps, _ = latents(shape, dtype, device, OFFSETS[offsets])
    args = (x, v, *sigmas(shape[0], device), eps, *WAN)
    with forced(backend):
        outs = torch.ops.diffkern.flow_sde_step(*args)
    check_sde_step(args, outs)


@pytest.mark.parametrize("form", ("pair", "residual"))
@pytest.mark.parametrize("offsets", OFFSETS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend,dtype", params())
def test_log_prob_and_backward_on_misaligned_latents(backend, dtype, shape, offsets, form):
    """CFG and a reference velocity, target x_next beside x (pair) or y alone (residual): forward sums
    and the written gradients."""
    device = device_for(backend)
    x, v, target, v_ref, v_uncond = latents(shape, dtype, device, OFFSETS[offsets])
    args = (v, x if form == "pair" else None, target, *sigmas(shape[0], device), v_ref, v_uncond, 4.5, *WAN)
    g = torch.Generator().manual_seed(4)
    dlog_prob, dkl = (torch.randn(shape[0], generator=g).to(device) for _ in range(2))
    with forced(backend):
        outs = torch.ops.diffkern.grpo_log_prob(*args)
        grads = torch.ops.diffkern.grpo_log_prob_bwd(dlog_prob, dkl, *args)
    check_log_prob(args, outs, ("log_prob", "kl", "inv_lambda"))
    check_log_prob_bwd((dlog_prob, dkl, *args), grads)
