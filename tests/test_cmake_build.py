"""The top-level CMakeLists.txt configures and builds libdiffkern against the installed torch."""
import fcntl
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffkern

ROOT = Path(__file__).resolve().parents[1]

# Loads the library in a fresh interpreter (diffkern._C registers the same namespace in this one); it
# loads its CPU kernel library (libdiffkern_cpu_<variant>) from beside itself.
SMOKE = """
import sys, torch
torch.ops.load_library(sys.argv[1])
assert torch.ops.diffkern.cpu_isa() == sys.argv[2], torch.ops.diffkern.cpu_isa()
h, lse = torch.ops.diffkern.dar_route_fwd([torch.ones(1, 2, 4)], torch.ones(4), torch.ones(4), 0.0)
assert torch.equal(h, torch.ones(1, 2, 4)) and torch.equal(lse, torch.full((1, 2), 2.0)), (h, lse)
# Autograd lives in the library too (csrc/diffkern/autograd_*.cpp): a C++ or Python program without diffkern's
# Python package gets gradients.
q = torch.ones(4, requires_grad=True)
torch.ops.diffkern.dar_route_fwd([torch.ones(1, 2, 4)], q, torch.ones(4), 0.0)[0].sum().backward()
assert q.grad is not None and q.grad.shape == (4,), q.grad
"""


def run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"


# The CMake build is checked for the baseline variant alone: which variants exist and which one loads is
# the same loader code, tested on setup.py's build of all of them (test_build_portable.py); building
# every variant again here would only triple the compile time. It is built without optimisation
# (CMAKE_BUILD_TYPE=None: no -O flag), which takes a quarter off each file's compile: what the test checks is
# the configuration, the sources, the link and the loading; the kernels' optimised code is the other tests'.
BASELINE = diffkern.build_info()["cpu_arch"]


def build_dir(generator):
    """A build dir under build-cmake/ (gitignored) reused across runs: keyed by everything the cache
    pins (torch, interpreter, cmake, generator, variants), so incremental builds stay correct when the
    environment changes, and never shared with `make cmake`, which owns build-cmake/ itself."""
    key = "|".join([torch.__version__, torch.utils.cmake_prefix_path, sys.executable,
                    shutil.which("cmake"), generator or "", BASELINE])
    return ROOT / "build-cmake" / f"pytest-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not on PATH")
def test_cmake_build_produces_loadable_library():
    generator = "Ninja" if shutil.which("ninja") else None
    out = build_dir(generator)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent runs (xdist workers, a second pytest) take turns
        configure = ["cmake", "-S", str(ROOT), "-B", str(out),
                     f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DDIFFKERN_CPU_ARCH={BASELINE}",
                     "-DCMAKE_BUILD_TYPE=None"]
        if generator:
            configure += ["-G", generator]
        run(configure)
        run(["cmake", "--build", str(out), "-j", "2"])
        libs = [p for p in (out / "libdiffkern.so", out / "libdiffkern.dylib") if p.is_file()]
        assert libs, f"no libdiffkern in {out}"
        run([sys.executable, "-c", SMOKE, str(libs[0]), BASELINE])
