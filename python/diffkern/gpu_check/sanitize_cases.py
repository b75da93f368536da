"""Tiny calls of every CUDA C++ kernel, forward and backward, for compute-sanitizer to watch:
`python -m diffkern.gpu_check.sanitize_cases [--device cuda|harness|cpu]`.

On CUDA every call runs on the cuda backend (csrc/cuda/*.cu): route_fwd/route_bwd/route_reduce
(dar_route, static, per-sample and per-token queries), sde_step + finalize (flow_sde_step),
log_prob_fwd/log_prob_bwd + finalize (grpo_iso_loss: pair and y forms, KL and CFG), ntrk_step (eps
given and drawn in-kernel, and its backward). Shapes are awkward on purpose: odd widths, more than one
2048-element tile, and latents 2 bytes off their 16-byte alignment (the kernels' scalar path).
`--device harness` (the dry run, where the harness is built) runs the same kernels on CPU tensors in the
host-execution harness (diffkern.testing.cuda_harness), whose bounds-checked pointers and shared-memory
race detector are the CPU's stand-in for memcheck and racecheck; `--device cpu` runs the C++ CPU
kernels, which only proves the script runs.
Prints one line per case and "cases done" at the end; any exception exits non-zero.
"""
from __future__ import annotations

import argparse

import torch

DTYPES = (torch.bfloat16, torch.float32)
LATENT_SIZES = (37, 2 * 2048 + 5)


def _randn(shape, dtype, device, gen, offset: int = 0):
    """randn of `shape`, stored `offset` elements into a fresh buffer (offset 1: 2 or 4 bytes misaligned)."""
    n = 1
    for s in shape:
        n *= s
    flat = torch.empty(n + offset, dtype=dtype, device=device)
    flat[offset:] = torch.randn(n, generator=gen).to(device, dtype)
    return flat[offset:].view(shape)


def _grads(out, inputs, gen):
    dout = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    return torch.autograd.grad(out, inputs, dout)


def dar_route_cases(device, dtype, gen):
    import diffkern
    B, T, d, n = 2, 5, 37, 3
    for q_shape in ((d,), (B, d), (B, T, d)):
        sources = [_randn((B, T, d), dtype, device, gen).requires_grad_() for _ in range(n)]
        q = _randn(q_shape, dtype, device, gen).requires_grad_()
        gain = _randn((d,), dtype, device, gen).requires_grad_()
        _grads(diffkern.dar_route(sources, q, gain), [*sources, q, gain], gen)
        yield f"dar_route q{list(q_shape)}"


def _sigmas(B, device):
    from diffkern.grpo import reference
    sigmas = reference.flow_sigmas()
    steps = torch.arange(B) % 10
    return sigmas[steps].float().to(device), sigmas[steps + 1].float().to(device)


def grpo_cases(device, dtype, gen):
    import diffkern
    B = 3
    sigma, sigma_next = _sigmas(B, device)
    for D in LATENT_SIZES:
        for offset in (0, 1):
            x, v, eps = (_randn((B, D), dtype, device, gen, offset) for _ in range(3))
            x_next, y, log_prob, _ = diffkern.flow_sde_step(x, v, sigma, sigma_next, eps)
            yield f"flow_sde_step D={D} offset={offset}"
            adv = torch.linspace(-1.0, 1.0, B, device=device)
            for form in ("pair", "y", "kl+cfg"):
                vv = v.detach().clone().requires_grad_()
                extra = {"y": y} if form == "y" else {"x": x, "x_next": x_next}
                inputs = [vv]
                if form == "kl+cfg":
                    v_uncond = _randn((B, D), dtype, device, gen, offset).requires_grad_()
                    extra.update(beta=0.1, v_ref=_randn((B, D), dtype, device, gen, offset), cfg_scale=4.0,
                                 v_uncond=v_uncond)
                    inputs.append(v_uncond)
                loss, _ = diffkern.grpo_iso_loss(vv, sigma=sigma, sigma_next=sigma_next, log_prob_old=log_prob,
                                                 advantages=adv, **extra)
                torch.autograd.grad(loss, inputs)
                yield f"grpo_iso_loss {form} D={D} offset={offset}"


def ntrk_cases(device, dtype, gen):
    import diffkern
    B = 3
    for D in LATENT_SIZES:
        for offset in (0, 1):
            mu, w, eps = (_randn((B, D), dtype, device, gen, offset).requires_grad_() for _ in range(3))
            _grads(diffkern.ntrk_step(mu, 0.3, w, 0.5, eps=eps), [mu, w, eps], gen)
            diffkern.ntrk_step(mu.detach(), 0.3, w.detach(), 0.5, seed=1)
            yield f"ntrk_step D={D} offset={offset}"


CASES = (dar_route_cases, grpo_cases, ntrk_cases)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "harness", "cpu"))
    args = parser.parse_args(argv)
    import contextlib

    import diffkern
    if args.device == "harness":
        from diffkern.testing import cuda_harness
        cuda_harness.load()
    device = torch.device("cpu" if args.device == "harness" else args.device)
    gen = torch.Generator().manual_seed(0)
    with diffkern.backend("cuda") if args.device != "cpu" else contextlib.nullcontext():
        for dtype in DTYPES:
            for cases in CASES:
                for name in cases(device, dtype, gen):
                    print(f"case {name} {str(dtype).removeprefix('torch.')}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print("cases done", flush=True)


if __name__ == "__main__":
    main()
