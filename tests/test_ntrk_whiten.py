"""diffkern.whiten: fresh noise passes unchanged; structured gradients come out passing the Gaussianity check."""
import pytest
import torch

import diffkern
from diffkern.ntrk.diagnostics import gaussianity, looks_gaussian
from diffkern.testing.backends import backends_under_test, device_for, forced

SHAPE = (2, 16, 64, 64)


def smooth_field(seed=0):
    """A low-frequency pattern shared by all channels, plus 1% noise: about as structured as it gets."""
    g = torch.Generator().manual_seed(seed)
    s = torch.linspace(0, 1, 64)
    field = torch.sin(6 * s)[:, None] * torch.cos(4 * s)[None, :]
    return field.expand(SHAPE).contiguous() + 0.01 * torch.randn(SHAPE, generator=g)


def heavy_tailed(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).pow(3)


def test_fresh_noise_passes_almost_unchanged():
    n = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    w = diffkern.whiten(n)
    assert (torch.nn.functional.cosine_similarity(w.flatten(1), n.flatten(1)) >= 0.9999).all()
    assert looks_gaussian(n[0]) and looks_gaussian(w[0])


@pytest.mark.parametrize("make", (smooth_field, heavy_tailed), ids=("smooth", "heavy_tailed"))
def test_structured_gradient_passes_the_check_fresh_noise_passes(make):
    """The bar: the whitened gradient's moments and KS distance are those of N(0, 1) (the inputs fail)."""
    g = make()
    w = diffkern.whiten(g)
    for i in range(SHAPE[0]):
        assert not looks_gaussian(g[i])
        assert looks_gaussian(w[i]), gaussianity(w[i])
    cos = torch.nn.functional.cosine_similarity(w.flatten(1), g.flatten(1))
    assert (cos > 0.05).all()  # it still points along the gradient


def test_fourier_domain_removes_the_correlation_the_value_domain_keeps():
    g = smooth_field()
    assert gaussianity(diffkern.whiten(g, domains=("value",))[0])["lag1"] > 0.9
    assert abs(gaussianity(diffkern.whiten(g)[0])["lag1"]) < 0.05


def test_whitening_is_bit_identical_on_every_projection_backend():
    """The projection's outputs are its inputs or band edges (no arithmetic), and the rest of whiten is the
    same PyTorch code: no tolerance is needed. Two samples of 8 tiles of 8: the projections of the entries, of
    the tile means and of the tile energies each clip some of their values."""
    g = heavy_tailed()[:, :1, :8, :8].contiguous()
    outs = []
    for backend in backends_under_test("twoos_project"):
        with forced(backend):
            outs.append(diffkern.whiten(g.to(device_for(backend)), tile=8).cpu())
    assert all(torch.equal(outs[0], out) for out in outs[1:])


def test_constant_gradient_gives_no_guidance_and_shape_dtype_are_kept():
    g = torch.full((3, 4, 6), 2.0, dtype=torch.bfloat16)
    g[1] = torch.randn(4, 6)
    w = diffkern.whiten(g)
    assert w.shape == g.shape and w.dtype == g.dtype
    assert (w[0] == 0).all() and (w[2] == 0).all() and (w[1] != 0).any()


@pytest.mark.parametrize("kw,match", [
    (dict(domains=("value", "wavelet")), "unknown domain"),
    (dict(tile=5), "tile must divide"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        diffkern.whiten(torch.randn(2, 24), **kw)
