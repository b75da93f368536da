"""This machine's limits on the CPU, measured in the run that judges against them: streaming bandwidth and the
GEMM library's throughput, each at the working set or shapes of the op it judges, at the current thread count.

Bandwidth (STREAM-like, torch ops, float32, one call moves `nbytes`):
  copy   dst = src                 two arrays of nbytes/2: reads nbytes/2, writes nbytes/2
  triad  a = b + 3 c               three arrays of nbytes/3: reads 2 nbytes/3, writes nbytes/3
  read   sum(x)                    one array of nbytes, read (for the ops that mostly read: a store also costs
                                   a write-allocate read, which no count here includes)
  copy_fresh   dst = src.clone()     as copy, into a tensor allocated by the call
  triad_fresh  a = b + 3 c (no out)  as triad, into a tensor allocated by the call
Bytes count each array element read or written once, as STREAM counts them. copy, triad and read write into
outputs allocated once; the *_fresh kernels are the yardstick of an op that returns a new tensor: the memory
allocator (glibc, through torch's CPU allocator) hands a large block back to the kernel when it is freed and
maps it again on the next call, so every call also faults the output's pages in and has them zeroed (at 67 MB
here: ~5 ms for copy_, ~40 ms for clone, 1 thread). The working set of one call is `nbytes`, the same as an op whose
minimal traffic is `nbytes`, so a case that fits in the caches is judged against cache bandwidth, and one
that does not against memory. torch's copy_ and add(out=) reach what an OpenMP C++ loop compiled with -O3
-march=native reaches on this machine (checked when this module was written), so the torch ops are the
yardstick. The limit is the fastest of the three.

Pass structure (`pass_calls`): the yardstick of a fused kernel whose passes each read and write several arrays in
one sweep, which torch's ops do not cover (none writes several outputs in one sweep, as a fused backward does). One call
runs the op's passes in order, pass i reading R_i float32 arrays and writing W_i others in one sweep
(diffkern::stream_pass, csrc/cpu/stream.cpp: a plain compiled loop, every output = the sum of the inputs), every
array distinct, as the op's are, outputs allocated once (as the CPU output cache hands an op's output blocks back
every call). "passes" stores plainly, "passes_nt" with streaming (non-temporal) stores, which skip the read of each
written line when the passes' arrays do not stay in the last-level cache; the limit is the faster of the two.
`python -m diffkern.bench.machine --passes 3,1 1,2` checks it against torch doing the same passes with its own ops.

GEMM throughput: torch.mm / torch.bmm in float32 (the library torch calls: oneDNN/MKL on x86) on given
shapes, FLOPs = 2 batch m n k per product, the products run back to back.

The `*_calls` functions return the callables, for a caller that times them interleaved with the op they
judge (diffkern.bench.cpu_gap does: a slow spell of a shared machine then hits both alike); `bandwidth`
and `gemm_throughput` time them alone (`python -m diffkern.bench.machine` prints both at a few sizes).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import _ops, _registry
from .timer import threads as _threads
from .timer import time_interleaved

STREAM_KERNELS = ("copy", "triad", "read")
FRESH_KERNELS = ("copy_fresh", "triad_fresh")
TRIAD_SCALAR = 3.0


@dataclass(frozen=True)
class Gemm:
    """`batch` products C[m, n] = A[m, k] @ B[k, n] (batch 1: torch.mm, else torch.bmm)."""
    batch: int
    m: int
    n: int
    k: int

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.n * self.k

    def backward(self) -> tuple[Gemm, Gemm]:
        """The two products of its backward when both operands need gradients: dA = dC B^T, dB = A^T dC."""
        return Gemm(self.batch, self.m, self.k, self.n), Gemm(self.batch, self.k, self.n, self.m)


def _randn(shape, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype)


def stream_calls(nbytes: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, Callable[[], object]]:
    """{"copy": fn, "triad": fn, "read": fn, "copy_fresh": fn, "triad_fresh": fn}: each call moves `nbytes`
    (rounded down to whole elements per array) between arrays allocated here, outputs included (first-touched
    before timing), or, for the *_fresh kernels, into an output the call allocates."""
    if nbytes <= 0:
        raise ValueError(f"nbytes must be positive, got {nbytes}")
    gen, item = torch.Generator().manual_seed(seed), torch.finfo(dtype).bits // 8
    n2, n3 = max(1, nbytes // (2 * item)), max(1, nbytes // (3 * item))
    src, dst = _randn(n2, gen, dtype), torch.zeros(n2, dtype=dtype)
    b, c, a = _randn(n3, gen, dtype), _randn(n3, gen, dtype), torch.zeros(n3, dtype=dtype)
    x, total = _randn(max(1, nbytes // item), gen, dtype), torch.zeros((), dtype=dtype)
    return {"copy": lambda: dst.copy_(src), "triad": lambda: torch.add(b, c, alpha=TRIAD_SCALAR, out=a),
            "read": lambda: torch.sum(x, dim=0, out=total), "copy_fresh": src.clone,
            "triad_fresh": lambda: torch.add(b, c, alpha=TRIAD_SCALAR)}


def stream_bytes(nbytes: int, dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """The bytes one call of each of stream_calls(nbytes) moves (nbytes, less the rounding to whole elements)."""
    item = torch.finfo(dtype).bits // 8
    copy, triad = 2 * item * max(1, nbytes // (2 * item)), 3 * item * max(1, nbytes // (3 * item))
    return {"copy": copy, "triad": triad, "read": item * max(1, nbytes // item), "copy_fresh": copy,
            "triad_fresh": triad}


PASS_KERNELS = ("passes", "passes_nt")
Passes = Sequence[tuple[int, int]]  # (arrays read, arrays written) of each pass, in order


def _pass_arrays(passes: Passes, numel: int, seed: int) -> list[tuple[list, list]]:
    if numel <= 0:
        raise ValueError(f"numel must be positive, got {numel}")
    if not passes or any(not (1 <= r <= 4 and 1 <= w <= 3) for r, w in passes):
        raise ValueError(f"passes must be (reads, writes) pairs with 1 <= reads <= 4 and 1 <= writes <= 3, "
                         f"got {list(passes)}")
    gen = torch.Generator().manual_seed(seed)
    return [([_randn(numel, gen, torch.float32) for _ in range(r)], [torch.zeros(numel) for _ in range(w)])
            for r, w in passes]


@_registry.register_fake("diffkern::stream_pass")
def _stream_pass_fake(reads, writes, nontemporal):
    """Writes its outputs in place and returns nothing: no fake outputs to make."""


def pass_calls(passes: Passes, numel: int, seed: int = 0) -> dict[str, Callable[[], object]]:
    """{"passes": fn, "passes_nt": fn}: each call runs `passes` in order, pass i reading passes[i][0] float32 arrays
    of `numel` elements and writing passes[i][1] others in one sweep (every array distinct; outputs allocated here,
    first-touched before timing), with plain or streaming stores."""
    arrays = _pass_arrays(passes, numel, seed)

    def run(nontemporal: bool):
        def call():
            for reads, writes in arrays:
                _ops.ops.stream_pass(reads, writes, nontemporal)
        return call
    return {"passes": run(False), "passes_nt": run(True)}


def pass_bytes(passes: Passes, numel: int) -> int:
    """The bytes one call of pass_calls(passes, numel) moves: every array read or written once."""
    return 4 * numel * sum(r + w for r, w in passes)


def torch_pass_call(passes: Passes, numel: int, seed: int = 0) -> Callable[[], object]:
    """The same passes with torch's own ops, into outputs allocated once: the first output the sum of the reads
    (torch.add(out=), then in-place adds), the others copies of it. The plain implementation a pass yardstick must
    not be slower than (it moves more bytes: each extra read or output is a pass of its own)."""
    arrays = _pass_arrays(passes, numel, seed)

    def call():
        for reads, writes in arrays:
            first = writes[0].copy_(reads[0]) if len(reads) == 1 else torch.add(reads[0], reads[1], out=writes[0])
            for r in reads[2:]:
                first.add_(r)
            for w in writes[1:]:
                w.copy_(first)
    return call


def gemm_call(gemms: Sequence[Gemm], dtype: torch.dtype = torch.float32, seed: int = 0) -> Callable[[], object]:
    """One callable running every product of `gemms` once, in order, into outputs allocated here."""
    if not gemms:
        raise ValueError("gemms must name at least one product")
    gen = torch.Generator().manual_seed(seed)
    ops = []
    for g in gemms:
        lead = () if g.batch == 1 else (g.batch,)
        a, b = _randn((*lead, g.m, g.k), gen, dtype), _randn((*lead, g.k, g.n), gen, dtype)
        out = torch.empty((*lead, g.m, g.n), dtype=dtype)
        ops.append((torch.mm if g.batch == 1 else torch.bmm, a, b, out))

    def call():
        for mm, a, b, out in ops:
            mm(a, b, out=out)
    return call


def gemm_flops(gemms: Sequence[Gemm]) -> int:
    return sum(g.flops for g in gemms)


def bandwidth(nbytes: int, threads: int | None = None, warmup: int = 2, rounds: int = 5,
              min_sample_s: float = 0.02) -> dict[str, float]:
    """Bytes per second of copy, triad and read at working set `nbytes` on `threads` torch threads (None: the
    current count), median of `rounds` interleaved samples; "best": the fastest into preallocated outputs,
    "best_fresh": the fastest into fresh ones."""
    calls, moved = stream_calls(nbytes), stream_bytes(nbytes)
    with _threads(threads):
        t = time_interleaved(calls, warmup, rounds, min_sample_s)
    out = {k: moved[k] / t[k].median_s for k in calls}
    return {**out, "best": max(out[k] for k in STREAM_KERNELS), "best_fresh": max(out[k] for k in FRESH_KERNELS)}


def gemm_throughput(gemms: Sequence[Gemm], threads: int | None = None, warmup: int = 2, rounds: int = 5,
                    min_sample_s: float = 0.02) -> float:
    """FLOP/s of torch.mm/bmm running `gemms` back to back on `threads` torch threads (None: the current
    count), median of `rounds` samples."""
    call = gemm_call(gemms)
    with _threads(threads):
        t = time_interleaved({"gemm": call}, warmup, rounds, min_sample_s)
    return gemm_flops(gemms) / t["gemm"].median_s


def pass_rates(passes: Passes, numel: int, threads: int | None = None, warmup: int = 2, rounds: int = 5,
               min_sample_s: float = 0.02) -> dict[str, float]:
    """Bytes per second of the pass yardstick ("passes", "passes_nt") and of torch doing the same passes ("torch",
    counting the yardstick's bytes, so the three compare as times do), interleaved, median of `rounds`."""
    calls = {**pass_calls(passes, numel), "torch": torch_pass_call(passes, numel)}
    with _threads(threads):
        t = time_interleaved(calls, warmup, rounds, min_sample_s)
    return {k: pass_bytes(passes, numel) / t[k].median_s for k in calls}


def _pair(text: str) -> tuple[int, int]:
    reads, writes = text.split(",")
    return int(reads), int(writes)


def main(argv=None) -> None:
    """`python -m diffkern.bench.machine [--threads N ...] [--passes R,W ... --numel N]`: bandwidth at a few working
    sets and the GEMM throughput of a square product, printed; with --passes, the pass yardstick of those passes
    (e.g. 3,1 1,2: NoiseTilt's fused step) beside torch doing them."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--mb", type=float, nargs="+", default=[4, 16, 64, 256])
    ap.add_argument("--passes", type=_pair, nargs="+", default=None, metavar="R,W")
    ap.add_argument("--numel", type=int, nargs="+", default=[4 * 262144, 2096640])
    args = ap.parse_args(argv)
    if args.passes:
        for threads in args.threads:
            for numel in args.numel:
                rates = pass_rates(args.passes, numel, threads)
                print(f"{threads} thread(s), passes {args.passes} of {numel} elements: "
                      + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in rates.items()))
        return
    for threads in args.threads:
        for mb in args.mb:
            bw = bandwidth(int(mb * 1e6), threads)
            rates = ", ".join(f"{k} {bw[k] / 1e9:.1f} GB/s" for k in (*STREAM_KERNELS, *FRESH_KERNELS))
            print(f"{threads} thread(s), {mb:g} MB: {rates}")
        square = Gemm(1, 1024, 1024, 1024)
        print(f"{threads} thread(s), mm 1024^3: {gemm_throughput([square], threads) / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
