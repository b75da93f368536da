"""The CUDA kernels move the bytes their sources say: every latent read once, every output written once.

The harness counts the distinct global bytes each launch touches (csrc/harness/traffic.h). For each
op of the cuda backend the count must equal its traffic model exactly: the latents, plus the [B]
per-sample scalars and the [B, tiles] float32 partial sums (written once, read once). The Triton
kernels' count for the same call (active lanes x element size, diffkern.testing.triton_monitor) is
printed beside it (pytest -s); the benchmark report compares the two on its cases.
"""
import math

import pytest
import torch

from diffkern.grpo import reference
from diffkern.testing import cuda_harness
from diffkern.testing.backends import backends_under_test, forced

pytestmark = pytest.mark.skipif(not cuda_harness.loaded(), reason="the cuda backend runs on a GPU here")

SHAPE = (3, 4099)  # odd D: a scalar head and tail per row, 3 tiles of 2048 per sample
TILE = 2048
WAN = reference.STD_RULES["wan"], reference.WAN_STD_COEF


def latents(n, dtype, offset):
    """n [B, D] latents starting `offset` elements into their storage (0: 16-byte aligned)."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        buf = torch.randn(math.prod(SHAPE) + offset, generator=g).to(dtype)
        out.append(buf[offset:].view(SHAPE))
    return out


def sigmas():
    steps = torch.arange(SHAPE[0]) % 10
    s = reference.flow_sigmas()
    return s[steps].float(), s[steps + 1].float()


def counted(name, *args):
    """The harness count of diffkern::<name>'s cuda backend for one call; prints the Triton count beside it."""
    op = getattr(torch.ops.diffkern, name)
    with forced("cuda"), cuda_harness.traffic() as t:
        op(*args)
    triton = None
    if "triton" in backends_under_test(name):
        from diffkern.testing.triton_monitor import TritonMonitor
        with forced("triton"), TritonMonitor(check_bounds=False) as mon:
            op(*args)
        triton = mon.bytes_loaded + mon.bytes_stored
    print(f"{name}: cuda {t.bytes} B in {t.launches} launches, triton {triton} B")
    return t


CASES = [(torch.bfloat16, 0), (torch.float32, 0), (torch.float16, 3)]


@pytest.mark.parametrize("dtype,offset", CASES)
def test_sde_step_traffic(dtype, offset):
    B, D = SHAPE
    s, N, T = dtype.itemsize, B * D, math.ceil(D / TILE)
    x, v, eps = latents(3, dtype, offset)
    t = counted("flow_sde_step", x, v, *sigmas(), eps, *WAN)
    # reads x, v, eps, writes x_next, y; each launch reads sigma, sigma_next; partials out and back;
    # log_prob and inv_lambda written
    assert (t.bytes, t.launches) == (5 * N * s + 2 * 8 * B + 2 * 4 * B * T + 8 * B, 2)


@pytest.mark.parametrize("form", ("pair", "residual"))
@pytest.mark.parametrize("variant", ("plain", "cfg+ref"))
@pytest.mark.parametrize("dtype,offset", CASES)
def test_log_prob_traffic(dtype, offset, variant, form):
    B, D = SHAPE
    s, N, T = dtype.itemsize, B * D, math.ceil(D / TILE)
    v, x, target, v_ref, v_uncond = latents(5, dtype, offset)
    cfg, ref = "cfg" in variant, "ref" in variant
    x = x if form == "pair" else None
    args = (v, x, target, *sigmas(), v_ref if ref else None, v_uncond if cfg else None, 4.5, *WAN)
    n_in = 2 + (x is not None) + cfg + ref
    fwd = counted("grpo_log_prob", *args)
    # latents once; 2 partial sums per tile out and back; sigmas in both launches; 3 outputs of [B]
    assert (fwd.bytes, fwd.launches) == (n_in * N * s + 2 * 2 * 4 * B * T + 2 * 8 * B + 12 * B, 2)
    bwd = counted("grpo_log_prob_bwd", torch.ones(B), torch.ones(B), *args)  # distinct buffers
    # latents once, each gradient written once; sigmas and dlog_prob (+ dkl with a reference)
    assert (bwd.bytes, bwd.launches) == ((n_in + 1 + cfg) * N * s + 8 * B + 4 * B + 4 * B * ref, 1)


@pytest.mark.parametrize("with_eps", (False, True))
@pytest.mark.parametrize("dtype,offset", CASES)
def test_ntrk_step_traffic(dtype, offset, with_eps):
    B, D = SHAPE
    s, N = dtype.itemsize, B * D
    mu, w, eps = latents(3, dtype, offset)
    sigma, rho = torch.rand(B) + 0.1, torch.rand(B)
    t = counted("ntrk_step", mu, sigma, w, rho, eps if with_eps else None, None if with_eps else torch.tensor([7, 0]))
    # reads mu, w (+ eps), writes x; sigma and rho; the (seed, offset) pair when drawing
    assert (t.bytes, t.launches) == ((3 + with_eps) * N * s + 8 * B + 16 * (not with_eps), 1)
