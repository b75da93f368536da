"""Flow-GRPO as torch ops: argument errors, NaN policy, empty batch, opcheck, torch.compile."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import diffkern
from diffkern.testing.backends import backends_under_test, device_for, forced

from test_grpo import make_loss_inputs, make_step, op_args

BACKENDS = backends_under_test("grpo_log_prob")

SHAPE = (2, 3, 8)


def step_args(device="cpu"):
    x, v, sigma, sigma_next, noise = make_step(SHAPE, torch.float32, device=device)
    return dict(x=x, v=v, sigma=sigma, sigma_next=sigma_next, eps=noise)


def loss_args(device="cpu"):
    kw = make_loss_inputs(SHAPE, torch.float32, "cfg+ref", device=device)
    return kw | dict(log_prob_old=torch.zeros(2, device=device), advantages=torch.ones(2, device=device))


def edit(base, **changes):
    """A case builder: the good arguments on `device`, with some replaced by functions of them."""
    def build(device):
        kw = base(device)
        return kw | {k: f(kw) for k, f in changes.items()}
    return build


BAD_STEP = {
    "int x": (edit(step_args, x=lambda a: a["x"].long()), r"x dtype must be float16, bfloat16, float32 or float64"),
    "v shape": (edit(step_args, v=lambda a: a["v"][:, :2]), r"v has shape \[2, 2, 8\] but x has shape \[2, 3, 8\]"),
    "eps dtype": (edit(step_args, eps=lambda a: a["eps"].double()), r"eps dtype float64 differs from x dtype"),
    "v device": (edit(step_args, v=lambda a: a["v"].to("meta")), r"v is on meta"),
    "strided x": (edit(step_args, x=lambda a: a["x"].transpose(1, 2).contiguous().transpose(1, 2)),
                  r"x must be contiguous"),
    "sigma shape": (edit(step_args, sigma=lambda a: a["sigma"][:1]), r"sigma must be \[B\] = \[2\], got shape \[1\]"),
    "sigma dtype": (edit(step_args, sigma_next=lambda a: a["sigma_next"].half()),
                    r"sigma_next dtype must be float32 or float64, got float16"),
    "no elements": (edit(step_args, **{k: (lambda a, k=k: a[k][:, :0]) for k in ("x", "v", "eps")}),
                    r"x must have at least one element per sample"),
    "std_coef": (lambda device: step_args(device) | dict(std_coef=-1.0), r"std_coef must be finite and > 0"),
    "std_rule": (lambda device: step_args(device) | dict(std_rule="ddim"), r"std_rule must be 'wan' or 'sd3'"),
}
BAD_LOSS = {
    "x_next shape": (edit(loss_args, x_next=lambda a: a["x_next"][:1]), r"x_next has shape \[1, 3, 8\] but v has shape"),
    "x dtype": (edit(loss_args, x=lambda a: a["x"].double()), r"x dtype float64 differs from v dtype float32"),
    "y and x": (edit(loss_args, y=lambda a: a["x_next"]), r"give the stored step either as x and x_next, or as y"),
    "no step": (edit(loss_args, x=lambda a: None), r"give the stored step either as x and x_next, or as y"),
    "y strided": (edit(loss_args, x=lambda a: None, x_next=lambda a: None,
                       y=lambda a: a["x_next"].transpose(1, 2).contiguous().transpose(1, 2)),
                  r"y must be contiguous"),
    "v_ref dtype": (edit(loss_args, v_ref=lambda a: a["v_ref"].half(), beta=lambda a: 0.1),
                    r"v_ref dtype float16 differs"),
    "v_uncond strided": (edit(loss_args, v_uncond=lambda a: a["v_uncond"].transpose(1, 2).contiguous().transpose(1, 2)),
                         r"v_uncond must be contiguous"),
    "cfg without v_uncond": (edit(loss_args, v_uncond=lambda a: None), r"cfg_scale and v_uncond go together"),
    "nan cfg_scale": (lambda device: loss_args(device) | dict(cfg_scale=float("nan")), r"cfg_scale must be finite"),
    "advantages shape": (edit(loss_args, advantages=lambda a: a["advantages"][None]),
                         r"advantages must be a floating \[B\]"),
    "log_prob_old dtype": (edit(loss_args, log_prob_old=lambda a: a["log_prob_old"].long()),
                           r"log_prob_old must be a floating \[B\]"),
    "clip_eps": (lambda device: loss_args(device) | dict(clip_eps=-0.1), r"clip_eps must be finite and >= 0"),
    "beta": (lambda device: loss_args(device) | dict(beta=float("inf")), r"beta must be finite and >= 0"),
}


BAD_INPUTS = {**{f"flow_sde_step: {k}": (diffkern.flow_sde_step, *v) for k, v in BAD_STEP.items()},
              **{f"grpo_iso_loss: {k}": (diffkern.grpo_iso_loss, *v) for k, v in BAD_LOSS.items()}}


@pytest.mark.parametrize("name", BAD_INPUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_value_error_naming_the_argument(backend, name):
    fn, build, match = BAD_INPUTS[name]
    with forced(backend), pytest.raises(ValueError, match=f"{fn.__name__}: {match}"):
        fn(**build(device_for(backend)))


@pytest.mark.parametrize("name", [n for n in BAD_STEP if n not in ("std_rule",)])
def test_bad_step_input_is_rejected_while_tracing(name):
    """The fake implementation (used by torch.compile) rejects the same inputs."""
    build, match = BAD_STEP[name]
    a = build("cpu")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, pytest.raises(ValueError, match=match):
        torch.ops.diffkern.flow_sde_step(*(mode.from_tensor(a[k]) for k in ("x", "v", "sigma", "sigma_next", "eps")),
                                         0, a.get("std_coef", 1.0))


def test_triton_rejects_float64():
    kw = make_loss_inputs(SHAPE, torch.float64, "plain", device=device_for("triton"))
    with forced("triton"), pytest.raises(ValueError, match="triton backend .* float64"):
        torch.ops.diffkern.grpo_log_prob(*op_args(kw))


def test_backward_rejects_mismatched_incoming_gradients():
    args = op_args(make_loss_inputs(SHAPE, torch.float32, "plain"))
    match = r"grpo_iso_loss: dkl must be a contiguous \[B\] = \[2\] tensor of dtype float32"
    with pytest.raises(ValueError, match=match):
        torch.ops.diffkern.grpo_log_prob_bwd(torch.ones(2), torch.ones(2, dtype=torch.float64), *args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_one_sample_stays_in_that_sample(backend):
    kw = make_loss_inputs((3, 50), torch.float32, "ref", device=device_for(backend))
    kw["v"][1, 7] = float("nan")
    with forced(backend):
        log_prob, kl, _ = torch.ops.diffkern.grpo_log_prob(*op_args(kw))
        step = diffkern.flow_sde_step(kw["x"], kw["v"], kw["sigma"], kw["sigma_next"], eps=torch.zeros_like(kw["x"]))
    for out in (log_prob, kl, step[2]):
        assert out.isnan().tolist() == [False, True, False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_gives_zero_loss_and_empty_gradients(backend):
    kw = make_loss_inputs((0, 5), torch.float32, "cfg+ref", device=device_for(backend))
    kw["v"].requires_grad_()
    empty = torch.zeros(0, device=kw["v"].device)
    with forced(backend):
        x_next, y, log_prob, inv_lambda = diffkern.flow_sde_step(kw["x"], kw["v"], kw["sigma"], kw["sigma_next"])
        loss, stats = diffkern.grpo_iso_loss(**kw, log_prob_old=empty, advantages=empty)
        (dv,) = torch.autograd.grad(loss, kw["v"])
    assert x_next.shape == y.shape == (0, 5) and log_prob.shape == inv_lambda.shape == (0,)
    assert loss.item() == 0 and dv.shape == (0, 5)


@pytest.mark.parametrize("variant", ("plain", "cfg+ref", "y+cfg+ref"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, variant):
    kw = make_loss_inputs((2, 3, 40), torch.float32, variant, device=device_for(backend))
    args = op_args(kw)
    x = torch.randn_like(kw["v"])
    per_sample = [torch.tensor(t, device=x.device, requires_grad=True) for t in ([0.5, -0.5], [1.0, -2.0])]
    loss = (args[0].detach().requires_grad_(), kw.get("x"), kw.get("x_next"), kw.get("y"), kw["sigma"],
            kw["sigma_next"], *per_sample, kw["v_ref"], kw["v_uncond"], kw["cfg_scale"], 0.2, True,
            0.1 if kw["v_ref"] is not None else 0.0, *args[-2:], None)
    with forced(backend):
        torch.library.opcheck(torch.ops.diffkern.grpo_iso_loss.default, loss)
        torch.library.opcheck(torch.ops.diffkern.flow_sde_step.default,
                              (x, kw["v"], kw["sigma"], kw["sigma_next"], torch.randn_like(x), 1, 0.7))
        torch.library.opcheck(torch.ops.diffkern.grpo_log_prob.default, (args[0].requires_grad_(), *args[1:]))
        torch.library.opcheck(torch.ops.diffkern.grpo_log_prob_bwd.default,
                              (torch.randn(2), torch.randn(2), args[0].detach(), *args[1:]))


class _Ops(TorchDispatchMode):
    """The ops a call dispatches below autograd (not those a kernel calls inside)."""

    def __init__(self):
        super().__init__()
        self.called = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.called.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad", (False, True))
def test_cpu_call_is_one_op(grad):
    """On CPU tensors grpo_iso_loss is one op call: log p, the PPO epilogue and the argument checks run in the
    C++ kernel (issue 22's per-call overhead), with or without grad."""
    kw = loss_args()
    kw["v"].requires_grad_(grad)
    with _Ops() as ops:
        diffkern.grpo_iso_loss(**kw, beta=0.1)
    assert ops.called == ["diffkern.grpo_iso_loss.default"]


@pytest.mark.parametrize("variant", ("cfg+ref", "y+cfg+ref"))
@pytest.mark.parametrize("dynamic", (False, True))
@pytest.mark.parametrize("compiler", ("aot_eager", "inductor"))
@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_torch_compile_fullgraph_forward_and_backward(backend, compiler, dynamic, variant):
    torch._dynamo.reset()
    kw = make_loss_inputs((3, 2, 40), torch.float32, variant, device=device_for(backend))
    kw |= dict(log_prob_old=torch.tensor([0.5, 0.4, 0.6], device=kw["v"].device),
               advantages=torch.tensor([1.0, -1.0, 0.5], device=kw["v"].device))
    leaves = [kw["v"].requires_grad_(), kw["v_uncond"].requires_grad_()]

    def step(**a):
        loss, stats = diffkern.grpo_iso_loss(**a, beta=0.1)
        return loss, stats["clip_fraction"]
    with forced(backend):
        eager = step(**kw)
        eager_grads = torch.autograd.grad(eager[0], leaves)
        compiled = torch.compile(step, backend=compiler, fullgraph=True, dynamic=dynamic)(**kw)
        compiled_grads = torch.autograd.grad(compiled[0], leaves)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_cuda_tensors_use_triton_and_match_cpu(dtype):
    kw = make_loss_inputs((8, 16, 33, 17), dtype, "cfg+ref")
    args = op_args(kw)
    expected = torch.ops.diffkern.grpo_log_prob(*args)
    got = torch.ops.diffkern.grpo_log_prob(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)
