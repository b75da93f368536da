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
from test_dar_route import Q_VARIANTS, check_backward_op, make_inputs, randn_like

pytestmark = pytest.mark.skipif("cuda" not in backends_under_test("dar_route_bwd"),
                                reason="needs the CUDA kernels (a CUDA build on a GPU, or the host harness)")

SHAPES = ((300, 2, 130, 2), (2, 40, 130, 3))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", Q_VARIANTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_many_partials_match_float64_formulas(dtype, variant, shape):
    check_backward_op("cuda", *make_inputs(*shape, dtype, variant, device=device_for("cuda")))


@pytest.mark.parametrize("variant", Q_VARIANTS)
def test_many_partials_give_the_same_bits_every_run(variant):
    """Two backward runs (the harness shuffles the block order at every launch) give identical dq and dgain."""
    sources, q, gain = make_inputs(*SHAPES[0], torch.float32, variant, device=device_for("cuda"))
    sources, q, gain = [x.detach() for x in sources], q.detach(), gain.detach()
    dh = randn_like(sources[0])
    with forced("cuda"):
        h, lse = torch.ops.diffkern.dar_route_fwd(sources, q, gain, 1e-6)
        runs = [torch.ops.diffkern.dar_route_bwd(dh, sources, q, gain, h, lse, 1e-6)[1:] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
