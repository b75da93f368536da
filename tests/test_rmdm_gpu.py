"""R-MDM on a CUDA device: both Triton forward kernels against the float64 plain block, and a training step on the
default routing (the Triton forward and backward) against the CPU op."""
import pytest
import torch

import diffkern
from diffkern import _cooperative
from diffkern.rmdm import reference, triton_kernels, triton_persistent
from diffkern.testing.numerics import assert_close_to_oracle
from test_rmdm_recurse import EPS, make, plain_oracle

SHAPE = (2, 81, 64, 256, 4, 2, 3)  # (B, T, d, f, heads, K, n_iter): two Sudoku boards


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("kernel", ("persistent", "tiled"))
def test_each_kernel_matches_the_plain_block_on_cuda(kernel, dtype):
    blocks, x, mod = make(SHAPE, dtype, True, device="cuda")
    weights = [w for b in blocks for w in b]
    B, T, d, f, heads, K, n_iter = SHAPE
    if kernel == "persistent":
        pb = triton_persistent.plan(B * T, d, f, K, dtype.itemsize, _cooperative.max_programs(x.device))
        assert pb is not None
        states = triton_persistent.recurse_persistent(x, weights, mod, n_iter, heads, EPS, pb)
    else:
        states = triton_kernels.recurse_tiled(x, weights, mod, n_iter, heads, EPS)
    with torch.no_grad():
        (oracle,), (spread,) = plain_oracle(SHAPE, x, blocks, mod)
        low = reference.recurse(x, weights, mod, n_iter, heads, EPS)
    assert_close_to_oracle(states.cpu(), oracle, low.cpu(), "states", spread)


@pytest.mark.gpu
def test_training_on_cuda_matches_the_cpu_op():
    """The op's default GPU routing: the Triton forward and backward (the triton backend of rmdm_recurse_bwd)."""
    grads = {}
    for device in ("cpu", "cuda"):
        blocks, x, mod = make(SHAPE, torch.float32, True, device=device)
        leaves = [x, mod, *[w for b in blocks for w in b]]
        for t in leaves:
            t.requires_grad_(True)
        states = diffkern.recurse(blocks, x, SHAPE[6], heads=SHAPE[4], mod=mod, return_all=True)
        grads[device] = [g.cpu() for g in torch.autograd.grad(states.square().sum(), leaves)]
    for a, b in zip(grads["cuda"], grads["cpu"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
