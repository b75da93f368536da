"""diffkern.twoos_bands / twoos_project: exact bands (Monte Carlo), every backend against float64, the bars."""
import pytest
import torch

import diffkern
from diffkern.ntrk import reference, triton_kernels
from diffkern.ntrk.bands import twoos_bands
from diffkern.testing.backends import backends_under_test, device_for, forced, supports
from diffkern.testing.numerics import assert_close_to_oracle, oracle_with_spread

BACKENDS = backends_under_test("twoos_project")
# (B, M, D, column chunk of the Triton kernels): one tile, tiles of one entry, odd M over several chunks
# (the binary-search path), non-power-of-two D, a last chunk of one tile, one chunk of 16 tiles.
GEOMETRIES = ((2, 1, 7, 1024), (3, 9, 1, 4), (2, 19, 3, 8), (1, 17, 6, 16), (1, 16, 16, 1024))


def params():
    """Every backend in float32 and float64 over every geometry; bfloat16 on one (the interpreter is slow)."""
    cases = [(b, dt, geom) for b in BACKENDS for dt in (torch.float32, torch.float64) for geom in GEOMETRIES
             if supports(b, dt)]
    return cases + [(b, torch.bfloat16, GEOMETRIES[2]) for b in BACKENDS]


def order_statistics(x: torch.Tensor, M: int, D: int) -> torch.Tensor:
    """Z [K, M, D] of K draws: sort within tiles, then across tiles."""
    return x.reshape(-1, M, D).sort(2)[0].sort(1)[0]


@pytest.mark.parametrize("dist", ("normal", "chi2"))
def test_each_band_holds_its_entry_with_the_stated_confidence(dist):
    """Monte Carlo, 6000 draws of 8 x 16 entries: each entry's miss rate below lower and above upper is
    alpha/2 within 5 binomial standard errors, for all 128 entries (N(0, 1) or chi2(5) entries)."""
    M, D, alpha, K = 8, 16, 0.1, 6000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(K, M * D, generator=g, dtype=torch.float64)
    if dist == "chi2":
        x = torch.randn(K, M * D, 5, generator=g, dtype=torch.float64).pow(2).sum(2)
    lower, upper = twoos_bands(M, D, alpha, dist, 5.0 if dist == "chi2" else None)
    Z = order_statistics(x, M, D)
    se = (alpha / 2 * (1 - alpha / 2) / K) ** 0.5
    for miss in ((Z < lower).double().mean(0), (Z > upper).double().mean(0)):
        assert (miss - alpha / 2).abs().max().item() < 5 * se
        assert abs(miss.mean().item() - alpha / 2) < 5 * se / (M * D) ** 0.5 * 4  # correlated entries: loose


def test_bands_are_symmetric_ordered_and_cached():
    lower, upper = twoos_bands(33, 12)
    torch.testing.assert_close(upper, -lower.flip(0, 1), rtol=0, atol=1e-12)
    assert (lower < upper).all() and (lower.diff(dim=1) > 0).all() and (lower.diff(dim=0) > 0).all()
    lower[0, 0] = 99.0  # callers get copies
    assert twoos_bands(33, 12)[0][0, 0] != 99.0


def test_one_tile_bands_are_the_order_statistic_quantiles():
    """M = 1: the band of the j-th smallest of D normals, Phi^-1 of Beta(j, D - j + 1)'s quantiles."""
    from scipy import special, stats
    lower, upper = twoos_bands(1, 5, alpha=0.2)
    j = torch.arange(1, 6, dtype=torch.float64)
    expect = special.ndtri(stats.beta.ppf(0.1, j.numpy(), 6 - j.numpy()))
    torch.testing.assert_close(lower[0], torch.from_numpy(expect), rtol=1e-9, atol=1e-9)


def awkward_bands(M, D, seed=1):
    """Tight, off-centre bands, so that clipping happens often and passes are needed."""
    lower, upper = twoos_bands(M, D, alpha=0.5)
    return (lower + 0.2).float(), (upper + 0.2).float()


@pytest.mark.parametrize("passes", (0, 3))
@pytest.mark.parametrize("backend,dtype,geom", params(), ids=str)
def test_projection_matches_float64_reference(backend, dtype, geom, passes, monkeypatch):
    """Ranks are exact (ties by position), so out equals the float64 reference up to the dtype's
    rounding of the band edges and of the output, and in_set equals it exactly."""
    B, M, D, chunk = geom
    monkeypatch.setattr(triton_kernels, "COL_CHUNK", chunk)
    g = torch.Generator().manual_seed(M * D)
    x = (1.3 * torch.randn(B, M * D, generator=g)).to(dtype)
    lower, upper = awkward_bands(M, D)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dev = device_for(backend)
    with forced(backend):
        out, in_set = torch.ops.diffkern.twoos_project(x.to(dev), lower.to(dev, acc), upper.to(dev, acc), passes)
    # every output is an input or a band edge, only rounded to the dtype: no reduction (fan-in 0)
    (ref, ref_in), (spread, _) = oracle_with_spread(lambda *a: reference.twoos_project(*a, passes), [x, lower, upper],
                                                    0, dtype)
    assert out.dtype == dtype and in_set.dtype == acc
    assert_close_to_oracle(out, ref, reference.twoos_project(x, lower, upper, passes)[0], "out", spread)
    assert torch.equal((in_set.cpu().double() * M * D).round(), (ref_in * M * D).round())


@pytest.mark.parametrize("backend", BACKENDS)
def test_converged_projection_is_idempotent_and_in_set(backend, monkeypatch):
    monkeypatch.setattr(triton_kernels, "COL_CHUNK", 4)
    lower, upper = awkward_bands(11, 3)
    x = 1.5 * torch.randn(2, 33, generator=torch.Generator().manual_seed(2))
    dev = device_for(backend)
    with forced(backend):
        once, f1 = torch.ops.diffkern.twoos_project(x.to(dev), lower.to(dev), upper.to(dev), 20)
        twice, f2 = torch.ops.diffkern.twoos_project(once, lower.to(dev), upper.to(dev), 20)
    assert (f1 == 1).all() and (f2 == 1).all()
    assert torch.equal(once, twice)


def test_cpu_ties_rank_by_position_like_the_reference_at_any_thread_count():
    """Entries from five values (+-0 tie, as torch.sort has them) over 2 x 4100 tiles of 16: the C++ kernel's radix
    ranks (stable: ties keep position order) give the reference's out exactly, at 1 thread and at 2 (blocks of
    tiles and columns split across threads)."""
    B, M, D = 2, 4100, 16
    g = torch.Generator().manual_seed(5)
    values = torch.tensor([-1.5, -0.0, 0.0, 0.25, 2.0])
    x = values[torch.randint(0, 5, (B, M * D), generator=g)]
    lower, upper = awkward_bands(M, D)
    ref, ref_in = reference.twoos_project(x.double(), lower.double(), upper.double(), 2)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with forced("cpu"):
                out, in_set = torch.ops.diffkern.twoos_project(x, lower, upper, 2)
            assert torch.equal(out, ref.float()) and torch.equal(in_set.double(), ref_in.float().double())
    finally:
        torch.set_num_threads(threads)


def test_pure_noise_passes_almost_unchanged_at_flux_size():
    """The bar: a N(0, I) draw of a FLUX latent (16 x 128 x 128, tiles of 256) keeps cosine >= 0.9999."""
    x = torch.randn(2, 16, 128, 128, generator=torch.Generator().manual_seed(3))
    out, in_set = diffkern.twoos_project(x)
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), x.flatten(1))
    assert (cos >= 0.9999).all(), cos
    assert (in_set == 1).all()


def test_structured_input_is_strongly_changed_and_ends_in_set():
    x = torch.linspace(-1, 1, 4096).repeat(2, 1) ** 3 * 3
    out, in_set = diffkern.twoos_project(x, tile=64)
    assert (in_set == 1).all()
    assert (out - x).abs().max() > 0.5


def test_projection_is_not_differentiable_and_opchecks():
    lower, upper = awkward_bands(9, 4)
    x = torch.randn(2, 36, requires_grad=True)
    out, in_set = diffkern.twoos_project(x, bands=(lower, upper))
    assert not out.requires_grad and not in_set.requires_grad
    torch.library.opcheck(torch.ops.diffkern.twoos_project.default, (x.detach(), lower, upper, 2))


def test_compiles_fullgraph():
    lower, upper = awkward_bands(9, 4)
    x = torch.randn(2, 36)
    f = torch.compile(lambda x: torch.ops.diffkern.twoos_project(x, lower, upper, 3), fullgraph=True,
                      backend="aot_eager")
    for a, b in zip(f(x), torch.ops.diffkern.twoos_project(x, lower, upper, 3)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("args,match", [
    (lambda x, lo, up: (x[:, :35].contiguous(), lo, up, 1), r"each sample of x has 35 entries"),
    (lambda x, lo, up: (x, lo.double(), up.double(), 1), "lower must be a contiguous tensor of dtype float32"),
    (lambda x, lo, up: (x, lo, up[:, :3], 1), "lower and upper must be"),
    (lambda x, lo, up: (x, lo, up, -1), "max_passes must be >= 0"),
    (lambda x, lo, up: (x.t(), lo, up, 1), "x must be contiguous"),
])
def test_bad_arguments_raise_value_errors_naming_them(backend, args, match):
    lower, upper = awkward_bands(9, 4)
    x = torch.randn(2, 36)
    with forced(backend), pytest.raises(ValueError, match=match):
        torch.ops.diffkern.twoos_project(*args(x, lower, upper))


def test_public_api_checks_the_tile():
    with pytest.raises(ValueError, match="tile must divide"):
        diffkern.twoos_project(torch.randn(2, 30), tile=7)


def test_triton_backend_refuses_tiles_longer_than_one_program_sorts():
    lower, upper = awkward_bands(1, triton_kernels.MAX_TILE + 1)
    with forced("triton"), pytest.raises(ValueError, match="tiles of at most 1024"):
        torch.ops.diffkern.twoos_project(torch.randn(1, lower.numel()), lower, upper, 1)
