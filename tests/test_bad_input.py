"""The bad-input matrix: every public op and module entry point x wrong, extreme and non-finite inputs.

Each row is (entry point, case, call, expected): a specific exception naming the argument, or the float64
reference's answer (NaN/inf where it has them, finite values within the error model). The contract
(diffkern.testing.contract) classifies each outcome as ok, wrong or vague; the counting test wants 0 wrong
and 0 vague. Runs the default backends on CPU tensors (the C++ kernels; Python code around them).
"""
import math

import numpy as np
import pytest
import torch

import diffkern
from diffkern import _registry
from diffkern.dar import dar_gather
from diffkern.grpo import IsoTimestepSampler, advantages
from diffkern.nn import DARRouter, FlashGRPOLoss
from diffkern.ntrk.sampling import NTRKSampler
from diffkern.rmdm import RecursiveMDM, sample, sudoku
from diffkern.rmdm.reference import param_shapes
from diffkern.sampling import BaseSampler, SVDDSampler, best_of_n
from diffkern.sinks.processors import install_sink_processors
from diffkern.testing.contract import Call, Equals, Raises, Reference, outcome

F32 = torch.float32


def randn(*shape, seed=0, dtype=F32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def edit(base, **changes):
    """base's inputs with some replaced: changes[name] = f(inputs dict) -> value."""
    def inputs():
        kw = base()
        return kw | {k: f(kw) for k, f in changes.items()}
    return inputs


def kw_call(fn, inputs, expected, **fixed):
    """A row calling fn(**inputs(), **fixed); the Call passes the inputs positionally by name order."""
    names = list(inputs())
    return Call(lambda *a: fn(**dict(zip(names, a)), **fixed), lambda: list(inputs().values())), expected


# ---- valid inputs per entry point
def route_in():
    return dict(sources=[randn(2, 3, 8, seed=i) for i in range(3)], q=randn(8, seed=5), gain=1 + randn(8, seed=6) / 4)


def gather_in():
    return route_in() | dict(addends=[randn(2, 3, 8, seed=7 + i) for i in range(2)])


def step_in(B=3):
    return dict(x=randn(B, 2, 5), v=randn(B, 2, 5, seed=1), sigma=torch.full((B,), 0.6),
                sigma_next=torch.full((B,), 0.5), eps=randn(B, 2, 5, seed=2))


def loss_in(B=3):
    s = step_in(B)
    return dict(v=s["v"], sigma=s["sigma"], sigma_next=s["sigma_next"], log_prob_old=randn(B, seed=3),
                advantages=randn(B, seed=4), y=randn(B, 2, 5, seed=5) / 4)


def ntrk_in(B=2):
    return dict(mu=randn(B, 4, 6), sigma=torch.full((B,), 0.3), w=randn(B, 4, 6, seed=1), rho=torch.full((B,), 0.4),
                eps=randn(B, 4, 6, seed=2))


def project_in():
    return dict(x=randn(2, 24) * 2, tile=6)


def whiten_in():
    return dict(g=randn(2, 64) + 0.5)


def recurse_in(B=2, T=3, d=8, f=16, K=1):
    return dict(block_params=[[randn(*s, seed=10 * k + i) / 3 for i, s in enumerate(param_shapes(d, f))]
                              for k in range(K)], x=randn(B, T, d), n_iter=2, heads=2)


def attn_in(N_q=4, N_k=5, d=4):
    return dict(q=randn(1, 2, N_q, d), k=randn(1, 2, N_k, d, seed=1), v=randn(1, 2, N_k, d, seed=2))


def mass_in():
    a = attn_in()
    return dict(q=a["q"], k=a["k"])


def dominant_sink():
    """The issue's case: the suppressed key holds nearly all of a row's mass."""
    k = torch.zeros(1, 1, 3, 4)
    k[0, 0, 0] = 10.0
    return dict(q=torch.ones(1, 1, 2, 4), k=k, v=randn(1, 1, 3, 4))


def generic(fn, base, name, complex_dtype=True):
    """The rows every tensor argument gets: a numpy array, None, a Python list, the meta device (where other
    tensors are not: an op whose only tensor is on meta computes shapes, as torch ops do); a complex dtype."""
    rows = {
        f"{name} numpy": kw_call(fn, edit(base, **{name: lambda kw: np.asarray(kw[name])}),
                                 Raises(TypeError, name)),
        f"{name} None": kw_call(fn, edit(base, **{name: lambda kw: None}), Raises((TypeError, ValueError), name)),
        f"{name} list": kw_call(fn, edit(base, **{name: lambda kw: kw[name].tolist()}), Raises(TypeError, name)),
    }
    if sum(isinstance(v, torch.Tensor) for v in base().values()) > 1:
        rows[f"{name} meta"] = kw_call(fn, edit(base, **{name: lambda kw: kw[name].to("meta")}),
                                       Raises(ValueError, name))
    if complex_dtype:
        rows[f"{name} complex"] = kw_call(fn, edit(base, **{name: lambda kw: kw[name].to(torch.complex64)}),
                                          Raises(ValueError, name))
    return rows


def double(*names):
    """Every named input in float64 (lists of tensors included)."""
    def to64(x):
        return [t.double() for t in x] if isinstance(x, list) else x.double()
    return {n: (lambda n: lambda kw: to64(kw[n]))(n) for n in names}


def nan_at(name, index=0, value=math.nan):
    """inputs[name] (a tensor, or the first of a list) with one element set to `value`."""
    def change(kw):
        x = kw[name]
        t = (x[0] if isinstance(x, list) else x).clone()
        t.view(-1)[index] = value
        return [t, *x[1:]] if isinstance(x, list) else t
    return {name: change}


def triton(row):
    """The row run on the Triton backend (the interpreter on CPU tensors)."""
    call, expected = row
    return Call(call.fn, call.inputs, "triton"), expected


ROWS = {}


def rows(entry, table):
    ROWS.update({f"{entry}: {case}": row for case, row in table.items()})


# ---- DAR
route = diffkern.dar_route
rows("dar_route", {
    **generic(route, route_in, "q"), **generic(route, route_in, "gain"),
    "sources a tensor": kw_call(route, edit(route_in, sources=lambda kw: kw["sources"][0]),
                                Raises(TypeError, "sources")),
    "sources numpy entry": kw_call(route, edit(route_in, sources=lambda kw: [np.asarray(kw["sources"][0])]),
                                   Raises(TypeError, "sources[0]")),
    "sources None": kw_call(route, edit(route_in, sources=lambda kw: None), Raises(TypeError, "sources")),
    "no sources": kw_call(route, edit(route_in, sources=lambda kw: []), Raises(ValueError, "sources")),
    "int sources": kw_call(route, edit(route_in, sources=lambda kw: [s.long() for s in kw["sources"]]),
                           Raises(ValueError, "sources[0]")),
    "bool sources": kw_call(route, edit(route_in, sources=lambda kw: [s > 0 for s in kw["sources"]]),
                            Raises(ValueError, "sources[0]")),
    "2-d source": kw_call(route, edit(route_in, sources=lambda kw: [kw["sources"][0][0]]),
                          Raises(ValueError, "sources[0]")),
    "mixed dtypes": kw_call(route, edit(route_in, sources=lambda kw: [kw["sources"][0], kw["sources"][1].double()]),
                            Raises(ValueError, "sources[1]")),
    "meta source": kw_call(route, edit(route_in, sources=lambda kw: [kw["sources"][0], kw["sources"][1].to("meta")]),
                           Raises(ValueError, "sources[1]")),
    "q shape": kw_call(route, edit(route_in, q=lambda kw: randn(7)), Raises(ValueError, "q")),
    "d = 0": kw_call(route, edit(route_in, sources=lambda kw: [randn(2, 3, 0)], q=lambda kw: randn(0),
                                 gain=lambda kw: randn(0)), Raises(ValueError, "d")),
    "strided d": kw_call(route, edit(route_in, sources=lambda kw: [randn(2, 3, 16)[..., ::2]]),
                         Raises(ValueError, "sources[0]", "stride")),
    "eps negative": kw_call(route, route_in, Raises(ValueError, "eps"), eps=-1.0),
    "eps string": kw_call(route, route_in, Raises(TypeError, "eps"), eps="1e-6"),
    "eps nan": kw_call(route, route_in, Raises(ValueError, "eps"), eps=math.nan),
    "token-strided sources": kw_call(route, edit(route_in, sources=lambda kw: [randn(3, 2, 8).transpose(0, 1)]),
                                     Reference(8)),
    "zero batch": kw_call(route, edit(route_in, sources=lambda kw: [s[:0] for s in kw["sources"]]), Reference(24)),
    "float64": kw_call(route, edit(route_in, **double("sources", "q", "gain")), Reference(24)),
    "nan in a source": kw_call(route, edit(route_in, **nan_at("sources")), Reference(24)),
    "bfloat16, large and tiny sources": kw_call(route, edit(route_in, sources=lambda kw: [
        (s * 10.0**(30 - 30 * i)).bfloat16() for i, s in enumerate(kw["sources"])], q=lambda kw: kw["q"].bfloat16(),
        gain=lambda kw: kw["gain"].bfloat16()), Reference(24)),
    "float16 near its max": kw_call(route, edit(route_in, sources=lambda kw: [(s * 2e4).half() for s in kw["sources"]],
                                                q=lambda kw: kw["q"].half(), gain=lambda kw: kw["gain"].half()),
                                    Reference(24)),
    "inf in q": kw_call(route, edit(route_in, **nan_at("q", 3, math.inf)), Reference(24)),
    "near the float32 max": kw_call(route, edit(route_in, sources=lambda kw: [s * 1e37 for s in kw["sources"]],
                                                q=lambda kw: kw["q"] * 1e38), Reference(24)),
})
rows("dar_gather", {
    "addends a tensor": kw_call(dar_gather, edit(gather_in, addends=lambda kw: kw["addends"][0]),
                                Raises(TypeError, "addends")),
    "addend shape": kw_call(dar_gather, edit(gather_in, addends=lambda kw: [randn(2, 3, 7)]),
                            Raises(ValueError, "addends[0]")),
    "addend None": kw_call(dar_gather, edit(gather_in, addends=lambda kw: [None]), Raises(TypeError, "addends[0]")),
    "sources None": kw_call(dar_gather, edit(gather_in, sources=lambda kw: None), Raises(TypeError, "sources")),
    "nan in an addend": kw_call(dar_gather, edit(gather_in, **nan_at("addends")), Reference(32)),
})
router = DARRouter(8, 2, chunk_size=1)


def router_call(x0, l=0):
    hist = router.begin(x0)
    return router(hist, l)


rows("DARRouter", {
    "x0 numpy": (Call(router_call, lambda: [np.zeros((2, 3, 8), np.float32)]), Raises(TypeError, "x0")),
    "x0 wrong d": (Call(router_call, lambda: [randn(2, 3, 7)]), Raises(ValueError, "x0")),
    "sublayer index": (Call(router_call, lambda: [randn(2, 3, 8), 5]), Raises(ValueError, "sublayer index")),
    "float d": (Call(DARRouter, lambda: [8.5, 2]), Raises(TypeError, "d")),
    "float chunk_size": (Call(lambda c: DARRouter(8, 2, chunk_size=c), lambda: [1.5]), Raises(TypeError, "chunk_size")),
    "str eps": (Call(lambda e: DARRouter(8, 2, eps=e), lambda: ["1e-6"]), Raises(TypeError, "eps")),
    "negative eps": (Call(lambda x0: DARRouter(8, 2, eps=-1.0).run(x0, [torch.nn.Identity()] * 2), lambda: [randn(2, 3, 8)]),
                     Raises(ValueError, "eps")),
})

# ---- Flow-GRPO
step = diffkern.flow_sde_step
loss = diffkern.grpo_iso_loss


def sigmas(s, sn):
    return dict(sigma=lambda kw: torch.tensor([0.6, s, 0.6]), sigma_next=lambda kw: torch.tensor([0.5, sn, 0.5]))


def loss_of(fn):
    """grpo_iso_loss's (loss, stats) without the Python floats/None of stats (compared as tensors)."""
    def call(**kw):
        out, stats = fn(**kw)
        return out, stats["approx_kl"]
    return call


STEP_REF = Reference((10, 10, None, None, 10))  # x, v, sigma, sigma_next, eps: sigmas not perturbed
rows("flow_sde_step", {
    **generic(step, step_in, "x"), **generic(step, step_in, "v"), **generic(step, step_in, "sigma"),
    "eps numpy": kw_call(step, edit(step_in, eps=lambda kw: np.asarray(kw["eps"])), Raises(TypeError, "eps")),
    "int x": kw_call(step, edit(step_in, x=lambda kw: kw["x"].long()), Raises(ValueError, "x")),
    "v shape": kw_call(step, edit(step_in, v=lambda kw: kw["v"][:, :1]), Raises(ValueError, "v")),
    "non-contiguous x": kw_call(step, edit(step_in, x=lambda kw: kw["x"].transpose(1, 2).contiguous().transpose(1, 2)),
                                Raises(ValueError, "x", "contiguous")),
    "sigma [1]": kw_call(step, edit(step_in, sigma=lambda kw: kw["sigma"][:1]), Raises(ValueError, "sigma")),
    "int sigma": kw_call(step, edit(step_in, sigma=lambda kw: torch.ones(3, dtype=torch.long)),
                         Raises(ValueError, "sigma")),
    "meta sigma_next": kw_call(step, edit(step_in, sigma_next=lambda kw: kw["sigma_next"].to("meta")),
                               Raises(ValueError, "sigma_next")),
    "sigma = 0": kw_call(step, edit(step_in, **sigmas(0.0, 0.0)), Raises(ValueError, "sigma", "sigma_next")),
    "sigma < 0": kw_call(step, edit(step_in, **sigmas(-0.5, -0.6)), Raises(ValueError, "sigma", "sigma_next")),
    "sigma_next = sigma": kw_call(step, edit(step_in, **sigmas(0.5, 0.5)), Raises(ValueError, "sigma", "sigma_next")),
    "sigma_next > sigma": kw_call(step, edit(step_in, **sigmas(0.5, 0.7)), Raises(ValueError, "sigma", "sigma_next")),
    "sigma_next < 0": kw_call(step, edit(step_in, **sigmas(0.5, -0.1)), Raises(ValueError, "sigma", "sigma_next")),
    "nan sigma": kw_call(step, edit(step_in, **sigmas(math.nan, 0.5)), Raises(ValueError, "sigma", "sigma_next")),
    "sigma > 1 (sd3)": kw_call(step, edit(step_in, **sigmas(1.5, 0.5)), Raises(ValueError, "sigma", "sigma_next"),
                               std_rule="sd3"),
    "std_rule": kw_call(step, step_in, Raises(ValueError, "std_rule"), std_rule="ode"),
    "std_coef string": kw_call(step, step_in, Raises(TypeError, "std_coef"), std_coef="0.7"),
    "std_coef 0": kw_call(step, step_in, Raises(ValueError, "std_coef"), std_coef=0.0),
    "last step (sigma_next = 0)": kw_call(step, edit(step_in, **sigmas(0.2, 0.0)), STEP_REF),
    "sigma = 1 (wan)": kw_call(step, edit(step_in, **sigmas(1.0, 0.9)), STEP_REF),
    "sigma = 1 (sd3: Flow-GRPO's first step)": kw_call(step, edit(step_in, **sigmas(1.0, 0.9)), STEP_REF,
                                                       std_rule="sd3"),
    "sigma = 1 to sigma_next = 0 (sd3)": kw_call(step, edit(step_in, **sigmas(1.0, 0.0)), STEP_REF, std_rule="sd3"),
    "tiny step": kw_call(step, edit(step_in, **sigmas(0.5, 0.5 - 2**-20)), STEP_REF),
    "zero batch": kw_call(step, lambda: step_in(0), STEP_REF),
    "float64": kw_call(step, edit(step_in, **double("x", "v", "eps")), STEP_REF),
    "bfloat16": kw_call(step, edit(step_in, x=lambda kw: kw["x"].bfloat16(), v=lambda kw: kw["v"].bfloat16(),
                                   eps=lambda kw: kw["eps"].bfloat16()), STEP_REF),
    "float16, large latents": kw_call(step, edit(step_in, x=lambda kw: (kw["x"] * 1e4).half(),
                                                 v=lambda kw: (kw["v"] * 1e4).half(), eps=lambda kw: kw["eps"].half()),
                                      STEP_REF),
    "nan in x": kw_call(step, edit(step_in, **nan_at("x", 3)), STEP_REF),
    "inf in v": kw_call(step, edit(step_in, **nan_at("v", 12, math.inf)), STEP_REF),
})
rows("grpo_iso_loss", {
    **generic(loss, loss_in, "v"), **generic(loss, loss_in, "y"), **generic(loss, loss_in, "advantages"),
    "log_prob_old numpy": kw_call(loss, edit(loss_in, log_prob_old=lambda kw: np.asarray(kw["log_prob_old"])),
                                  Raises(TypeError, "log_prob_old")),
    "sigma None": kw_call(loss, edit(loss_in, sigma=lambda kw: None), Raises(ValueError, "sigma")),
    "y shape": kw_call(loss, edit(loss_in, y=lambda kw: kw["y"][:, :1]), Raises(ValueError, "y")),
    "x_next shape": kw_call(loss, edit(loss_in, y=lambda kw: None, x=lambda kw: kw["v"],
                                       x_next=lambda kw: kw["v"][:, :1]), Raises(ValueError, "x_next")),
    "x and y": kw_call(loss, edit(loss_in, x=lambda kw: kw["v"]), Raises(ValueError, "x", "y")),
    "sigma_next >= sigma": kw_call(loss, edit(loss_in, **sigmas(0.5, 0.5)), Raises(ValueError, "sigma", "sigma_next")),
    "sigma = 0": kw_call(loss, edit(loss_in, **sigmas(0.0, 0.0)), Raises(ValueError, "sigma", "sigma_next")),
    "sigma > 1 (sd3)": kw_call(loss, edit(loss_in, **sigmas(1.2, 0.5)), Raises(ValueError, "sigma", "sigma_next"),
                               std_rule="sd3"),
    "sigma = 1 (sd3)": kw_call(loss_of(loss), edit(loss_in, **sigmas(1.0, 0.5)),
                               Reference((10, None, None, None, 0, 10)), std_rule="sd3"),
    "beta > 0 without v_ref": kw_call(loss, loss_in, Raises(ValueError, "beta", "v_ref"), beta=0.1),
    "beta negative": kw_call(loss, loss_in, Raises(ValueError, "beta"), beta=-0.1),
    "clip_eps string": kw_call(loss, loss_in, Raises(TypeError, "clip_eps"), clip_eps="0.1"),
    "clip_eps bool": kw_call(loss, loss_in, Raises(TypeError, "clip_eps"), clip_eps=True),
    "beta bool": kw_call(loss, loss_in, Raises(TypeError, "beta"), beta=False),
    "cfg_scale without v_uncond": kw_call(loss, loss_in, Raises(ValueError, "cfg_scale", "v_uncond"), cfg_scale=2.0),
    "advantages [B+1]": kw_call(loss, edit(loss_in, advantages=lambda kw: randn(4)), Raises(ValueError, "advantages")),
    "valid": kw_call(loss_of(loss), loss_in, Reference((10, None, None, None, 0, 10))),
    "nan in v": kw_call(loss_of(loss), edit(loss_in, **nan_at("v", 4)), Reference((10, None, None, None, 0, 10))),
    "zero batch": kw_call(loss_of(loss), lambda: loss_in(0), Reference((10, None, None, None, 0, 10))),
})
grpo_module = FlashGRPOLoss()


def flash_in():
    kw = loss_in()
    del kw["advantages"]
    return kw | dict(rewards=randn(3, seed=9), prompt_ids=torch.tensor([0, 0, 1]))


rows("FlashGRPOLoss", {
    "rewards short": kw_call(grpo_module, edit(flash_in, rewards=lambda kw: kw["rewards"][:2],
                                               prompt_ids=lambda kw: kw["prompt_ids"][:2]),
                             Raises(ValueError, "rewards")),
    "float prompt_ids": kw_call(grpo_module, edit(flash_in, prompt_ids=lambda kw: torch.tensor([0.0, 0.5, 1.0])),
                                Raises(ValueError, "prompt_ids")),
    "rewards numpy": kw_call(grpo_module, edit(flash_in, rewards=lambda kw: np.asarray(kw["rewards"])),
                             Raises(TypeError, "rewards")),
    "rewards and advantages": kw_call(grpo_module, edit(flash_in, advantages=lambda kw: kw["rewards"]),
                                      Raises(ValueError, "rewards", "advantages")),
})
rows("IsoTimestepSampler", {
    "float num_steps": (Call(IsoTimestepSampler, lambda: [20.5]), Raises(TypeError, "num_steps")),
    "float prompt_ids": (Call(lambda ids: IsoTimestepSampler(20).sample(ids), lambda: [torch.tensor([0.0, 1.5])]),
                         Raises(ValueError, "prompt_ids")),
    "prompt_ids numpy": (Call(lambda ids: IsoTimestepSampler(20).sample(ids), lambda: [np.array([0, 1])]),
                         Raises(TypeError, "prompt_ids")),
})
rows("grpo.advantages", {
    "int rewards": kw_call(advantages, lambda: dict(rewards=torch.tensor([1, 2]), prompt_ids=torch.tensor([0, 0])),
                           Raises(ValueError, "rewards")),
    "float prompt_ids": kw_call(advantages, lambda: dict(rewards=randn(2), prompt_ids=torch.tensor([0.2, 0.7])),
                                Raises(ValueError, "prompt_ids")),
})

# ---- NoiseTilt
ntrk = diffkern.ntrk_step
project = diffkern.twoos_project
whiten = diffkern.whiten
NTRK_REF = Reference((0, None, 0, None, 0))
rows("ntrk_step", {
    **generic(ntrk, ntrk_in, "mu"), **generic(ntrk, ntrk_in, "w"),
    "eps numpy": kw_call(ntrk, edit(ntrk_in, eps=lambda kw: np.asarray(kw["eps"])), Raises(TypeError, "eps")),
    "meta sigma": kw_call(ntrk, edit(ntrk_in, sigma=lambda kw: kw["sigma"].to("meta")), Raises(ValueError, "sigma")),
    "complex sigma": kw_call(ntrk, edit(ntrk_in, sigma=lambda kw: kw["sigma"].to(torch.complex64)),
                             Raises(ValueError, "sigma")),
    "sigma string": kw_call(ntrk, edit(ntrk_in, sigma=lambda kw: "0.3"), Raises(TypeError, "sigma")),
    "sigma None": kw_call(ntrk, edit(ntrk_in, sigma=lambda kw: None), Raises(TypeError, "sigma")),
    "sigma [B+1]": kw_call(ntrk, edit(ntrk_in, sigma=lambda kw: torch.ones(3)), Raises(ValueError, "sigma")),
    "float rho 1.5": kw_call(ntrk, edit(ntrk_in, rho=lambda kw: 1.5), Raises(ValueError, "rho")),
    "float sigma < 0": kw_call(ntrk, edit(ntrk_in, sigma=lambda kw: -1.0), Raises(ValueError, "sigma")),
    "float seed": kw_call(ntrk, edit(ntrk_in, eps=lambda kw: None), Raises(TypeError, "seed"), seed=2.5),
    "float offset": kw_call(ntrk, edit(ntrk_in, eps=lambda kw: None), Raises(TypeError, "offset"), seed=1, offset=0.5),
    "negative offset": kw_call(ntrk, edit(ntrk_in, eps=lambda kw: None), Raises(ValueError, "offset"), seed=1,
                               offset=-1),
    "w shape": kw_call(ntrk, edit(ntrk_in, w=lambda kw: kw["w"][:, :2]), Raises(ValueError, "w")),
    "0-dim mu": kw_call(ntrk, edit(ntrk_in, mu=lambda kw: kw["mu"][0, 0, 0]), Raises(ValueError, "mu")),
    "rho 0 and 1": kw_call(ntrk, edit(ntrk_in, rho=lambda kw: torch.tensor([0.0, 1.0])), NTRK_REF),
    "zero batch": kw_call(ntrk, lambda: ntrk_in(0), NTRK_REF),
    "nan in mu": kw_call(ntrk, edit(ntrk_in, **nan_at("mu", 5)), NTRK_REF),
    "rho outside [0, 1] (tensor)": kw_call(ntrk, edit(ntrk_in, rho=lambda kw: torch.tensor([0.5, 1.5])), NTRK_REF),
})


def step_bwd_in():
    kw = ntrk_in()
    return dict(dx=kw["mu"], sigma=kw["sigma"], rho=kw["rho"], w_grad=True, eps_grad=True)


step_bwd = torch.ops.diffkern.ntrk_step_bwd
rows("ntrk_step_bwd", {
    "0-dim dx": kw_call(step_bwd, edit(step_bwd_in, dx=lambda kw: kw["dx"][0, 0, 0]), Raises(ValueError, "dx")),
    "int dx": kw_call(step_bwd, edit(step_bwd_in, dx=lambda kw: kw["dx"].long()), Raises(ValueError, "dx")),
    "dx not contiguous": kw_call(step_bwd, edit(step_bwd_in, dx=lambda kw: kw["dx"].transpose(1, 2)),
                                 Raises(ValueError, "dx")),
    "sigma [B+1]": kw_call(step_bwd, edit(step_bwd_in, sigma=lambda kw: torch.ones(3)), Raises(ValueError, "sigma")),
    "float16 rho": kw_call(step_bwd, edit(step_bwd_in, rho=lambda kw: kw["rho"].half()), Raises(ValueError, "rho")),
})
rows("twoos_project", {
    **generic(project, project_in, "x"),
    "float tile": kw_call(project, edit(project_in, tile=lambda kw: 6.0), Raises(TypeError, "tile")),
    "tile not dividing": kw_call(project, edit(project_in, tile=lambda kw: 5), Raises(ValueError, "tile")),
    "float passes": kw_call(project, project_in, Raises(TypeError, "passes"), passes=2.5),
    "passes -1": kw_call(project, project_in, Raises(ValueError, "passes"), passes=-1),
    "alpha string": kw_call(project, project_in, Raises(TypeError, "alpha"), alpha="0.1"),
    "alpha 2": kw_call(project, project_in, Raises(ValueError, "alpha"), alpha=2.0),
    "int x": kw_call(project, edit(project_in, x=lambda kw: kw["x"].long()), Raises(ValueError, "x")),
    "bands one tensor": kw_call(project, edit(project_in, tile=lambda kw: None), Raises(TypeError, "bands"),
                                bands=torch.zeros(4, 6)),
    "bands numpy": kw_call(project, edit(project_in, tile=lambda kw: None), Raises(TypeError, "bands"),
                           bands=(np.zeros((4, 6)), np.ones((4, 6)))),
    "bands shape": kw_call(project, edit(project_in, tile=lambda kw: None), Raises(ValueError, "band table"),
                           bands=(torch.zeros(3, 6), torch.ones(3, 6))),
    "nan in bands": kw_call(project, edit(project_in, tile=lambda kw: None), Raises(ValueError, "bands", "NaN"),
                            bands=(torch.full((4, 6), math.nan), torch.ones(4, 6))),
    "nan in x": kw_call(project, edit(project_in, **nan_at("x", 3)), Reference(0)),
    "inf in x": kw_call(project, edit(project_in, **nan_at("x", 7, -math.inf)), Reference(0)),
    "zero batch": kw_call(project, edit(project_in, x=lambda kw: kw["x"][:0]), Reference(0)),
    "float64": kw_call(project, edit(project_in, **double("x")), Reference(0)),
    "bfloat16": kw_call(project, edit(project_in, x=lambda kw: kw["x"].bfloat16()), Reference(0)),
    "huge values": kw_call(project, edit(project_in, x=lambda kw: kw["x"] * 1e38), Reference(0)),
    # a NaN never converges: 2 clipping passes (not the default 8) show the interpreted kernels keep it
    "nan in x, triton": triton(kw_call(project, edit(project_in, **nan_at("x", 3)), Reference(0), passes=2)),
})
rows("whiten", {
    **generic(whiten, whiten_in, "g", complex_dtype=False),
    "int g": kw_call(whiten, edit(whiten_in, g=lambda kw: kw["g"].long()), Raises(ValueError, "g")),
    "bool g": kw_call(whiten, edit(whiten_in, g=lambda kw: kw["g"] > 0), Raises(ValueError, "g")),
    "complex g": kw_call(whiten, edit(whiten_in, g=lambda kw: kw["g"].to(torch.complex64)), Raises(ValueError, "g")),
    "float tile": kw_call(whiten, whiten_in, Raises(TypeError, "tile"), tile=8.0),
    "unknown domain": kw_call(whiten, whiten_in, Raises(ValueError, "domain"), domains=("time",)),
    "alpha 0": kw_call(whiten, whiten_in, Raises(ValueError, "alpha"), alpha=0.0),
    "passes -1": kw_call(whiten, whiten_in, Raises(ValueError, "passes"), passes=-1),
    "scale 2^-90 (scale-invariant)": kw_call(whiten, edit(whiten_in, g=lambda kw: kw["g"] * 2.0**-90), Reference(64)),
    "nan in g": kw_call(whiten, edit(whiten_in, **nan_at("g", 70)), Reference(64)),
    "constant sample": kw_call(whiten, edit(whiten_in, g=lambda kw: torch.ones(2, 64)), Reference(64)),
})
rows("twoos_bands", {
    "float M": (Call(diffkern.twoos_bands, lambda: [4.0, 6]), Raises(ValueError, "M")),
    "bool D": (Call(diffkern.twoos_bands, lambda: [4, True]), Raises(ValueError, "D")),
    "alpha 1": (Call(diffkern.twoos_bands, lambda: [4, 6, 1.0]), Raises(ValueError, "alpha")),
    "alpha None": (Call(diffkern.twoos_bands, lambda: [4, 6, None]), Raises(ValueError, "alpha")),
    "chi2 without dof": (Call(lambda: diffkern.twoos_bands(4, 6, dist="chi2"), lambda: []), Raises(ValueError, "dof")),
})


def sampler_call(**kw):
    velocity = lambda x, t: -x  # noqa: E731
    reward = lambda x: -(x - 1).pow(2).flatten(1).sum(1)  # noqa: E731
    return NTRKSampler(velocity, reward, **kw).sample(randn(2, 16), torch.Generator().manual_seed(0))[0]


def toy_sampler(cls, **kw):
    return cls(lambda x, t: -x, lambda x: -(x - 1).pow(2).flatten(1).sum(1), steps=2, **kw)


rows("samplers", {
    "SVDD k 0": (Call(lambda: toy_sampler(SVDDSampler, k=0), lambda: []), Raises(ValueError, "k")),
    "SVDD k 2.5": (Call(lambda: toy_sampler(SVDDSampler, k=2.5), lambda: []), Raises(TypeError, "k")),
    "best_of_n n 0": (Call(lambda: best_of_n(toy_sampler(BaseSampler), lambda: randn(2, 4), 0), lambda: []),
                      Raises(ValueError, "n")),
})
rows("NTRKSampler", {
    "rho 1.5": (Call(lambda: sampler_call(steps=2, rho=1.5), lambda: []), Raises(ValueError, "rho")),
    "float steps": (Call(lambda: sampler_call(steps=2.5), lambda: []), Raises(TypeError, "steps")),
    "zero steps": (Call(lambda: sampler_call(steps=0), lambda: []), Raises(ValueError, "steps")),
})

# ---- R-MDM
recurse = diffkern.recurse
REC_REF = Reference(24)
rows("recurse", {
    **generic(recurse, recurse_in, "x"),
    "block_params a tensor": kw_call(recurse, edit(recurse_in, block_params=lambda kw: kw["block_params"][0][2]),
                                     Raises(TypeError, "block_params")),
    "numpy weight": kw_call(recurse, edit(recurse_in, block_params=lambda kw: [
        [np.asarray(w) if i == 2 else w for i, w in enumerate(kw["block_params"][0])]]),
        Raises(TypeError, "block_params[0][2]")),
    "11 tensors": kw_call(recurse, edit(recurse_in, block_params=lambda kw: [kw["block_params"][0][:11]]),
                          Raises(ValueError, "weights")),
    "weight shape": kw_call(recurse, edit(recurse_in, block_params=lambda kw: [
        [randn(3, 8) if i == 4 else w for i, w in enumerate(kw["block_params"][0])]]),
        Raises(ValueError, "weights[4]")),
    "n_iter 2.7": kw_call(recurse, edit(recurse_in, n_iter=lambda kw: 2.7), Raises(TypeError, "n_iter")),
    "n_iter 0": kw_call(recurse, edit(recurse_in, n_iter=lambda kw: 0), Raises(ValueError, "n_iter")),
    "n_iter None": kw_call(recurse, edit(recurse_in, n_iter=lambda kw: None), Raises(TypeError, "n_iter")),
    "heads 3": kw_call(recurse, edit(recurse_in, heads=lambda kw: 3), Raises(ValueError, "heads")),
    "heads 2.0": kw_call(recurse, edit(recurse_in, heads=lambda kw: 2.0), Raises(TypeError, "heads")),
    "mod shape": kw_call(recurse, recurse_in, Raises(ValueError, "mod"), mod=randn(2, 1, 6, 7)),
    "mod numpy": kw_call(recurse, recurse_in, Raises(TypeError, "mod"), mod=np.zeros((2, 1, 6, 8), np.float32)),
    "eps 0": kw_call(recurse, recurse_in, Raises(ValueError, "eps"), eps=0.0),
    "recompute 1": kw_call(recurse, recurse_in, Raises(TypeError, "recompute"), recompute=1),
    "float64": kw_call(recurse, edit(recurse_in, x=lambda kw: kw["x"].double(), block_params=lambda kw: [
        [w.double() for w in blk] for blk in kw["block_params"]]), REC_REF),
    "zero batch": kw_call(recurse, edit(recurse_in, x=lambda kw: kw["x"][:0]), REC_REF),
    "nan in x": kw_call(recurse, edit(recurse_in, **nan_at("x", 30)), REC_REF),
})


def recurse_bwd_in(n_iter=2):
    kw = recurse_in()
    x, weights = kw["x"], kw["block_params"][0]
    states = randn(n_iter, *x.shape, seed=3)
    return dict(dstates=states.clone(), x=x, states=states, weights=weights, mod=None, heads=2, eps=1e-5)


recurse_bwd = torch.ops.diffkern.rmdm_recurse_bwd
rows("rmdm_recurse_bwd", {
    "no iterations": kw_call(recurse_bwd, lambda: recurse_bwd_in(0), Raises(ValueError, "states")),
    "3-d states": kw_call(recurse_bwd, edit(recurse_bwd_in, states=lambda kw: kw["states"][0]),
                          Raises(ValueError, "states")),
    "dstates shape": kw_call(recurse_bwd, edit(recurse_bwd_in, dstates=lambda kw: kw["dstates"][:1]),
                             Raises(ValueError, "dstates")),
})


def keep_bwd_in(acts=lambda acts: acts):
    """rmdm_recurse_keep_bwd's arguments with the activations rmdm_recurse_keep returned, edited by `acts`."""
    kw = recurse_bwd_in()
    kw["states"], kept = torch.ops.diffkern.rmdm_recurse_keep(kw["x"], kw["weights"], None, 2, 2, 1e-5)
    return dict(kw, acts=acts(kept))


keep_bwd = torch.ops.diffkern.rmdm_recurse_keep_bwd
rows("rmdm_recurse_keep_bwd", {  # acts read by the layout of the other arguments: any other tensor is refused
    "acts short": kw_call(keep_bwd, lambda: keep_bwd_in(lambda a: a[:-1]), Raises(ValueError, "acts")),
    "acts float64": kw_call(keep_bwd, lambda: keep_bwd_in(lambda a: a.double()), Raises(ValueError, "acts")),
    "acts empty (the reference's)": kw_call(keep_bwd, lambda: keep_bwd_in(lambda a: a[:0]), Raises(ValueError, "acts")),
    "dstates shape": kw_call(keep_bwd, edit(keep_bwd_in, dstates=lambda kw: kw["dstates"][:1]),
                             Raises(ValueError, "dstates")),
})
mdm = RecursiveMDM(vocab=9, d=8, heads=2, K=1, L=2, seq_len=81)
puzzles, solutions = sudoku.generate(2, clues=40, seed=0)
rows("RecursiveMDM", {
    "float tokens": (Call(mdm, lambda: [torch.zeros(2, 81)]), Raises((TypeError, ValueError, RuntimeError), "z")),
    "n_iter 1.5": (Call(lambda z: mdm(z, n_iter=1.5), lambda: [torch.zeros(2, 81, dtype=torch.long)]),
                   Raises(TypeError, "n_iter")),
})
rows("rmdm.sample", {
    "float steps": (Call(lambda: sample(mdm, puzzles, puzzles > 0, 1.5), lambda: []), Raises(TypeError, "steps")),
    "float x_prompt": (Call(lambda: sample(mdm, puzzles.double(), puzzles > 0, 1), lambda: []),
                       Raises(ValueError, "x_prompt")),
    "prompt shape": (Call(lambda: sample(mdm, puzzles, (puzzles > 0)[:, :80], 1), lambda: []),
                     Raises(ValueError, "prompt")),
})
rows("sudoku", {
    "generate float n": (Call(sudoku.generate, lambda: [2.5, 40]), Raises(TypeError, "n")),
    "generate clues 16": (Call(sudoku.generate, lambda: [1, 16]), Raises(ValueError, "clues")),
    "generate n negative": (Call(sudoku.generate, lambda: [-1, 40]), Raises(ValueError, "n")),
    "count limit 2**31 (no narrowing)": (Call(sudoku.count_solutions, lambda: [puzzles, 2**31]),
                                         Equals(torch.ones(2, dtype=torch.long))),
    "count limit 2.5": (Call(sudoku.count_solutions, lambda: [puzzles, 2.5]), Raises(TypeError, "limit")),
    "count float puzzles": (Call(sudoku.count_solutions, lambda: [puzzles.double(), 2]), Raises(ValueError, "puzzles")),
    "count puzzles shape": (Call(sudoku.count_solutions, lambda: [puzzles[:, :80], 2]), Raises(ValueError, "puzzles")),
    "count digit 10": (Call(sudoku.count_solutions, lambda: [puzzles.clamp(max=9) + (puzzles == 9) * 1, 2]),
                       Raises(ValueError, "cells")),
    "count puzzles numpy": (Call(sudoku.count_solutions, lambda: [puzzles.numpy(), 2]), Raises(TypeError, "puzzles")),
    "is_valid shapes": (Call(sudoku.is_valid, lambda: [solutions, puzzles[:1]]), Raises(ValueError, "puzzles")),
    "vpr float boards": (Call(sudoku.vpr, lambda: [solutions.double() + 0.5, puzzles]), Raises(ValueError, "boards")),
    "board_accuracy numpy": (Call(sudoku.board_accuracy, lambda: [solutions.numpy(), solutions]),
                             Raises(TypeError, "boards")),
})

# ---- attention sinks
mass = diffkern.sink_mass
attend = diffkern.sink_attention
SINK_REF = Reference(5)
rows("sink_mass", {
    **generic(mass, mass_in, "q"), **generic(mass, mass_in, "k"),
    "n_query 2.7": kw_call(mass, mass_in, Raises(TypeError, "n_query"), n_query=2.7),
    "n_query 0": kw_call(mass, mass_in, Raises(ValueError, "n_query"), n_query=0),
    "head_dim 0": kw_call(mass, lambda: dict(q=torch.zeros(1, 2, 4, 0), k=torch.zeros(1, 2, 5, 0)),
                          Raises(ValueError, "head_dim")),
    "3-d q": kw_call(mass, edit(mass_in, q=lambda kw: kw["q"][0]), Raises(ValueError, "q")),
    "scale string": kw_call(mass, mass_in, Raises(TypeError, "scale"), scale="1"),
    "no keys": kw_call(mass, edit(mass_in, k=lambda kw: kw["k"][:, :, :0]), Raises(ValueError, "k")),
    "nan in q": kw_call(mass, edit(mass_in, **nan_at("q", 1)), SINK_REF),
    "zero batch": kw_call(mass, edit(mass_in, q=lambda kw: kw["q"][:0], k=lambda kw: kw["k"][:0]), SINK_REF),
    "large logits": kw_call(mass, edit(mass_in, q=lambda kw: kw["q"] * 100), SINK_REF),
    "float16": kw_call(mass, edit(mass_in, q=lambda kw: kw["q"].half(), k=lambda kw: kw["k"].half()), SINK_REF),
})
rows("sink_attention", {
    **generic(attend, attn_in, "v"),
    "head_dim 0": kw_call(attend, lambda: dict(q=torch.zeros(1, 2, 4, 0), k=torch.zeros(1, 2, 5, 0),
                                               v=torch.zeros(1, 2, 5, 0)), Raises(ValueError, "head_dim")),
    "n_query 2.7": kw_call(attend, attn_in, Raises(TypeError, "n_query"), n_query=2.7),
    "k_sink 1.0": kw_call(attend, attn_in, Raises(ValueError, "k_sink"), k_sink=1.0),
    "k_sink -1": kw_call(attend, attn_in, Raises(ValueError, "k_sink"), k_sink=-1),
    "mode": kw_call(attend, attn_in, Raises(ValueError, "mode"), mode="top"),
    "bias > 0": kw_call(attend, attn_in, Raises(ValueError, "bias"), bias=1.0),
    "bias string": kw_call(attend, attn_in, Raises(TypeError, "bias"), bias="-1e4"),
    "random without seed": kw_call(attend, attn_in, Raises(ValueError, "seed"), mode="random"),
    "float seed": kw_call(attend, attn_in, Raises(TypeError, "seed"), mode="random", seed=1.5),
    "float call_index": kw_call(attend, attn_in, Raises(TypeError, "call_index"), mode="random", seed=1,
                                call_index=0.5),
    "requires grad": kw_call(attend, edit(attn_in, q=lambda kw: kw["q"].requires_grad_()),
                             Raises(RuntimeError, "forward-only")),
    "valid": kw_call(attend, attn_in, SINK_REF),
    "every key suppressed": kw_call(attend, attn_in, SINK_REF, k_sink=5),
    "dominant suppressed key": kw_call(attend, dominant_sink, SINK_REF),
    "dominant suppressed key, bfloat16": kw_call(attend, edit(dominant_sink, **{
        n: (lambda n: lambda kw: kw[n].bfloat16())(n) for n in ("q", "k", "v")}), SINK_REF),
    "nan in v": kw_call(attend, edit(attn_in, **nan_at("v", 2)), SINK_REF),
    "bias -inf": kw_call(attend, attn_in, SINK_REF, bias=-math.inf),
    "intervention": kw_call(attend, attn_in, Raises(ValueError, "intervention"), intervention="soft"),
    "alpha -1": kw_call(attend, attn_in, Raises(ValueError, "alpha"), intervention="scale", alpha=-1.0),
    "alpha inf": kw_call(attend, attn_in, Raises(ValueError, "alpha"), intervention="value", alpha=math.inf),
    "alpha nan": kw_call(attend, attn_in, Raises(ValueError, "alpha"), intervention="scale", alpha=math.nan),
    "alpha string": kw_call(attend, attn_in, Raises(TypeError, "alpha"), intervention="value", alpha="0.5"),
    "alpha with mask": kw_call(attend, attn_in, Raises(ValueError, "alpha"), alpha=0.5),
    "bias with scale": kw_call(attend, attn_in, Raises(ValueError, "bias"), intervention="scale", bias=-5.0),
    "scale alpha 3": kw_call(attend, attn_in, SINK_REF, intervention="scale", alpha=3.0),
    "scale alpha 0, every key": kw_call(attend, attn_in, SINK_REF, k_sink=5, intervention="scale"),
    "value": kw_call(attend, attn_in, SINK_REF, intervention="value"),
    "value, every key": kw_call(attend, attn_in, SINK_REF, k_sink=5, intervention="value", alpha=0.5),
    "dominant key, scale alpha 1e-3": kw_call(attend, dominant_sink, SINK_REF, intervention="scale", alpha=1e-3),
    "dominant key, value": kw_call(attend, dominant_sink, SINK_REF, intervention="value"),
    "dominant key, scale alpha 1e30": kw_call(attend, dominant_sink, SINK_REF, intervention="scale", alpha=1e30),
    "anti_sink": kw_call(attend, attn_in, SINK_REF, mode="anti_sink", k_sink=1),
    "anti_sink, N_k < n_query": kw_call(attend, edit(attn_in, k=lambda kw: kw["k"][:, :, :3],
                                                     v=lambda kw: kw["v"][:, :, :3]), Raises(ValueError, "mode"),
                                        mode="anti_sink"),
    "anti_sink, no queries": kw_call(attend, edit(attn_in, q=lambda kw: kw["q"][:, :, :0]), SINK_REF, mode="anti_sink"),
    "anti_sink with stats, N_k < 5": kw_call(attend, edit(attn_in, k=lambda kw: kw["k"][:, :, :4],
                                                          v=lambda kw: kw["v"][:, :, :4]), SINK_REF,
                                             mode="anti_sink", return_stats=True),
})
given = diffkern.sink_attention_given


def given_in():
    return attn_in() | dict(idx=torch.tensor([[[0], [4]]]))


rows("sink_attention_given", {
    **generic(given, given_in, "idx"),
    "valid": kw_call(given, given_in, SINK_REF),
    "per-sample indices [B, K]": kw_call(given, edit(given_in, idx=lambda kw: torch.tensor([[4, 0, 2]])), SINK_REF),
    "no indices": kw_call(given, edit(given_in, idx=lambda kw: kw["idx"][..., :0]), SINK_REF),
    "duplicate indices": kw_call(given, edit(given_in, idx=lambda kw: torch.tensor([[1, 1, 3]])), SINK_REF),
    "every key, bias -inf, all rows": kw_call(given, edit(given_in, idx=lambda kw: torch.arange(5)[None, None]),
                                              SINK_REF, bias=-math.inf, row_scope="all"),
    "index N_k": kw_call(given, edit(given_in, idx=lambda kw: torch.tensor([[5]])), Raises(ValueError, "idx")),
    "index -1": kw_call(given, edit(given_in, idx=lambda kw: torch.tensor([[-1]])), Raises(ValueError, "idx")),
    "int32 indices": kw_call(given, edit(given_in, idx=lambda kw: kw["idx"].int()),
                             Raises(ValueError, "idx")),
    "1-d indices": kw_call(given, edit(given_in, idx=lambda kw: torch.tensor([0])), Raises(ValueError, "idx")),
    "indices heads 3": kw_call(given, edit(given_in, idx=lambda kw: torch.zeros(1, 3, 1, dtype=torch.int64)),
                               Raises(ValueError, "idx")),
    "more indices than keys": kw_call(given, edit(given_in, idx=lambda kw: torch.zeros(1, 1, 6, dtype=torch.int64)),
                                      Raises(ValueError, "idx")),
    "bias > 0": kw_call(given, given_in, Raises(ValueError, "bias"), bias=1.0),
    "row_scope": kw_call(given, given_in, Raises(ValueError, "row_scope"), row_scope="text"),
    "value intervention": kw_call(given, given_in, Raises(ValueError, "intervention"), intervention="value"),
    "scale alpha 3": kw_call(given, given_in, SINK_REF, intervention="scale", alpha=3.0),
    "scale alpha 0, dominant key": kw_call(given, edit(dominant_sink, idx=lambda kw: torch.tensor([[0]])), SINK_REF,
                                           intervention="scale"),
    "nan in k": kw_call(given, edit(given_in, **nan_at("k", 3)), SINK_REF),
    "dominant given key": kw_call(given, edit(dominant_sink, idx=lambda kw: torch.tensor([[0]])), SINK_REF),
    "requires grad": kw_call(given, edit(given_in, v=lambda kw: kw["v"].requires_grad_()),
                             Raises(RuntimeError, "forward-only")),
})
fwd = torch.ops.diffkern.sink_attention_fwd
rows("sink_attention_fwd", {
    "row_top 9": kw_call(fwd, attn_in, Raises(ValueError, "row_top"), n_query=4, scale=0.5, row_top=9),
    "row_top -1": kw_call(fwd, attn_in, Raises(ValueError, "row_top"), n_query=4, scale=0.5, row_top=-1),
    "row_top 8, N_k < 8": kw_call(fwd, attn_in, SINK_REF, n_query=4, scale=0.5, row_top=8),
})

rows("backend", {
    "unknown name": (Call(lambda name: diffkern.backend(name).__enter__(), lambda: ["gpu"]),
                     Raises(ValueError, "unknown backend")),
})


class _Model:
    """The two members of a diffusers model install_sink_processors uses."""

    def __init__(self):
        self.attn_processors = {f"blocks.{i}.attn.processor": object() for i in range(3)}

    def set_attn_processor(self, processors):
        self.attn_processors = processors


rows("install_sink_processors", {
    "layer index 5": (Call(install_sink_processors, lambda: [_Model(), {5}]), Raises(ValueError, "layers")),
    "layer 1.0": (Call(install_sink_processors, lambda: [_Model(), [1.0]]), Raises(ValueError, "layers")),
    "layer name": (Call(install_sink_processors, lambda: [_Model(), ["blocks.9.attn.processor"]]),
                   Raises(ValueError, "blocks.9")),
})


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input(name):
    """Each row: the specific error naming the argument, or the float64 reference's answer."""
    kind, what = outcome(*ROWS[name])
    assert kind == "ok", f"{name}: {kind}: {what}"


def test_matrix_counts_no_wrong_and_no_vague():
    """The whole matrix counted: 0 wrong and 0 vague (the issue's bar; a crash ends the process)."""
    counts, bad = {"ok": 0, "wrong": 0, "vague": 0}, []
    for name, row in ROWS.items():
        kind, what = outcome(*row)
        counts[kind] += 1
        if kind != "ok":
            bad.append(f"{kind}: {name}: {what}")
    assert counts["wrong"] == counts["vague"] == 0, f"{counts}\n" + "\n".join(bad)
    assert counts["ok"] == len(ROWS) >= 250


def test_the_contract_tells_ok_wrong_and_vague_apart():
    """The classifier itself: a result off the reference is wrong, an error not naming the argument vague."""
    def error(t):
        raise ValueError("op: something is off")
    def kernel(t, off):  # off: what the "kernel" (no backend forced) adds to the reference's answer
        return t + (0.0 if _registry._forced else off)
    x = lambda: [randn(4)]  # noqa: E731
    assert outcome(Call(lambda t: kernel(t, 0.0), x), Reference(0))[0] == "ok"
    assert outcome(Call(lambda t: kernel(t, 1e-5), x), Reference(0))[0] == "wrong"
    assert outcome(Call(lambda t: kernel(t, math.nan), x), Reference(0))[0] == "wrong"
    assert outcome(Call(lambda t: t.sum(0) if t.dtype == F32 else t, x), Reference(0))[0] == "wrong"
    assert outcome(Call(lambda t: t.missing(), x), Reference(0))[0] == "vague"
    assert outcome(Call(lambda t: t, x), Raises(ValueError, "t"))[0] == "wrong"
    assert outcome(Call(error, x), Raises(ValueError, "something"))[0] == "ok"
    assert outcome(Call(error, x), Raises(ValueError, "t must"))[0] == "vague"
    assert outcome(Call(error, x), Raises(TypeError, "something"))[0] == "vague"
