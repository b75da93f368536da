"""The `cuda` backend on CPU tensors: a test-only torch extension that runs the CUDA kernels in the harness.

It compiles the shipped kernels (csrc/cuda/*.cu, included as C++ by tests/harness_ext/) against the
host-execution harness (csrc/harness/) together with a glue that registers CPU-key implementations of
the cuda backend's internal ops (diffkern::dar_route_fwd_cuda, ...), through the same torch glue as
the CUDA build (csrc/cuda/*_glue.h). Built once per content of its sources and flags into
build/harness-ext-<hash>/ (a source checkout is needed), then loaded into the process.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
# -O1: the kernels run for milliseconds in the tests, so compile time is what CI pays for.
CFLAGS = ["-std=c++20", "-O1", "-Wall", "-Wno-unknown-pragmas"]
_loaded = False


def _inputs() -> list[Path]:
    dirs = [ROOT / "csrc" / "harness", ROOT / "csrc" / "include" / "diffkern", ROOT / "csrc" / "cuda",
            ROOT / "tests" / "harness_ext"]
    return sorted(p for d in dirs for p in d.iterdir() if p.suffix in (".h", ".cuh", ".cu", ".cpp"))


def _key() -> str:
    h = hashlib.sha256()
    for path in _inputs():
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(" ".join([torch.__version__, *CFLAGS]).encode())
    return h.hexdigest()[:16]


def load() -> None:
    """Builds (if its sources changed) and loads the harness extension; idempotent."""
    global _loaded
    if _loaded:
        return
    if not (ROOT / "tests" / "harness_ext").is_dir():
        raise FileNotFoundError(f"the CUDA harness extension needs a diffkern source checkout (looked in {ROOT})")
    from torch.utils import cpp_extension

    key = _key()
    out = ROOT / "build" / f"harness-ext-{key}"
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted((ROOT / "tests" / "harness_ext").glob("*.cpp")) + sorted((ROOT / "csrc" / "harness").glob("*.cpp"))
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test processes take turns
        cpp_extension.load(name=f"diffkern_harness_{key}", sources=[str(s) for s in sources], extra_cflags=CFLAGS,
                           extra_include_paths=[str(ROOT / "csrc" / "include"), str(ROOT / "csrc" / "cuda")],
                           build_directory=str(out), with_cuda=False, is_python_module=False, verbose=False)
    _loaded = True


def loaded() -> bool:
    return _loaded


def built() -> bool:
    """Whether the extension of the current sources is built already (then `load` takes a second, not minutes)."""
    key = _key()
    return (ROOT / "tests" / "harness_ext").is_dir() and (ROOT / "build" / f"harness-ext-{key}" /
                                                         f"diffkern_harness_{key}.so").is_file()


@dataclass
class Traffic:
    """Distinct global-memory bytes each harness launch touched, summed over launches (csrc/harness/traffic.h)."""
    bytes: int = 0
    launches: int = 0


@contextlib.contextmanager
def traffic():
    """Counts the modeled traffic of the cuda backend's kernels run in the block (the harness must be loaded)."""
    counted = Traffic()
    torch.ops.diffkern_harness.traffic_start()
    try:
        yield counted
    finally:
        counted.bytes, counted.launches = torch.ops.diffkern_harness.traffic_stop()
