"""Flow-GRPO (diffkern.flow_sde_step, diffkern.grpo_iso_loss): every backend against float64, and the spec's numbers."""
import pytest
import torch

import diffkern
from diffkern.grpo import reference
from diffkern.grpo.reference import grpo_iso_loss_reference
from diffkern.testing.backends import backends_under_test, device_for, forced, supports
from diffkern.testing.numerics import assert_close_to_oracle, oracle_with_spread

BACKENDS = backends_under_test("grpo_log_prob")

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# (B, *latent): one element, odd D, D just above a Triton tile (1024), a video-like [C, F, H, W]
# latent, and D just above a C++ chunk (16384).
SHAPES = ((1, 1), (2, 7), (3, 1025), (2, 3, 5, 67), (2, 16385))
# "y": the stored step as the residual target y = x_next - a x (no x, x_next), the loss's 2-read form.
VARIANTS = ("plain", "cfg", "ref", "cfg+ref", "y", "y+cfg+ref")
RULES = ("wan", "sd3")
SIGMAS = reference.flow_sigmas()
STEPS = (0, 9, 4, 1)  # samples of one batch sit at different steps


def ids(shape):
    return "x".join(map(str, shape))


def params(dtypes=DTYPES):
    return [(b, dt) for b in BACKENDS for dt in dtypes if supports(b, dt)]


def make_step(shape, dtype, seed=0, device="cpu"):
    """(x, v, sigma, sigma_next, noise): latents in `dtype`, sigmas float32 on the Wan schedule."""
    g = torch.Generator().manual_seed(seed)
    x, v, noise = ((torch.randn(shape, generator=g) * s).to(device, dtype) for s in (1.0, 1.5, 1.0))
    steps = torch.tensor([STEPS[i % len(STEPS)] for i in range(shape[0])], dtype=torch.long)
    return x, v, SIGMAS[steps].float().to(device), SIGMAS[steps + 1].float().to(device), noise


def make_loss_inputs(shape, dtype, variant, seed=0, device="cpu"):
    """Keyword arguments of grpo_iso_loss minus the per-sample log_prob_old/advantages: the stored step
    as x and x_next, or as y alone for the "y" variants."""
    x, v, sigma, sigma_next, noise = make_step(shape, dtype, seed, device)
    g = torch.Generator().manual_seed(seed + 1)
    x_next, y, _, _ = reference.flow_sde_step(x, v, sigma, sigma_next, noise, 0, reference.WAN_STD_COEF)
    other = lambda scale: (v.float().cpu() + scale * torch.randn(shape, generator=g)).to(device, dtype)  # noqa: E731
    step = dict(y=y) if variant.startswith("y") else dict(x=x, x_next=x_next)
    return dict(v=other(0.05), sigma=sigma, sigma_next=sigma_next, **step,
                v_ref=other(0.1) if "ref" in variant else None,
                v_uncond=other(0.5) if "cfg" in variant else None,
                cfg_scale=4.5 if "cfg" in variant else None)


def op_args(kw):
    """Positional arguments of diffkern::grpo_log_prob for the keyword arguments above."""
    return (kw["v"], kw.get("x"), kw["y"] if "y" in kw else kw["x_next"], kw["sigma"], kw["sigma_next"], kw["v_ref"],
            kw["v_uncond"], 1.0 if kw["cfg_scale"] is None else kw["cfg_scale"], 0, reference.WAN_STD_COEF)


def on_cpu(args, dtype=None):
    """CPU copies of the tensors among `args` (latents cast to `dtype`; sigmas to float64 with it)."""
    return tuple(a.detach().cpu().to(dtype or a.dtype) if isinstance(a, torch.Tensor) else a for a in args)


def grpo_oracle(fn, args, dtype):
    """fn(*args) in float64 with its error-model spreads: a latent's fan-in is its whole size (log p sums one
    sample's D elements, the loss the batch's); per-sample tensors (sigmas, dlog_prob, log_prob_old,
    advantages) are read exactly into scalars of their sample: not perturbed (diffkern.testing.numerics)."""
    fan_in = [a.numel() if isinstance(a, torch.Tensor) and a.dim() > 1 else None for a in args]
    return oracle_with_spread(fn, args, fan_in, dtype)


def check_sde_step(args, outs):
    """flow_sde_step's (x_next, y, log_prob, inv_lambda) against float64; log_prob is of y as stored."""
    x_next, y, log_prob, inv_lambda = outs
    oracle, spreads = grpo_oracle(reference.flow_sde_step, args, x_next.dtype)
    plain = reference.flow_sde_step(*on_cpu(args))
    for i, (name, out) in enumerate(zip(("x_next", "y", "log_prob", "inv_lambda"), outs)):
        if name != "log_prob":
            assert_close_to_oracle(out, oracle[i], plain[i], name, spreads[i])
    stored = (args[1], None, y, *args[2:4], None, None, 1.0, *args[5:])
    check_log_prob(stored, (log_prob,), ("log_prob",))


def check_log_prob(args, outs, names):
    """diffkern::grpo_log_prob's outputs (or the first of them) against float64 and float32 plain."""
    oracle, spreads = grpo_oracle(reference.log_prob, args, args[0].dtype)
    plain = reference.log_prob(*on_cpu(args, torch.float32))
    for out, ref, low, spread, name in zip(outs, oracle, plain, spreads, names):
        assert_close_to_oracle(out, ref, low, name, spread)


def check_log_prob_bwd(full, grads):
    """diffkern::grpo_log_prob_bwd's (dv[, dv_uncond]) against the spec's formulas in float64."""
    oracle, spreads = grpo_oracle(reference.log_prob_bwd, full, full[2].dtype)
    plain = reference.log_prob_bwd(*on_cpu(full, torch.float32))
    for name, out, ref, low, spread in zip(("dv", "dv_uncond"), grads, oracle, plain, spreads):
        assert out.dtype == full[2].dtype
        assert_close_to_oracle(out, ref, low, name, spread)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inv_lambda_of_the_wan_schedule_matches_the_spec(backend):
    """1/lambda for steps 0..9 of the Wan 20-step shift-3 schedule: 7.4770 ... 3.7754, from the schedule."""
    x, v, _, _, noise = make_step((10, 3), torch.float32, device=device_for(backend))
    with forced(backend):
        inv_lambda = diffkern.flow_sde_step(x, v, SIGMAS[:10].float().to(x.device), SIGMAS[1:11].float().to(x.device),
                                            eps=noise)[3].cpu()
    assert round(reference.WAN_STD_COEF, 5) == 0.98242
    assert [round(inv_lambda[k].item(), 4) for k in (0, 1, 9)] == [7.4770, 7.0414, 3.7754]
    assert (inv_lambda[1:] < inv_lambda[:-1]).all()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("backend,dtype", params())
def test_sde_step_matches_float64_reference(backend, dtype, shape, rule):
    x, v, sigma, sigma_next, noise = make_step(shape, dtype, device=device_for(backend))
    with forced(backend):
        outs = diffkern.flow_sde_step(x, v, sigma, sigma_next, eps=noise, std_rule=rule)
    check_sde_step((x, v, sigma, sigma_next, noise, reference.STD_RULES[rule],
                             reference.default_std_coef(rule)), outs)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("backend,dtype", params())
def test_log_prob_and_kl_match_float64_reference(backend, dtype, shape, variant):
    args = op_args(make_loss_inputs(shape, dtype, variant, device=device_for(backend)))
    with forced(backend):
        outs = torch.ops.diffkern.grpo_log_prob(*args)
    check_log_prob(args, outs, ("log_prob", "kl", "inv_lambda"))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES[1:4], ids=ids)
@pytest.mark.parametrize("backend,dtype", params())
def test_backward_matches_float64_formulas(backend, dtype, shape, variant):
    args = op_args(make_loss_inputs(shape, dtype, variant, device=device_for(backend)))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(5)
    dlog_prob, dkl = (torch.randn(shape[0], generator=g).to(args[0].device, acc) for _ in range(2))
    with forced(backend):
        grads = torch.ops.diffkern.grpo_log_prob_bwd(dlog_prob, dkl, *args)
    assert len(grads) == (2 if "cfg" in variant else 1)
    check_log_prob_bwd((dlog_prob, dkl, *args), grads)


@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_formulas_match_autograd(variant):
    """reference.log_prob_bwd (the spec's formulas) equals autograd through reference.log_prob, in float64."""
    kw = make_loss_inputs((3, 11), torch.float64, variant)
    args = list(op_args(kw))
    leaves = [args[0].requires_grad_()] + ([args[6].requires_grad_()] if kw["v_uncond"] is not None else [])
    assert (args[1] is None) == variant.startswith("y")
    g = torch.Generator().manual_seed(2)
    dlog_prob, dkl = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    log_prob, kl, _ = reference.log_prob(*args)
    auto = torch.autograd.grad((log_prob * dlog_prob + kl * dkl).sum(), leaves)
    formulas = reference.log_prob_bwd(dlog_prob, dkl, *[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    assert len(formulas) == len(auto)
    for grad, ref in zip(formulas, auto):
        torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-12)


# log p - log p_old per sample and advantages: ratios inside the clip range, far above and far below
# it, with advantages of both signs, so that both branches of the PPO max carry the gradient.
DELTAS = (0.0, 0.02, -0.02, 0.0002, 0.03, -0.03)
ADVANTAGES = (1.0, 1.5, -0.7, 2.0, -1.2, 0.8)


def loss_case(backend, dtype, variant, tgr=True, beta=0.1):
    kw = make_loss_inputs((6, 37), dtype, variant, device=device_for(backend))
    kw["v"].requires_grad_()
    if kw["v_uncond"] is not None:
        kw["v_uncond"].requires_grad_()
    log_prob = reference.log_prob(*on_cpu(op_args(kw), torch.float64))[0]
    kw["log_prob_old"] = (log_prob - torch.tensor(DELTAS, dtype=torch.float64)).to(kw["v"].device, torch.float32)
    kw["advantages"] = torch.tensor(ADVANTAGES, device=kw["v"].device)
    return kw, dict(tgr=tgr, beta=beta if "ref" in variant else 0.0)


def loss_and_grads(fn, kw, options):
    loss, stats = fn(**kw, **options)
    leaves = [kw["v"]] + ([kw["v_uncond"]] if kw["v_uncond"] is not None else [])
    return loss, stats, torch.autograd.grad(loss, leaves)


def on_cpu_leaves(kw, dtype=None):
    """CPU copies of the loss arguments (latents in `dtype` if given), v and v_uncond as fresh leaves."""
    out = {k: t.detach().cpu().to(dtype if dtype and t.dim() > 1 else t.dtype) if isinstance(t, torch.Tensor) else t
           for k, t in kw.items()}
    for k in ("v", "v_uncond"):
        if out[k] is not None:
            out[k].requires_grad_()
    return out


@pytest.mark.parametrize("tgr", (True, False))
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend,dtype", params(dtypes=(torch.float32, torch.float64)))
def test_loss_and_gradients_match_float64_autograd(backend, dtype, variant, tgr):
    """End to end, clipped and unclipped samples in one batch, against autograd of the plain loss in float64."""
    kw, options = loss_case(backend, dtype, variant, tgr)
    with forced(backend):
        loss, stats, grads = loss_and_grads(diffkern.grpo_iso_loss, kw, options)
    names = ("approx_kl", "ratio_mean", "weights")

    def reference_loss(*values):
        loss, stats, grads = loss_and_grads(grpo_iso_loss_reference, on_cpu_leaves(dict(zip(kw, values))), options)
        return [loss, *[stats[name] for name in names], *grads]
    (ref_loss, *ref), spreads = grpo_oracle(reference_loss, list(kw.values()), dtype)
    plain = reference_loss(*[x.float() if isinstance(x, torch.Tensor) and x.dim() < 2 else x for x in kw.values()])
    assert_close_to_oracle(loss, ref_loss, plain[0], "loss", spreads[0])
    assert stats["clip_fraction"].item() == pytest.approx(4 / 6)
    for name, want, low, spread in zip(names, ref, plain[1:], spreads[1:]):
        assert_close_to_oracle(stats[name].cpu().reshape(want.shape), want, low, name, spread)
    for grad, want, low, spread in zip(grads, ref[3:], plain[4:], spreads[4:]):
        assert_close_to_oracle(grad, want, low, "grad", spread)
    if options["beta"] == 0:  # samples 1 (A > 0, r above the range) and 2 (A < 0, r below it): clipped, constant
        assert (grads[0][1:3] == 0).all() and (grads[0][3:] != 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_loss_with_unit_advantages_is_minus_one(backend):
    """Ratio 1 (log_prob_old from the rollout step itself) and A = 1: loss = -mean(weights) = -1."""
    x, v, sigma, sigma_next, noise = make_step((4, 300), torch.float32, device=device_for(backend))
    with forced(backend):
        x_next, y, log_prob_old, _ = diffkern.flow_sde_step(x, v, sigma, sigma_next, eps=noise)
        pair = diffkern.grpo_iso_loss(v, x, x_next, sigma, sigma_next, log_prob_old, torch.ones_like(sigma))
        residual = diffkern.grpo_iso_loss(v, sigma=sigma, sigma_next=sigma_next, log_prob_old=log_prob_old,
                                          advantages=torch.ones_like(sigma), y=y)
    for loss, stats in (pair, residual):
        assert loss.item() == pytest.approx(-1.0, abs=1e-5)
        assert stats["weights"].mean().item() == pytest.approx(1.0, abs=1e-6)
        assert stats["clip_fraction"].item() == 0 and stats["approx_kl"].item() < 1e-10
    # y as stored is what log_prob_old was taken of: the residual form is on-policy to the last bit of the sum
    assert residual[1]["approx_kl"].item() < 1e-12


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", ("cpu", "reference"))
def test_gradcheck_float64(backend, variant):
    """Gradients to v (and v_uncond), log_prob_old and advantages, numerically."""
    kw, options = loss_case(backend, torch.float64, variant)
    for name in ("log_prob_old", "advantages"):
        kw[name] = kw[name].double().requires_grad_()
    names = ["v"] + (["v_uncond"] if kw["v_uncond"] is not None else []) + ["log_prob_old", "advantages"]

    def loss(*leaves):
        return diffkern.grpo_iso_loss(**(kw | dict(zip(names, leaves))), **options)[0]
    with forced(backend):
        assert torch.autograd.gradcheck(loss, [kw[n] for n in names], eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if supports(b, torch.float64)])
def test_gradients_at_ties_and_nan_match_autograd(backend):
    """The written-out PPO derivatives (grpo_math.h ppo_term, reference.ppo_epilogue) where autograd's rules
    decide: a ratio of exactly 1 (the two branches of the max tie), A = 0, and a NaN sample (NaN gradient
    to its inputs; the other samples' gradients as without it)."""
    kw, options = loss_case(backend, torch.float64, "y")
    with forced(backend):
        log_prob = torch.ops.diffkern.grpo_log_prob(*op_args(kw))[0].detach()
    kw["log_prob_old"] = torch.cat([log_prob[:1], kw["log_prob_old"][1:].double()]).requires_grad_()  # ratio 1
    kw["advantages"] = torch.tensor([1.0, 0.0, -0.7, 2.0, -1.2, 0.8], dtype=torch.float64,
                                    device=log_prob.device).requires_grad_()
    with torch.no_grad():
        kw["v"][4, 3] = float("nan")
    leaves = [kw[name] for name in ("v", "log_prob_old", "advantages")]
    with forced(backend):
        grads = torch.autograd.grad(diffkern.grpo_iso_loss(**kw, **options)[0], leaves)
    ref = on_cpu_leaves(kw)
    for name in ("log_prob_old", "advantages"):
        ref[name].requires_grad_()
    want = torch.autograd.grad(grpo_iso_loss_reference(**ref, **options)[0], [ref[n] for n in ("v", "log_prob_old",
                                                                                                 "advantages")])
    for got, expected in zip(grads, want):
        assert torch.equal(got.isnan().cpu(), expected.isnan())
        torch.testing.assert_close(got.cpu(), expected, equal_nan=True)  # float64: summation order only
    assert grads[0][4].isnan().all() and not grads[0][[0, 1, 2, 3, 5]].isnan().any()
    assert grads[2][0] != 0  # the tie: half the gradient from each branch of the max, which agree


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_reduction_is_deterministic(backend):
    """Same inputs, same bits: the per-sample sums are added in a fixed order (and the cpu kernel's
    order does not depend on the thread count)."""
    kw = make_loss_inputs((2, 20000 if backend == "cpu" else 3000), torch.float32, "cfg+ref",
                          device=device_for(backend))
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            with forced(backend):
                outs.append(torch.ops.diffkern.grpo_log_prob(*op_args(kw)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ("strided", "expanded"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigma_views_are_read_as_views(backend, layout):
    """sigma/sigma_next given as strided or expanded views (a whole batch at one step) give the dense result."""
    x, v, sigma, sigma_next, noise = make_step((4, 37), torch.float32, device=device_for(backend))
    if layout == "strided":
        view = lambda s: torch.stack([s, torch.full_like(s, float("nan"))], 1)[:, 0]  # noqa: E731
    else:
        sigma, sigma_next = sigma[:1].repeat(4), sigma_next[:1].repeat(4)
        view = lambda s: s[:1].clone().expand(4)  # noqa: E731
    with forced(backend):
        dense = diffkern.flow_sde_step(x, v, sigma, sigma_next, eps=noise)
        views = diffkern.flow_sde_step(x, v, view(sigma), view(sigma_next), eps=noise)
    for a, b in zip(dense, views):
        torch.testing.assert_close(a, b)


def test_residual_target_is_more_exact_than_the_pair_in_bfloat16():
    """Stored in bfloat16, y = x_next - a x gives a ~10x more exact gradient than x and x_next (whose
    difference cancels O(1) values): the reason the y form is recommended, not only its traffic."""
    x, v, sigma, sigma_next, noise = make_step((10, 4000), torch.float64)
    steps = torch.arange(10)
    sigma, sigma_next = SIGMAS[steps], SIGMAS[steps + 1]
    x_next, y, _, _ = reference.flow_sde_step(x, v, sigma, sigma_next, noise, 0, reference.WAN_STD_COEF)
    v_train = v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(9), dtype=v.dtype)
    ones, zeros = torch.ones(10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)

    def dv(x, target):
        return reference.log_prob_bwd(ones, zeros, v_train, x, target, sigma, sigma_next, None, None, 1.0, 0,
                                      reference.WAN_STD_COEF)[0]
    bf16 = lambda t: t.to(torch.bfloat16).double()  # noqa: E731
    exact = dv(x, x_next)
    err_pair = (dv(bf16(x), bf16(x_next)) - exact).norm(dim=1) / exact.norm(dim=1)
    err_y = (dv(None, bf16(y)) - exact).norm(dim=1) / exact.norm(dim=1)
    assert (err_y * 5 < err_pair).all(), (err_y, err_pair)


def test_module_equals_the_op_with_advantages_from_rewards():
    """diffkern.nn.FlashGRPOLoss(rewards, prompt_ids) = grpo_iso_loss(advantages(rewards, prompt_ids))."""
    from diffkern.grpo import advantages
    from diffkern.nn import FlashGRPOLoss
    kw, options = loss_case("cpu", torch.float32, "y+cfg+ref")
    rewards, ids = torch.tensor([0.1, 0.9, 0.4, 2.0, -1.0, 0.3]), torch.tensor([7, 7, 7, 3, 3, 3])
    module = FlashGRPOLoss(beta=options["beta"])
    step = dict(y=kw["y"], v_ref=kw["v_ref"], v_uncond=kw["v_uncond"], cfg_scale=kw["cfg_scale"])
    loss, stats = module(kw["v"], kw["sigma"], kw["sigma_next"], kw["log_prob_old"], rewards, ids, **step)
    expected, _ = diffkern.grpo_iso_loss(**(kw | dict(advantages=advantages(rewards, ids))), **options)
    assert torch.equal(loss, expected)
    torch.testing.assert_close(stats["advantages"], advantages(rewards, ids))
    with pytest.raises(ValueError, match="give rewards and prompt_ids, or advantages"):
        module(kw["v"], kw["sigma"], kw["sigma_next"], kw["log_prob_old"], rewards, **step)
