"""The CUDA routing backward's reduce tail (route_reduce_kernel, dar_route.cu): the [B, n_chunks, d] partial
sums added by a fixed-order tree, checked through the cuda backend (the host-execution harness on CPU).

The harness models one SM, so route_bwd_chunks gives each batch row max(1, 4 / B) chunks: many batch rows
make many partials. Shapes: B * n_chunks = 300 (> 256): a static or per-token q's 300 partials in one
16-row tree, a per-batch q's 300 one-chunk segments walked 16 at a time; 2 batch rows of 2 chunks: a
per-batch q's segments each in a 2-row tree, side by side, a static q's 4 partials in a 4-row tree.
d = 130 leaves a block with 2 of its 32 columns in range.
"""
import pytest
import torch

from diffkern.testing.backends import backends_under_test, device_for, forced
from test_dar_route import Q_VARIANTS, check_backward_op, make_inputs

pytestmark = pytest.mark.skipif("cuda" not in backends_under_test("dar_route_bwd"),
                                reason="needs the CUDA kernels (a CUDA build on a GPU, or the host harness)")

SHAPES = ((300, 2, 130, 2), (2, 40, 130, 3))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", Q_VARIANTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_many_partials_match_float64_formulas(dtype, variant, shape):
    """Against the float64 formulas; with 300 partials in float32, a second backward run (the harness shuffles the
    block order at every launch) gives identical dq and dgain."""
    (dh, sources, q, gain, h, lse), grads = check_backward_op(
        "cuda", *make_inputs(*shape, dtype, variant, device=device_for("cuda")))
    if shape == SHAPES[0] and dtype == torch.float32:
        with forced("cuda"):
            again = torch.ops.diffkern.dar_route_bwd(dh, sources, q, gain, h, lse, 1e-6)
        assert all(torch.equal(a, b) for a, b in zip(grads[1:], again[1:]))
