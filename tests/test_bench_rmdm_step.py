"""diffkern.bench.rmdm_step: the training step's FLOP formula against PyTorch's FLOP counter."""
import torch
from torch.utils.flop_counter import FlopCounterMode

from diffkern.bench.rmdm_step import step_flops
from diffkern.rmdm import reference


def test_step_flops_match_the_flop_counter_on_the_plain_blocks():
    """Forward and backward of the plain blocks (explicit attention matmuls, which the counter sees): 3x the
    forward's GEMM FLOPs, as the report's efficiency and GFLOP/s assume."""
    B, T, d, f, heads, K, L = 2, 9, 32, 128, 4, 2, 3
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=g).requires_grad_() for _ in range(K) for s in reference.param_shapes(d, f)]
    x = torch.randn(B, T, d, generator=g).requires_grad_()
    with FlopCounterMode(display=False) as counter:
        states = reference.recurse(x, weights, None, L, heads, 1e-5)
        torch.autograd.grad(states[-1].sum(), [x, *weights])
    assert counter.get_total_flops() == step_flops(B, T, d, f, K, L)
