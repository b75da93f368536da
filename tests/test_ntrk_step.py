"""diffkern.ntrk_step: every backend against float64, the in-kernel Philox stream, autograd, opcheck, compile."""
import math
import re

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import diffkern
from diffkern.ntrk import reference
from diffkern.testing.backends import backends_under_test, device_for, forced, supports
from diffkern.testing.numerics import assert_close_to_oracle, oracle_with_spread

BACKENDS = backends_under_test("ntrk_step")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# (B, *latent): one element, odd sizes, just above a Triton tile (1024), a video-like [C, F, H, W]
SHAPES = ((1, 1), (3, 7), (2, 1025), (2, 3, 5, 67))


def params(dtypes=DTYPES):
    return [(b, dt) for b in BACKENDS for dt in dtypes if supports(b, dt)]


def make(shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    mu, w, eps = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
    sigma = (0.2 + torch.rand(shape[0], generator=g)).to(device)
    rho = torch.rand(shape[0], generator=g).to(device)
    return mu, sigma, w, rho, eps


def test_philox_reference_matches_the_random123_known_answers():
    """Philox4x32-10 at counter 0, key 0 (Random123's known-answer vector): the reference the backends'
    in-kernel draws are held to is Philox itself, not just self-consistent."""
    words = reference.philox_randint4x(0, torch.tensor([0]))
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend,dtype", params())
def test_step_with_eps_matches_float64_reference(backend, dtype, shape):
    mu, sigma, w, rho, eps = make(shape, dtype, device_for(backend))
    with forced(backend):
        x = diffkern.ntrk_step(mu, sigma, w, rho, eps=eps)
    args = [t.cpu() for t in (mu, sigma, w, rho, eps)]
    # elementwise: no reduction feeds x (fan-in 0); sigma and rho are read exactly into per-sample scalars
    (oracle,), (spread,) = oracle_with_spread(lambda *a: reference.ntrk_step(*a, None), args, [0, None, 0, None, 0],
                                              dtype)
    plain = reference.ntrk_step(*args, None)
    assert x.dtype == dtype
    assert_close_to_oracle(x, oracle, plain, "x", spread)


@pytest.mark.parametrize("offset", (0, 2**32 - 5))
@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
@pytest.mark.parametrize("backend,dtype", params((torch.float32, torch.float64)))
def test_in_kernel_noise_is_the_philox_stream(backend, dtype, shape, offset):
    """eps = None: every backend draws reference.philox_randn(seed, offset + flat index) (across the 2^32
    boundary of the counter's low word, too); mu = 0, w = 0, sigma = 1, rho = 0 make x = eps itself.

    The Philox words and the uniforms are exact everywhere; the float32 transform (log, sqrt, cos) may
    round differently per backend, so each is held to the float64 Box-Muller of the same uniforms under
    the error model (elementwise, fan-in 0), float32 math for every latent dtype."""
    dev = device_for(backend)
    zeros = torch.zeros(shape, dtype=dtype, device=dev)
    seed = 0x1234_5678_9ABC
    with forced(backend):
        x = diffkern.ntrk_step(zeros, 1.0, zeros, 0.0, seed=seed, offset=offset)
    flat = offset + torch.arange(zeros.numel())
    words = reference.philox_randint4x(seed, flat)
    u1, u2 = torch.clamp_min(reference.philox_uniform(words[0]), 1e-7), reference.philox_uniform(words[1])
    (oracle,), (spread,) = oracle_with_spread(lambda a, b: torch.sqrt(-2 * torch.log(a)) * torch.cos(2 * math.pi * b),
                                              [u1, u2], 0, torch.float32)
    plain = reference.philox_randn(seed, flat)
    assert_close_to_oracle(x.cpu().float().flatten(), oracle, plain, "eps", spread)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_noise_is_reproducible_and_the_generator_draws_the_seed(backend):
    mu, sigma, w, rho, _ = make((2, 300), torch.float32, device_for(backend))
    with forced(backend):
        a = diffkern.ntrk_step(mu, sigma, w, rho, seed=7)
        b = diffkern.ntrk_step(mu, sigma, w, rho, seed=7)
        c = diffkern.ntrk_step(mu, sigma, w, rho, seed=8)
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        d, e = (diffkern.ntrk_step(mu, sigma, w, rho, generator=g) for g in (g1, g2))
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(d, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generated_noise_is_standard_normal(backend):
    zeros = torch.zeros(4, 2500, device=device_for(backend))
    with forced(backend):
        eps = diffkern.ntrk_step(zeros, 1.0, zeros, 0.0, seed=11).cpu()
    assert abs(eps.mean().item()) < 5 / 100 and abs(eps.var().item() - 1) < 5 * (2 / 1e4) ** 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigma_and_rho_broadcast_from_floats_and_zero_dim_tensors(backend):
    mu, _, w, _, eps = make((3, 5), torch.float32, device_for(backend))
    with forced(backend):
        a = diffkern.ntrk_step(mu, 0.7, w, 0.25, eps=eps)
        b = diffkern.ntrk_step(mu, torch.tensor(0.7), w, torch.full((3,), 0.25, dtype=torch.float64), eps=eps)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.cpu(), (mu + 0.7 * (0.5 * w + 0.75 ** 0.5 * eps)).cpu())


def test_an_unrecorded_step_gives_the_recorded_bits_and_still_refuses_a_tangent():
    """With nothing for autograd to record (no_grad, or no input requiring grad) the op runs below autograd directly
    (csrc/diffkern/autograd_ntrk.cpp: a sampler's step skips Function::apply): the same bits as the recorded call,
    and no graph. A forward-mode tangent still raises, as the recorded path does, instead of being dropped."""
    mu, sigma, w, rho, eps = make((3, 70), torch.float32)
    mu.requires_grad_()
    with forced("cpu"):
        recorded = diffkern.ntrk_step(mu, sigma, w, rho, eps=eps)
        with torch.no_grad():
            unrecorded = diffkern.ntrk_step(mu, sigma, w, rho, eps=eps)
        plain = diffkern.ntrk_step(mu.detach(), sigma, w, rho, eps=eps)
        assert recorded.grad_fn is not None and unrecorded.grad_fn is None and plain.grad_fn is None
        assert torch.equal(recorded, unrecorded) and torch.equal(recorded, plain)
        with fwAD.dual_level(), torch.no_grad():
            dual = fwAD.make_dual(mu.detach(), torch.ones_like(mu))
            with pytest.raises(RuntimeError, match="jvp is not implemented"):
                diffkern.ntrk_step(dual, sigma, w, rho, eps=eps)


@pytest.mark.parametrize("backend", ("cpu", "reference"))
@pytest.mark.parametrize("with_eps", (True, False))
def test_gradcheck_float64(backend, with_eps):
    mu, sigma, w, rho, eps = make((2, 3, 5), torch.float64)
    leaves = [mu.requires_grad_(), w.requires_grad_()] + ([eps.requires_grad_()] if with_eps else [])

    def step(*ts):
        return diffkern.ntrk_step(ts[0], sigma, ts[1], rho, eps=ts[2] if with_eps else None, seed=5)
    with forced(backend):
        assert torch.autograd.gradcheck(step, leaves)


def _step_grads(dtype, shape, wrt, create_graph, with_eps=True):
    """The gradients of ntrk_step on CPU for a seeded dx with respect to `wrt` (names among mu, w, eps; the other
    inputs do not require grad), and the inputs (mu, sigma, w, rho, eps, dx)."""
    mu, sigma, w, rho, eps = make(shape, dtype)
    dx = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    inputs = {"mu": mu, "w": w, "eps": eps}
    leaves = [inputs[name].requires_grad_() for name in wrt]
    x = diffkern.ntrk_step(mu, sigma, w, rho, eps=eps if with_eps else None, seed=5)
    return torch.autograd.grad(x, leaves, dx, create_graph=create_graph), (mu, sigma, w, rho, eps, dx)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_backward_matches_float64_reference(dtype, shape):
    """A first-order CPU backward runs the fused kernel diffkern::ntrk_step_bwd (dx read once)."""
    (dw, deps), (mu, sigma, w, rho, eps, dx) = _step_grads(dtype, shape, ("w", "eps"), create_graph=False)

    def grads(mu, sigma, w, rho, eps, dx):
        w, eps = w.detach().requires_grad_(), eps.detach().requires_grad_()
        return torch.autograd.grad(reference.ntrk_step(mu, sigma, w, rho, eps, None), (w, eps), dx)
    # one product per element (fan-in 0); sigma and rho only form the per-sample factor
    oracles, spreads = oracle_with_spread(grads, [mu, sigma, w, rho, eps, dx], [None, None, None, None, None, 0], dtype)
    plain = grads(mu, sigma, w, rho, eps, dx)
    for name, got, oracle, p, spread in zip(("dw", "deps"), (dw, deps), oracles, plain, spreads):
        assert got.dtype == dtype
        assert_close_to_oracle(got, oracle, p, name, spread)


@pytest.mark.parametrize("wrt,with_eps", [(("mu", "w", "eps"), True), (("w",), True), (("eps",), True),
                                          (("mu", "w"), False)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_backward_kernel_equals_the_differentiable_aten_form(dtype, wrt, with_eps):
    """Under create_graph the backward is ATen ops (differentiable again); otherwise the fused kernel, which writes
    only the gradients asked for. Both round the per-sample factor to dx's dtype and multiply once, so their
    gradients are equal bit for bit."""
    fused, _ = _step_grads(dtype, SHAPES[3], wrt, create_graph=False, with_eps=with_eps)
    aten, _ = _step_grads(dtype, SHAPES[3], wrt, create_graph=True, with_eps=with_eps)
    assert len(fused) == len(aten) == len(wrt)
    for f, a in zip(fused, aten):
        assert torch.equal(f, a.detach())


def test_opcheck():
    mu, sigma, w, rho, eps = make((2, 3, 5), torch.float32)
    mu.requires_grad_()
    for e in (eps, None):
        torch.library.opcheck(torch.ops.diffkern.ntrk_step.default, (mu, sigma, w, rho, e, torch.tensor([3, 0])))


def test_compiles_fullgraph_forward_and_backward():
    mu, sigma, w, rho, eps = make((2, 37), torch.float32)
    mu.requires_grad_()

    def f(mu, w, eps):
        return diffkern.ntrk_step(mu, sigma, w, rho, eps=eps).square().sum()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(mu, w, eps), f(mu, w, eps))
    grads = [torch.autograd.grad(fn(mu, w, eps), mu)[0] for fn in (compiled, f)]
    torch.testing.assert_close(*grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,match", [
    (lambda t: dict(w=t["w"][:, :2]), "w has shape"),
    (lambda t: dict(w=t["w"].half()), "w dtype float16 differs"),
    (lambda t: dict(mu=t["mu"].t()), "mu must be contiguous"),
    (lambda t: dict(eps=t["eps"][:, ::2].contiguous()), "eps has shape"),
    (lambda t: dict(sigma=torch.ones(5)), r"sigma must be a float, a 0-dim tensor or a \[B\]"),
    (lambda t: dict(rho=1.5), r"rho must be in \[0, 1\]"),
    (lambda t: dict(mu=t["mu"].long(), w=t["w"].long(), eps=t["eps"].long()), "mu dtype must be"),
])
def test_bad_arguments_raise_value_errors_naming_them(backend, case, match):
    mu, sigma, w, rho, eps = make((4, 4), torch.float32, device_for(backend))
    kw = dict(mu=mu, sigma=sigma, w=w, rho=rho, eps=eps)
    kw.update(case(kw))
    with forced(backend), pytest.raises(ValueError, match=match):
        diffkern.ntrk_step(**kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("philox,match", [
    (None, "ntrk_step: philox (the int64 [2] tensor (seed, offset)) is required when eps is None"),
    (torch.tensor([1, 2], dtype=torch.int32),
     "ntrk_step: philox must be a contiguous int64 [2] tensor (seed, offset), got int32 of shape [2]"),
    (torch.tensor([1, 2, 3]), "ntrk_step: philox must be a contiguous int64 [2] tensor (seed, offset), got int64 of "
                              "shape [3]"),
    (torch.tensor([[1, 2], [3, 4]]).t()[0], "got int64 of shape [2]"),  # strided
])
def test_the_op_checks_its_philox_state(backend, philox, match):
    """The op's (seed, offset) tensor: C++ and Python backends check it in the same words."""
    mu, sigma, w, rho, _ = make((2, 5), torch.float32, device_for(backend))
    state = None if philox is None else philox.to(mu.device)
    with forced(backend), pytest.raises(ValueError, match=re.escape(match)):
        torch.ops.diffkern.ntrk_step(mu, sigma, w, rho, None, state)


def test_offset_must_be_a_non_negative_int():
    mu, sigma, w, rho, _ = make((2, 5), torch.float32)
    for offset, error, match in ((-1, ValueError, "offset must be >= 0"), (1.5, TypeError, "offset must be an int")):
        with pytest.raises(error, match=f"ntrk_step: {match}"):
            diffkern.ntrk_step(mu, sigma, w, rho, seed=1, offset=offset)


def test_triton_backend_refuses_float64():
    mu, sigma, w, rho, eps = make((2, 5), torch.float64)
    with forced("triton"), pytest.raises(ValueError, match="float64"):
        diffkern.ntrk_step(mu, sigma, w, rho, eps=eps)
