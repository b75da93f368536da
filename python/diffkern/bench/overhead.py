"""Per-call overhead of the public ops at tiny shapes, with and without grad, against a trivial custom op.

    python -m diffkern.bench.overhead [--quick] [--threads N]

At these shapes the kernels do almost nothing, so a call's time is the Python wrapper, the dispatcher and,
with inputs requiring grad, the autograd node: what a network of many small routing ops (a DiT-XL forward
calls 57) pays per op. The yardstick is a `torch.library.custom_op` that clones one [2, 4] tensor, with an
autograd formula registered (torch.library's own Python autograd path), called the same two ways. One
thread (or --threads), CPU; every candidate is timed round-robin in one process (diffkern.bench.timer), so the
ratios compare like with like on a busy machine.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

import diffkern

from .timer import time_interleaved
from .timer import threads as torch_threads

B = 2


@torch.library.custom_op("diffkern_bench::identity", mutates_args=())
def trivial(x: torch.Tensor) -> torch.Tensor:
    """The yardstick: one clone, as a custom op."""
    return x.clone()


@trivial.register_fake
def _(x):
    return torch.empty_like(x)


trivial.register_autograd(lambda ctx, grad: grad)


def _randn(*shape, seed: int, grad: bool) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(grad)


def _calls(grad: bool) -> dict:
    """Each public op's call on tiny inputs (leaves requiring grad when `grad`)."""
    from .. import rmdm
    from ..grpo import reference as grpo_reference
    sources = [_randn(B, 2, 8, seed=i, grad=grad) for i in range(3)]
    q, gain = _randn(8, seed=3, grad=grad), _randn(8, seed=4, grad=grad)
    mu, w, eps = (_randn(B, 4, seed=5 + i, grad=grad) for i in range(3))
    sigma, rho = torch.full((B,), 0.5), torch.full((B,), 0.3)
    sigmas = grpo_reference.flow_sigmas()
    s, s_next = sigmas[[2, 3]].float(), sigmas[[3, 4]].float()
    x, v = _randn(B, 4, seed=8, grad=False), _randn(B, 4, seed=9, grad=grad)
    y = diffkern.flow_sde_step(x, v.detach(), s, s_next, eps=eps.detach())[1]
    old, adv = torch.zeros(B), torch.tensor([1.0, -1.0])
    blocks = [[_randn(*shape, seed=20 + i, grad=grad) for i, shape in enumerate(rmdm.reference.param_shapes(4, 8))]]
    h = _randn(1, 2, 4, seed=40, grad=grad)
    return {
        "dar_route": lambda: diffkern.dar_route(sources, q, gain),
        "ntrk_step": lambda: diffkern.ntrk_step(mu, sigma, w, rho, eps=eps),
        "flow_sde_step": lambda: diffkern.flow_sde_step(x, v, s, s_next, eps=eps),
        "grpo_iso_loss": lambda: diffkern.grpo_iso_loss(v, sigma=s, sigma_next=s_next, log_prob_old=old,
                                                        advantages=adv, y=y),
        "grpo_log_prob (log p alone)": lambda: torch.ops.diffkern.grpo_log_prob(
            v, None, y, s, s_next, None, None, 1.0, 0, grpo_reference.WAN_STD_COEF),
        "recurse": lambda: diffkern.recurse(blocks, h, 1, heads=1),
        "trivial custom op": lambda: trivial(mu),
    }


def measure(rounds: int = 15, warmup: int = 50, min_sample_s: float = 0.01, threads: int = 1) -> list[dict]:
    """Rows of us per call with and without grad, and the with-grad call over the trivial op's with-grad call,
    on `threads` threads."""
    with torch_threads(threads):
        fns = {(name, grad): fn for grad in (True, False) for name, fn in _calls(grad).items()}
        timings = time_interleaved(fns, warmup, rounds, min_sample_s)
    us = {key: t.median_s * 1e6 for key, t in timings.items()}
    yardstick = us[("trivial custom op", True)]
    return [{"op": name, "grad_us": us[(name, True)], "no_grad_us": us[(name, False)],
             "trivial_grad_us": yardstick, "grad_over_trivial_grad": us[(name, True)] / yardstick}
            for name in _calls(False)]


def markdown(rows: list[dict], rounds: int, threads: int = 1) -> str:
    out = [f"## Per-call overhead (CPU, {threads} thread{'s' if threads > 1 else ''}, tiny shapes, median us per call)",
           "",
           "| op | with grad us | without grad us | grad - no grad us | trivial custom op with grad us "
           "| with grad / trivial with grad |", "|---|---|---|---|---|---|"]
    out += [f"| {r['op']} | {r['grad_us']:.1f} | {r['no_grad_us']:.1f} | {r['grad_us'] - r['no_grad_us']:.1f} | "
            f"{r['trivial_grad_us']:.1f} | {r['grad_over_trivial_grad']:.2f}x |" for r in rows]
    out += ["", f"Median of {rounds} samples per candidate, taken round-robin in one process. With grad: the "
            "inputs (every differentiable one; flow_sde_step's v) require grad and the call builds the autograd "
            "node; the forward call alone is timed. grpo_iso_loss is one op (log p, the PPO loss, its statistics "
            "and the argument checks in one C++ kernel; the next row is its log p op alone); recurse runs one block "
            "at d=4, "
            "where the kernel itself outlasts the trivial op (grad - no grad is its autograd cost). Bar (issue "
            "22): with grad <= 1.5x the trivial custom op with grad."]
    return "\n".join(out) + "\n"


def report(quick: bool, out: str | None, mode=None, threads: int = 1) -> str:
    """The harness's REPORT_MODULES entry: writes overhead.json / overhead.md to `out` and returns the Markdown.
    Its own sample counts (quick: 3 rounds; else 15 rounds of 10 ms samples): `mode`'s suit millisecond calls."""
    rounds = 3 if quick else 15
    rows = measure(rounds=rounds, warmup=5 if quick else 50, min_sample_s=0.002 if quick else 0.01, threads=threads)
    md = markdown(rows, rounds, threads)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "overhead.json"), "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.join(out, "overhead.md"), "w") as f:
            f.write(md)
    return md


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    args = parser.parse_args(argv)
    print(report(args.quick, None, threads=args.threads))


if __name__ == "__main__":
    main()
