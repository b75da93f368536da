"""Wall-clock timing of CPU callables, interleaved so that drift on a noisy machine hits every candidate alike."""
from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    """Per-call seconds over `samples` samples, each the mean of `calls_per_sample` back-to-back calls."""
    median_s: float
    min_s: float
    q1_s: float
    q3_s: float
    samples: int
    calls_per_sample: int

    def as_dict(self) -> dict:
        return asdict(self)


def _sample(fn: Callable[[], object], calls: int, clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    for _ in range(calls):
        fn()
    return (clock() - start) / calls


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int, rounds: int,
                     min_sample_s: float, clock: Callable[[], float] = time.perf_counter) -> dict[str, Timing]:
    """Times each callable: `warmup` untimed calls, then `rounds` rounds of one sample of every callable.

    A sample repeats its callable until it lasts about `min_sample_s`, so short calls are not lost in
    timer resolution; taking the samples round-robin means a slow spell of the machine lands on every
    candidate rather than on one, which keeps their ratios honest. The garbage collector is off while
    a sample runs, and collects before it only the objects made since the rounds began. `clock`: wall time by
    default; time.thread_time counts only the calling thread's CPU time (a descheduled spell of a loaded machine
    left out; the whole op's time at 1 thread, where torch runs kernels on the calling thread).
    """
    calls = {}
    for name, fn in fns.items():
        once = min(_sample(fn, 1, clock) for _ in range(max(1, warmup)))
        calls[name] = max(1, round(min_sample_s / max(once, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    # The collection before each sample skips every object alive now (torch's, a torch.compile'd graph's: after
    # a large compile a full collection takes most of a second).
    gc.freeze()
    try:
        for _ in range(rounds):
            for name, fn in fns.items():
                gc.collect()
                gc.disable()
                try:
                    samples[name].append(_sample(fn, calls[name], clock))
                finally:
                    gc.enable()
    finally:
        gc.unfreeze()
    out = {}
    for name, xs in samples.items():
        q1, _, q3 = statistics.quantiles(xs, n=4) if len(xs) > 1 else (xs[0], None, xs[0])
        out[name] = Timing(statistics.median(xs), min(xs), q1, q3, len(xs), calls[name])
    return out


def first_call_seconds(fn: Callable[[], object]) -> float:
    """Wall time of one call: for a torch.compile'd function, its compile time plus one run."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextlib.contextmanager
def threads(n: int | None):
    """torch's CPU thread count set to `n` (None: left as is) inside the block, and restored after it."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
