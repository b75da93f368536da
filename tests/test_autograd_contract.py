"""Every diffkern op's autograd contract: opcheck (all its tests, inputs requiring grad) on every registered op,
double backward supported and right (ntrk_step) or refused with an error naming the op, and the ops without a
derivative giving outputs that say so (no silent None, no wrong second-order gradient)."""
import pytest
import torch

import diffkern
from diffkern.bench import machine  # noqa: F401  (the fake of diffkern::stream_pass)
from diffkern.grpo import reference as grpo_reference
from diffkern.ntrk import bands  # noqa: F401  (defines diffkern::twoos_band_table)
from diffkern.rmdm import reference as rmdm_reference
from diffkern.sinks import processors  # (defines diffkern::sink_record)
from diffkern.testing import cuda_harness
from diffkern.testing.backends import forced

B, T, D = 2, 3, 8
WAN = grpo_reference.STD_RULES["wan"], grpo_reference.WAN_STD_COEF
# Ops without tensor arguments: opcheck has only their schema (and fake for the data op) to check.
NO_TENSORS = {"cpu_isa": ("test_schema",), "cuda_runtime_version": ("test_schema",),
              "cpu_cache_bytes": ("test_schema",), "cpu_cache_clear": ("test_schema",),
              "rmdm_sudoku": ("test_schema", "test_faketensor"),
              "twoos_band_table": ("test_schema", "test_faketensor")}
RECORDER = processors.SinkRecorder()  # held here: diffkern::sink_record finds its recorder by id, weakly


def randn(*shape, seed=0, dtype=torch.float32, grad=True):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    return t.requires_grad_(grad)


def per_sample(lo, hi, seed, dtype=torch.float32):
    return (lo + (hi - lo) * torch.rand(B, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).to(dtype)


def dar_args(dtype=torch.float32):
    sources = [(randn(B, T, D, seed=i, dtype=dtype, grad=False) * (1 + i)).requires_grad_() for i in range(3)]
    return sources, randn(D, seed=5, dtype=dtype), (1 + 0.1 * randn(D, seed=6, dtype=dtype, grad=False)).requires_grad_()


def dar_route_calls():
    sources, q, gain = [[t.detach().requires_grad_() for t in x] if isinstance(x, list) else x.detach().requires_grad_()
                        for x in dar_args()]
    fwd = (sources, q, gain, 1e-6)
    h, lse = (t.detach() for t in torch.ops.diffkern.dar_route_fwd(*fwd))
    bwd = (randn(B, T, D, seed=7), sources, q, gain, h, lse, 1e-6)
    return {"dar_route_fwd": fwd, "dar_route_bwd": bwd, "dar_route_fwd_cuda": fwd, "dar_route_bwd_cuda": bwd}


def dar_gather_calls():
    sources, q, gain = dar_route_calls()["dar_route_fwd"][:3]
    addends = [randn(B, T, D, seed=8), randn(B, T, D, seed=9)]
    fwd = (sources[:2], addends, q, gain, 1e-6)
    h, lse, c = (t.detach() for t in torch.ops.diffkern.dar_gather_fwd(*fwd))
    return {"dar_gather_fwd": fwd,
            "dar_gather_bwd": (randn(B, T, D, seed=7), [*sources[:2], c.requires_grad_()], q, gain, h, lse,
                               randn(B, T, D, seed=10), 1e-6)}


def grpo_calls():
    x, v, eps, t, r, u = (randn(B, 5, seed=20 + i) for i in range(6))
    sigma, sigma_next = per_sample(0.5, 0.9, 1), per_sample(0.1, 0.4, 2)
    step = (x, v, sigma, sigma_next, eps, *WAN)
    lp = (v, x, t, sigma, sigma_next, r, u, 4.5, *WAN)
    bwd = (randn(B, seed=30), randn(B, seed=31), *lp)
    # log_prob_old near log p, so that the ratios are near 1 (one sample clipped at clip_eps = 0.2)
    old = (torch.ops.diffkern.grpo_log_prob(*lp)[0].detach() - torch.tensor([0.05, 0.5])).requires_grad_()
    loss = (v, x, t, None, sigma, sigma_next, old, randn(B, seed=32), r, u, 4.5, 0.2, True, 0.1, *WAN, None)
    return {"flow_sde_step": step, "flow_sde_step_cuda": step, "grpo_log_prob": lp, "grpo_log_prob_cuda": lp,
            "grpo_log_prob_bwd": bwd, "grpo_log_prob_bwd_cuda": bwd, "grpo_iso_loss": loss}


def ntrk_calls():
    mu, w, eps = (randn(B, 6, seed=40 + i) for i in range(3))
    sigma, rho = per_sample(0.2, 1.2, 3), per_sample(0.0, 1.0, 4)
    lower, upper = (t.float() for t in diffkern.twoos_bands(2, 3))
    philox = torch.tensor([3, 0])
    return {"ntrk_step": (mu, sigma, w, rho, eps, philox), "ntrk_step_cuda": (mu, sigma, w, rho, None, philox),
            "ntrk_step_bwd": (randn(B, 6, seed=44), sigma, rho, True, True),
            "twoos_project": (randn(B, 6, seed=43), lower, upper, 2),
            "twoos_band_table": (2, 3, 1e-4, "normal", None, torch.float32, torch.device("cpu"))}


def rmdm_calls():
    d, f, heads = 4, 6, 2
    weights = [((1.0 if name.startswith("ln") and name.endswith("_w") else 0.0) + 0.25 * randn(*s, seed=50 + i))
               .detach().requires_grad_()
               for i, (name, s) in enumerate(zip(rmdm_reference.BLOCK_PARAMS, rmdm_reference.param_shapes(d, f)))]
    x, mod = randn(B, T, d, seed=70), (0.3 * randn(B, 1, 6, d, seed=71)).detach().requires_grad_()
    states = torch.ops.diffkern.rmdm_recurse(x, weights, mod, 2, heads, 1e-5).detach()
    bwd = (randn(*states.shape, seed=72), x, states.requires_grad_(), weights, mod, heads, 1e-5)
    acts = torch.ops.diffkern.rmdm_recurse_keep(x, weights, mod, 2, heads, 1e-5)[1].detach()
    return {"rmdm_recurse": (x, weights, mod, 2, heads, 1e-5), "rmdm_recurse_bwd": bwd, "rmdm_recurse_bwd_cuda": bwd,
            "rmdm_recurse_keep": (x, weights, mod, 2, heads, 1e-5),
            "rmdm_recurse_keep_bwd": (*bwd[:3], acts, *bwd[3:]),
            "rmdm_sudoku": (2, 40, 7), "rmdm_sudoku_count": (torch.ops.diffkern.rmdm_sudoku(2, 40, 7)[0], 2)}


def sinks_calls():
    q, k, v = (randn(B, 2, 5, 4, seed=80 + i) for i in range(3))
    o, lse, mass, *_ = (t.detach() for t in torch.ops.diffkern.sink_attention_fwd(q, k, v, 4, 0.5))
    idx = torch.ops.diffkern.sink_topk(mass, 1, True)
    return {"sink_mass": (q, k, 4, 0.5), "sink_attention_fwd": (q, k, v, 4, 0.5),
            "sink_topk": (mass.requires_grad_(), 1, True), "sink_suppress": (q, k, v, o, lse, idx, 4, 0.5, -1e4),
            "sink_attention_given": (q, k, v, idx, 4, 0.5, -1e4),
            "sink_record": (torch.zeros((), dtype=torch.int64), mass[0, 0, :2].detach(), idx, None, id(RECORDER),
                            "layer", "per_head", "a,b")}


def machine_calls():
    ins, outs = [randn(7, seed=90 + i, grad=False) for i in range(3)], [randn(7, seed=95, grad=False)]
    return {"stream_pass": (ins, outs, False)}


OPS_OF = {
    dar_route_calls: ("dar_route_fwd", "dar_route_bwd", "dar_route_fwd_cuda", "dar_route_bwd_cuda"),
    dar_gather_calls: ("dar_gather_fwd", "dar_gather_bwd"),
    grpo_calls: ("flow_sde_step", "flow_sde_step_cuda", "grpo_log_prob", "grpo_log_prob_cuda", "grpo_log_prob_bwd",
                 "grpo_log_prob_bwd_cuda", "grpo_iso_loss"),
    ntrk_calls: ("ntrk_step", "ntrk_step_cuda", "ntrk_step_bwd", "twoos_project", "twoos_band_table"),
    rmdm_calls: ("rmdm_recurse", "rmdm_recurse_bwd", "rmdm_recurse_bwd_cuda", "rmdm_recurse_keep",
                 "rmdm_recurse_keep_bwd", "rmdm_sudoku", "rmdm_sudoku_count"),
    sinks_calls: ("sink_mass", "sink_attention_fwd", "sink_topk", "sink_suppress", "sink_attention_given",
                  "sink_record"),
    machine_calls: ("stream_pass",),  # the benchmarks' yardstick: inputs that require no grad, outputs in place
}
# The ops that refuse a derivative (backward ops, the cuda backends' internal ops, the forward-only sink ops).
REFUSING = {"dar_route_bwd", "dar_route_bwd_cuda", "dar_gather_bwd", "grpo_log_prob_bwd", "grpo_log_prob_bwd_cuda",
            "rmdm_recurse_bwd", "rmdm_recurse_bwd_cuda", "rmdm_recurse_keep_bwd", "dar_route_fwd_cuda",
            "grpo_log_prob_cuda", "ntrk_step_cuda", "ntrk_step_bwd", "sink_mass", "sink_attention_fwd",
            "sink_suppress", "sink_attention_given"}
SAMPLES = {name: calls for calls, names in OPS_OF.items() for name in names}  # op -> its sample's builder
OPCHECKED = sorted(set(SAMPLES) | set(NO_TENSORS))


def registered_ops():
    return sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("diffkern::"))


def test_every_registered_op_has_opcheck_coverage():
    """A new op must join OPS_OF (or NO_TENSORS) to be registered: none escapes opcheck."""
    assert set(registered_ops()) <= set(OPCHECKED)


def sample(name):
    return SAMPLES[name]()[name] if name in SAMPLES else ()


@pytest.mark.parametrize("name", [n for n in OPCHECKED if n in registered_ops()])
def test_opcheck(name):
    """Every test of opcheck (schema, fake, autograd registration, AOT dispatch) with inputs requiring grad; an
    op that refuses a derivative has its AOT test (which differentiates) run on detached inputs."""
    if name.endswith("_cuda") and not cuda_harness.loaded():
        pytest.skip("the internal cuda ops run in the harness on CPU here")
    op, args = getattr(torch.ops.diffkern, name).default, sample(name)
    if name in NO_TENSORS:
        torch.library.opcheck(op, args, test_utils=NO_TENSORS[name])
    elif name in REFUSING:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        torch.library.opcheck(op, detached(args))
    else:
        torch.library.opcheck(op, args)


def detached(args):
    return tuple([t.detach() for t in a] if isinstance(a, list) else a.detach() if isinstance(a, torch.Tensor) else a
                 for a in args)


def weighted(out):
    """out reduced to a scalar with fixed random weights (every element gets its own gradient)."""
    return (out * randn(*out.shape, seed=99, dtype=out.dtype, grad=False)).sum()


def grpo_loss(v, x, x_next, sigma, sigma_next):
    """The loss near the old policy (ratios near 1, inside the clip range), so v gets a gradient."""
    old = torch.ops.diffkern.grpo_log_prob(v, x, x_next, sigma, sigma_next, None, None, 1.0, *WAN)[0].detach()
    return diffkern.grpo_iso_loss(v, x, x_next, sigma, sigma_next, old - 1e-4, torch.tensor([1.0, -0.5]),
                                  clip_eps=0.2)[0]


# public name: (its arguments, the call, the leaves to differentiate)
REFUSED = {
    "diffkern.dar_route": (dar_args, diffkern.dar_route, lambda s, q, g: [*s, q, g]),
    "diffkern.dar.dar_gather": (dar_args, lambda s, q, g: sum(diffkern.dar.dar_gather(s[:1], s[1:], q, g)),
                                lambda s, q, g: [*s, q, g]),
    "diffkern.grpo_iso_loss": (lambda: grpo_calls()["grpo_log_prob"][:5], grpo_loss, lambda v, *_: [v]),
    "diffkern.recurse": (lambda: rmdm_calls()["rmdm_recurse"][:3],
                         lambda x, weights, mod: diffkern.recurse([weights], x, 2, heads=2, mod=mod),
                         lambda x, weights, mod: [x, *weights, mod]),
}


@pytest.mark.parametrize("backend", ("cpu", "reference"))
@pytest.mark.parametrize("public", REFUSED)
def test_double_backward_is_refused_naming_the_op(public, backend):
    make, fn, leaves = REFUSED[public]
    args = make()
    with forced(backend):
        grads = torch.autograd.grad(weighted(fn(*args)), leaves(*args), create_graph=True)
        total = sum(g.sum() for g in grads)
        with pytest.raises(NotImplementedError, match=f"double backward of {public} is not supported"):
            total.backward()


@pytest.mark.parametrize("public", REFUSED)
def test_first_order_gradient_is_the_same_with_create_graph(public):
    """Refusing the second order leaves the first intact: create_graph=True gives the plain gradients."""
    make, fn, leaves = REFUSED[public]
    args = make()
    with_graph = torch.autograd.grad(weighted(fn(*args)), leaves(*args), create_graph=True)
    plain = torch.autograd.grad(weighted(fn(*args)), leaves(*args))
    for a, b in zip(with_graph, plain):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("with_eps", (True, False))
def test_ntrk_step_double_backward_matches_float64_gradgradcheck(with_eps):
    """ntrk_step is linear in mu, w and eps: its backward is differentiable again, checked numerically in
    float64 (gradcheck, then gradgradcheck); sigma and rho are constants of the step (no gradient)."""
    mu, w, eps = (randn(B, 5, seed=40 + i, dtype=torch.float64) for i in range(3))
    sigma, rho = per_sample(0.2, 1.2, 3, torch.float64), per_sample(0.0, 1.0, 4, torch.float64)
    if with_eps:
        def step(mu, w, eps):
            return torch.ops.diffkern.ntrk_step(mu, sigma, w, rho, eps, None)
        inputs = (mu, w, eps)
    else:
        def step(mu, w):
            return torch.ops.diffkern.ntrk_step(mu, sigma, w, rho, None, torch.tensor([3, 0]))
        inputs = (mu, w)
    assert torch.autograd.gradcheck(step, inputs)
    assert torch.autograd.gradgradcheck(step, inputs)


def test_flow_sde_step_and_twoos_project_outputs_are_not_differentiable():
    calls = {**grpo_calls(), **ntrk_calls()}
    for name in ("flow_sde_step", "twoos_project"):
        outs = getattr(torch.ops.diffkern, name)(*calls[name])
        assert not any(o.requires_grad for o in outs), name


@pytest.mark.parametrize("name", ("sink_mass", "sink_attention_fwd", "sink_suppress", "sink_attention_given"))
def test_sink_ops_refuse_a_gradient_naming_the_op(name):
    out = getattr(torch.ops.diffkern, name)(*sinks_calls()[name])
    with pytest.raises(NotImplementedError, match=f"diffkern::{name} is forward-only"):
        out[0].sum().backward()
