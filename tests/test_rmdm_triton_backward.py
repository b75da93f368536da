"""R-MDM's Triton backward (rmdm/triton_backward.py), called directly in the interpreter: against autograd through the
float64 plain blocks at shapes that split into several row, column, query, key and LayerNorm-partial tiles (T odd,
d not a power of two, two heads, K=2, L=2, B=1 and B=3, with and without adaLN); bit-identical on a rerun; its
launches, programs, FLOPs and loaded and stored bytes equal to bench/rmdm_model.backward_launches; the default on
CUDA tensors. The generic backward test (test_rmdm_recurse.py) runs it through diffkern.backend("triton") at the
small shapes there."""
import pytest
import torch

from diffkern import _registry
from diffkern.bench import rmdm_model
from diffkern.rmdm import reference, triton_backward, triton_kernels
from diffkern.testing.numerics import assert_close_to_oracle
from diffkern.testing.triton_monitor import TritonMonitor
from test_rmdm_recurse import EPS, ids, leaves_of, make, plain_oracle

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests (CPU tensors)")

# (B, T, d, f, heads, K, n_iter), dtype, adaLN: T = 81 over three 32-key tiles (six 16-key tiles in fp32) and two
# 64-row LayerNorm tiles, the second partial (d = 40 pads to 64 columns); the products' rows (B T = 81) over two
# 64-row tiles in fp32, the second partial, and one partial 128-row tile in float16; f = 136 over two 128-column
# product tiles (dz's columns, dW_2's depth: its second column tile adds no bias gradient) and two or three row tiles
# (dW_1's rows: two of 128 in float16, the second partial, three of 64 in fp32); B = 3 with T = 9 (one partial
# LayerNorm tile per sample); float16 (bfloat16 converts by truncation under the interpreter:
# test_rmdm_recurse._interpreted_dtype).
CASES = (((1, 81, 40, 136, 2, 2, 2), torch.float32, True), ((1, 81, 40, 136, 2, 2, 2), torch.float16, False),
         ((3, 9, 24, 40, 2, 2, 2), torch.float32, False), ((3, 9, 24, 40, 2, 2, 2), torch.float16, True))

@pytest.mark.parametrize("shape,dtype,with_mod", CASES, ids=lambda c: ids(c) if isinstance(c, tuple) else str(c))
def test_matches_the_float64_backward_bit_identically_on_a_rerun(shape, dtype, with_mod):
    B, T, d, f, heads, K, n_iter = shape
    blocks, x, mod = make(shape, dtype, with_mod)
    weights = [w for b in blocks for w in b]
    dstates = torch.randn((n_iter, *x.shape), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    states = triton_kernels.recurse_tiled(x, weights, mod, n_iter, heads, EPS)
    runs = []
    for _ in range(2):
        with TritonMonitor(check_bounds=True) as mon:
            dx, dw, dmod = triton_backward.recurse_bwd(dstates.to(dtype), x, states, weights, mod, heads, EPS)
        runs.append([dx, *dw, *([dmod] if with_mod else [])])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert dmod.numel() == (mod.numel() if with_mod else 0)
    model = rmdm_model.backward_launches(B, T, d, f, heads, K, n_iter, dtype, with_mod)
    counted = ("kernel", "programs", "flops", "bytes_loaded", "bytes_stored")
    assert [tuple(getattr(r, k) for k in counted) for r in mon.launches] == [tuple(r[k] for k in counted)
                                                                               for r in model]
    leaves = [t.requires_grad_() for t in leaves_of(x, blocks, mod)]
    oracle, spreads = plain_oracle(shape, x, blocks, mod, dstates)
    low = torch.autograd.grad(reference.recurse(x, leaves[1:len(leaves) - with_mod], mod, n_iter, heads, EPS),
                              leaves, dstates.to(dtype))
    for i, (g, o, p, spread) in enumerate(zip(runs[0], oracle, low, spreads)):
        assert g.dtype == dtype
        assert_close_to_oracle(g, o, p, f"grad of leaf {i}", spread)


def test_it_is_the_default_on_cuda_and_the_aten_backward_stays_forceable():
    for op in ("rmdm_recurse_bwd", "rmdm_recurse_keep_bwd"):
        assert _registry.gpu_backend(op) == "triton"
        assert {"triton", "cuda"} <= set(_registry.available(op))


def test_refuses_what_it_does_not_run_naming_it():
    blocks, x, _ = make((1, 3, 4, 6, 2, 1, 1), torch.float64, False)
    weights = [w for b in blocks for w in b]
    states = x[None].clone()
    with pytest.raises(ValueError, match="float64"):
        triton_backward.recurse_bwd(states, x, states, weights, None, 2, EPS)
    x = torch.zeros(1, triton_kernels.MAX_T + 1, 4)
    with pytest.raises(ValueError, match=f"T <= {triton_kernels.MAX_T}"):
        triton_backward.recurse_bwd(x[None], x, x[None], [w.float() for w in weights], None, 2, EPS)
    # The products' int32 offsets within a tile: f up to 2**24 - 2 with fp32's 128-row tiles, 2**23 - 2 with the
    # forward's 256-column 16-bit ones (W_1 [f, d] an expanded view: no memory).
    triton_backward.check_tile_strides(torch.float32, 2 ** 24 - 2)
    triton_backward.check_tile_strides(torch.float16, 2 ** 23 - 2)
    with pytest.raises(ValueError, match="f=8388607"):
        triton_backward.check_tile_strides(torch.float16, 2 ** 23 - 1)
    wide = [w.float() for w in weights]
    wide[8] = wide[8][:1].expand(2 ** 24 - 1, -1)
    x = states[0].float()
    with pytest.raises(ValueError, match="f=16777215"):
        triton_backward.recurse_bwd(x[None], x, x[None], wide, None, 2, EPS)
