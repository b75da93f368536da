"""Launch configurations chosen per shape: one fixed configuration under the interpreter, the fastest on a GPU.

A launcher lists its kernel's candidate configurations (`Config`: constexprs, num_warps, num_stages), the
first being the one the CPU tests run, and asks `pick(name, key, configs, launch)` which to use for the
shapes in `key`. Under the interpreter (TRITON_INTERPRET=1) and with DIFFKERN_AUTOTUNE=0 that is always
`configs[0]`, so the tests and a user who wants no timing run the same code. On a GPU the first call per
(name, key, device) launches every candidate through `launch(config)`, drops those whose compiled kernel
spills registers, times the rest with triton.testing.do_bench and caches the fastest; `chosen()` reports
every choice made in this process. While a CUDA graph is being captured nothing is timed: a cached choice is
used, else `configs[0]`.

`launch` must be safe to call repeatedly (each call writes the same outputs from the same inputs).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import _triton


@dataclass(frozen=True)
class Config:
    """One candidate launch configuration: the kernel's tuned constexprs and its launch options."""
    constexprs: dict = field(default_factory=dict, hash=False)
    num_warps: int = 4
    num_stages: int = 3

    def meta(self) -> dict:
        """The keyword arguments of a launch with this configuration (maxnreg: the full register budget)."""
        return {**self.constexprs, "num_warps": self.num_warps, "num_stages": self.num_stages,
                "maxnreg": _triton.register_budget(self.num_warps)}

    def describe(self) -> str:
        return ",".join([*(f"{k}={v}" for k, v in self.constexprs.items()),
                         f"num_warps={self.num_warps}", f"num_stages={self.num_stages}"])


_lock = threading.Lock()
_choices: dict[tuple, dict] = {}


def tuning() -> bool:
    """Whether `pick` times candidates: on a GPU, unless DIFFKERN_AUTOTUNE=0."""
    return not _triton.interpreting() and os.environ.get("DIFFKERN_AUTOTUNE", "1") != "0"


def pick(name: str, key: tuple, configs: Sequence[Config], launch: Callable[[Config], object]) -> Config:
    """The configuration to launch kernel `name` with for the shapes in `key` (see the module docstring)."""
    if not configs:
        raise ValueError(f"{name}: no candidate configurations")
    device = _triton.guarded_device()
    if not tuning() or device is None or device.type != "cuda":
        return configs[0]
    full_key = (name, key, torch.cuda.get_device_capability(device))
    with _lock:
        hit = _choices.get(full_key)
    if hit is not None:
        return hit["config"]
    if torch.cuda.is_current_stream_capturing():
        return configs[0]
    from triton.testing import do_bench
    times = {}
    for config in configs:
        compiled = launch(config)
        if getattr(compiled, "n_spills", 0):
            continue
        times[config] = do_bench(lambda: launch(config), warmup=5, rep=20)
    if not times:
        raise RuntimeError(f"{name}: every candidate configuration spills registers for {key}")
    best = min(times, key=times.get)
    with _lock:
        _choices[full_key] = {"config": best, "ms": times}
    return best


def chosen() -> list[dict]:
    """Every choice made in this process: kernel, key, device capability, the chosen configuration and the
    median milliseconds of each candidate timed."""
    with _lock:
        return [{"kernel": name, "key": key, "capability": cap, "config": c["config"].describe(),
                 "ms": {cfg.describe(): t for cfg, t in c["ms"].items()}}
                for (name, key, cap), c in _choices.items()]
