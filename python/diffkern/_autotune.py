"""Launch configurations chosen per shape: one fixed configuration under the interpreter, the fastest on a GPU.

A launcher lists its kernel's candidate configurations (`Config`: tuned constexprs, num_warps, num_stages),
the first being the one the CPU tests run, and asks `pick(name, key, configs, launch, kernel=...)` which to
use for the shapes in `key` (a tuple of str/int/float/bool/None: the shapes that change the best choice).

* Under the interpreter (TRITON_INTERPRET=1), off CUDA, with DIFFKERN_AUTOTUNE=0, or for a single candidate
  it is always `configs[0]`, so the tests and a user who wants no timing run the same code.
* On a GPU the first call per (name, key, device) looks for an earlier process's choice on disk, else
  launches every candidate once through `launch(config)`, which must return the compiled kernel (what
  `kernel[grid](...)` returns; a list of them for several launches): a candidate whose compiled kernel spills
  registers, or that the device cannot run (OutOfResources: shared memory, threads), is dropped (the
  no-spill rule; tests/test_kernels_compile.py holds every candidate to it for sm_80/sm_90a ahead of time).
  The rest are timed with triton.testing.do_bench (median, L2 flushed) and the fastest is cached in memory
  and on disk. When every candidate is dropped, RuntimeError names the kernel.
* While the current stream is capturing a CUDA graph nothing is launched, timed or synchronised: a choice
  in memory or on disk is used, else `configs[0]`, and nothing is cached.
* Thread safe: one lock guards the choices and one serialises tuning, so two threads never time at once
  and a key is tuned once.
* `chosen()` reports every choice of this process (timed or read from disk), `summary()` as lines.

The disk cache (DIFFKERN_AUTOTUNE_CACHE_DIR, default ~/.cache/diffkern/autotune; empty disables it) holds
one small JSON file per choice, named by a hash of the kernel name, its key, the kernel's source (Triton's
JITFunction.cache_key, which covers the @triton.jit functions it calls), the candidate list, the device
(name, capability, SM count) and the Triton version (much as Triton's own autotune cache, cache_results, is
keyed), so an edited kernel, a changed candidate list, another GPU or another Triton is tuned afresh.

Why not `triton.autotune` (checked against triton 3.6 and 3.8): its Autotuner times a new key on its first
call whatever the stream is doing, so a first call inside CUDA-graph capture would launch, time and
synchronise inside the capture; it drops a configuration only when it fails (OutOfResources, a compile error),
never for spilling, and its prune hooks see the configurations before they are compiled; its choices reach a
report only through knobs.autotuning.listener, which triton 3.6 does not have; and with several
configurations it fails in the interpreter. This wrapper keeps the launchers plain
`kernel[grid](..., **config.meta())` calls.

Determinism: candidates may differ only in what leaves every output bit unchanged, so a run gives the same
bits whichever candidate wins. num_stages never changes the arithmetic; num_warps and tile sizes change nothing
in an elementwise kernel, but wherever a kernel sums floats (tl.sum) they can change the layout of the summed
axis and so the order of the additions on a GPU (more warps, or a tile smaller than the warps' threads, spreads
the axis differently). Such candidates are not listed, and each kernel module says why its list is what it is.
tests/test_autotune_candidates.py checks both halves: every candidate gives bit-identical outputs in the
interpreter, and every candidate's compiled float reductions (TTGIR, sm_90a: diffkern.testing.aot.
reduction_orders) are laid out as configs[0]'s along the reduced axis.

`launch` must be safe to call repeatedly (each call writes the same outputs from the same inputs).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import _triton

WARMUP_MS, REP_MS = 5, 20  # do_bench per candidate: first calls only


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



def candidate_specs(name: str, kernel, signature: dict, constexprs: dict, configs: Sequence[Config],
                    tags: dict | None = None, attrs: dict | None = None) -> list[_triton.KernelSpec]:
    """The AOT spec of `kernel` launched with each candidate on top of `constexprs` (so that the compile tests
    hold every candidate to the no-spill rule): named `name[<configuration>]`, tagged with the group `name`
    (which must name everything but the configuration), the configuration, and its index in `configs`
    ("candidate": 0 is what the interpreter runs); `attrs` as KernelSpec's (what a launch infers)."""
    return [_triton.KernelSpec(f"{name}[{c.describe()}]", kernel, signature, {**constexprs, **c.constexprs}, c.num_warps,
                               _triton.register_budget(c.num_warps),
                               {**(tags or {}), "group": name, "config": c.describe(), "candidate": i},
                               attrs or {}, c.num_stages)
            for i, c in enumerate(configs)]


def bucket(n: int) -> int:
    """n rounded up to a power of two: a size in an autotune key, so that nearby sizes share one choice."""
    return 1 << max(0, int(n) - 1).bit_length()


_lock = threading.Lock()  # guards _choices
_tune_lock = threading.RLock()  # one tuning at a time
_choices: dict[tuple, dict] = {}


def tuning() -> bool:
    """Whether `pick` times candidates: on a GPU, unless DIFFKERN_AUTOTUNE=0."""
    return not _triton.interpreting() and os.environ.get("DIFFKERN_AUTOTUNE", "1") != "0"


def cache_dir() -> str | None:
    """The on-disk cache folder (None: disabled)."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diffkern", "autotune")
    return os.environ.get("DIFFKERN_AUTOTUNE_CACHE_DIR", default) or None


def pick(name: str, key: tuple, configs: Sequence[Config], launch: Callable[[Config], object],
         kernel=None) -> Config:
    """The configuration to launch kernel `name` with for the shapes in `key` (see the module docstring);
    `kernel` (the @triton.jit function) names the disk cache entry by its source."""
    if not configs:
        raise ValueError(f"{name}: no candidate configurations")
    device = _triton.guarded_device()
    if len(configs) == 1 or not tuning() or device is None or device.type != "cuda":
        return configs[0]
    memo = (name, key, device.index)
    hit = _choices.get(memo)
    if hit is not None:
        return hit["config"]
    capturing = torch.cuda.is_current_stream_capturing()
    with _tune_lock:
        hit = _choices.get(memo)
        if hit is not None:
            return hit["config"]
        _check_key(name, key)
        path = _cache_path(name, key, configs, kernel, device)
        stored = _read(path, configs)
        if stored is not None:
            return _remember(memo, name, key, device, stored, {}, "disk")
        if capturing:
            return configs[0]
        best, times, dropped = _time(name, key, configs, launch)
        _write(path, best, times)
        return _remember(memo, name, key, device, best, times, "timed", dropped)


def _check_key(name: str, key) -> None:
    if not isinstance(key, tuple) or not all(v is None or isinstance(v, (str, int, float, bool)) for v in key):
        raise TypeError(f"{name}: the autotune key must be a tuple of str/int/float/bool/None, got {key!r}")


def _spills(name: str, compiled) -> int:
    kernels = compiled if isinstance(compiled, (list, tuple)) else [compiled]
    if not kernels or not all(hasattr(k, "n_spills") for k in kernels):
        raise TypeError(f"{name}: launch(config) must return the compiled kernel(s) (what kernel[grid](...) returns), "
                        f"got {compiled!r}")
    return sum(k.n_spills or 0 for k in kernels)


def _time(name: str, key: tuple, configs: Sequence[Config], launch) -> tuple[Config, dict, dict]:
    """(fastest config, median ms per timed config, description -> why dropped)."""
    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench
    times, dropped = {}, {}
    for config in configs:
        try:
            spills = _spills(name, launch(config))
        except OutOfResources as error:
            dropped[config.describe()] = str(error)
            continue
        if spills:
            dropped[config.describe()] = f"spills {spills} registers"
            continue
        times[config] = do_bench(lambda c=config: launch(c), warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
    if not times:
        raise RuntimeError(f"{name}: no candidate configuration can run for {key} ({dropped})")
    return min(times, key=times.get), times, dropped


def _remember(memo, name, key, device, config, times, source, dropped=None) -> Config:
    entry = {"config": config, "ms": times, "source": source, "dropped": dropped or {},
             "device": torch.cuda.get_device_name(device), "capability": torch.cuda.get_device_capability(device)}
    with _lock:
        _choices[memo] = entry
    return config


def _cache_path(name: str, key: tuple, configs: Sequence[Config], kernel, device: torch.device) -> str | None:
    folder = cache_dir()
    if folder is None or kernel is None:
        return None
    import triton
    props = torch.cuda.get_device_properties(device)
    ident = [name, repr(key), _source_hash(kernel), [c.describe() for c in configs], props.name,
             [props.major, props.minor], props.multi_processor_count, triton.__version__]
    digest = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]
    return os.path.join(folder, f"{name}-{digest}.json")


def _source_hash(kernel) -> str:
    """Triton's hash of the kernel's source and the @triton.jit functions it calls (its own cache key)."""
    key = getattr(kernel, "cache_key", None)
    if key is None:  # an interpreter wrapper or a plain function: its own source
        import inspect
        key = hashlib.sha256(inspect.getsource(getattr(kernel, "fn", kernel)).encode()).hexdigest()
    return key


def _read(path: str | None, configs: Sequence[Config]) -> Config | None:
    if path is None:
        return None
    try:
        with open(path) as f:
            stored = json.load(f)["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return next((c for c in configs if c.describe() == stored), None)


def _write(path: str | None, config: Config, times: dict) -> None:
    """Atomically (a temporary file renamed into place); a cache that cannot be written is skipped."""
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), suffix=".tmp", delete=False) as f:
            json.dump({"config": config.describe(), "ms": {c.describe(): t for c, t in times.items()}}, f)
        os.replace(f.name, path)
    except OSError:
        pass


def chosen() -> list[dict]:
    """Every choice made in this process: kernel, key, device name and capability, the chosen configuration,
    where it came from ("timed", or "disk": an earlier process's), the median milliseconds of each candidate
    timed and the candidates dropped (spilling, out of resources) with the reason."""
    with _lock:
        return [{"kernel": name, "key": key, "device": c["device"], "capability": c["capability"],
                 "config": c["config"].describe(), "source": c["source"],
                 "ms": {cfg.describe(): t for cfg, t in c["ms"].items()}, "dropped": dict(c["dropped"])}
                for (name, key, _), c in _choices.items()]


def summary(choices: list[dict] | None = None) -> list[str]:
    """chosen() (or the given list of its entries) as one line per choice: what the GPU check and the benchmark
    print."""
    lines = []
    for c in chosen() if choices is None else choices:
        times = "; ".join(f"{cfg} {ms:.4g} ms" for cfg, ms in sorted(c["ms"].items(), key=lambda kv: kv[1]))
        dropped = "; ".join(f"{cfg}: {why}" for cfg, why in c["dropped"].items())
        lines.append(f"{c['kernel']} {c['key']} on {c['device']}: {c['config']} ({c['source']}"
                     + (f"; {times}" if times else "") + (f"; dropped {dropped}" if dropped else "") + ")")
    return lines
