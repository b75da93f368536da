"""The host-execution harness runs torch-free CUDA kernels on CPU faithfully enough to catch their bugs.

tests/harness/*.cu are small kernels written against diffkern/cuda_compat.h; tests/harness/driver.cpp
launches one case through the harness (csrc/harness/) and checks it against a double-precision
reference (exit 0), reports a wrong answer (exit 1) or lets the harness stop a fault (exit 3). The
driver is built with g++ once per content of its sources, into build/harness-<hash>/, so CI reuses it.
The same .cu files are compiled with nvcc for sm_80 and sm_90a, which must not spill.
"""
import fcntl
import hashlib
import re
import subprocess
from pathlib import Path

import pytest
import torch

from diffkern.testing import nvcc

ROOT = Path(__file__).resolve().parents[1]
KERNELS = sorted((ROOT / "tests" / "harness").glob("*.cu"))
SOURCES = [ROOT / "csrc" / "include" / "diffkern" / "cuda_compat.h", *sorted((ROOT / "csrc" / "harness").iterdir()),
           *sorted((ROOT / "tests" / "harness").iterdir())]
# -O1: the driver runs for milliseconds, so compile time is what CI pays for.
CXXFLAGS = ["-std=c++20", "-O1", "-Wall", "-Wextra", "-Werror"]


def content_key(*extra: str) -> str:
    h = hashlib.sha256()
    for path in SOURCES:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for item in extra:
        h.update(item.encode() + b"\0")
    return h.hexdigest()[:16]


def run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def driver() -> Path:
    cxx = "g++"
    version = run([cxx, "--version"]).stdout
    out = ROOT / "build" / f"harness-{content_key(cxx, version, *CXXFLAGS)}"
    exe = out / "driver"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent runs (xdist workers, a second pytest) take turns
        if not exe.exists():
            tmp = out / "driver.tmp"
            run([cxx, *CXXFLAGS, f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'tests' / 'harness'}",
                 "-x", "c++", str(ROOT / "tests" / "harness" / "driver.cpp"),
                 "-x", "none", *map(str, sorted((ROOT / "csrc" / "harness").glob("*.cpp"))), "-o", str(tmp)])
            tmp.rename(exe)
    return exe


def run_case(driver, case, *args):
    return subprocess.run([str(driver), case, *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("seed", (1, 2))
@pytest.mark.parametrize("case", ("block_sum", "block_sum_dynamic", "warp_sum_xor", "warp_sum_down", "warp_vote",
                                  "warp_reverse", "scale", "row_sum_vec4", "row_stats"))
def test_correct_kernel_matches_reference(driver, case, seed):
    proc = run_case(driver, case, "--seed", seed)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stdout + proc.stderr


@pytest.mark.parametrize("case, fault", [
    ("block_sum_missing_sync", "shared-memory race"),
    ("warp_reverse_missing_syncwarp", "shared memory"),  # a race, or a read before the write
    ("early_exit_barrier", "divergent barrier"),
    ("shfl_outside_mask", r"reads lane (1[6-9]|2[0-3]), which is not in the mask 0x0000ffff"),
    ("shfl_divergent", r"deadlock: .* waits in a warp collective|lane \d+ waits in __syncthreads\(\)"),
    ("scale_oob", r"global out of bounds: kernel scale_oob_kernel block \(7,0,0\) thread"),
    ("row_sum_vec4_misaligned", "misaligned vector access"),
])
@pytest.mark.parametrize("seed", (1, 2, 3))
def test_planted_bug_is_caught(driver, case, fault, seed):
    """`fault` is a regular expression the harness's report must match."""
    proc = run_case(driver, case, "--seed", seed)
    assert proc.returncode == 3 and re.search(fault, proc.stderr), proc.stdout + proc.stderr


def test_out_of_bounds_report_names_index_and_extent(driver):
    proc = run_case(driver, "scale_oob")
    assert re.search(r"thread \((10[4-9]|11\d|12[0-7]),0,0\): index 10\d\d of y \(extent 1000 elements\)",
                     proc.stderr), proc.stderr


@pytest.mark.parametrize("seed", (1, 2, 3))
def test_missing_sync_gives_wrong_answer_without_race_detector(driver, seed):
    proc = run_case(driver, "block_sum_missing_sync", "--seed", seed, "--no-race-check")
    assert proc.returncode == 1 and "mismatch" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("seed", (1, 2, 3))
def test_wrong_shuffle_width_gives_wrong_sum(driver, seed):
    proc = run_case(driver, "warp_sum_wrong_width", "--seed", seed)
    assert proc.returncode == 1 and "mismatch" in proc.stdout, proc.stdout + proc.stderr


def test_block_order_does_not_change_order_independent_kernels(driver):
    runs = [("--no-shuffle",), *(("--seed", s) for s in (1, 2, 3, 4))]
    procs = [run_case(driver, "order_digest", *args) for args in runs]
    assert all(p.returncode == 0 for p in procs), [p.stdout + p.stderr for p in procs]
    digests = {p.stdout for p in procs}
    assert len(digests) == 1 and next(iter(digests)).startswith("digest "), digests


def test_bf16_and_fp16_round_trips_match_torch(driver, tmp_path):
    proc = run_case(driver, "round_trip", "--out", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    x, bf16, fp16 = (torch.frombuffer(bytearray((tmp_path / f"{n}.f32").read_bytes()), dtype=torch.float32)
                     for n in ("x", "bf16", "fp16"))
    for got, dtype in ((bf16, torch.bfloat16), (fp16, torch.float16)):
        want = x.to(dtype).float()
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan), dtype
        assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32)), dtype


def test_fiber_switch_cost_is_reported(driver):
    proc = run_case(driver, "switch_cost")
    assert proc.returncode == 0 and "ns per thread switch" in proc.stdout, proc.stdout + proc.stderr
    print(proc.stdout.strip())


def test_every_kernel_is_launched_by_the_driver():
    kernels = {k for path in KERNELS for k in nvcc.kernel_names(path)}
    launched = set(re.findall(r'"(\w+_kernel)"', (ROOT / "tests" / "harness" / "driver.cpp").read_text()))
    assert kernels and kernels <= launched, kernels - launched


@pytest.mark.skipif(nvcc.find_nvcc() is None, reason="nvcc is not installed")
def test_kernels_compile_with_nvcc_without_spills():
    reports = nvcc.ptxas_reports(nvcc.find_nvcc(), KERNELS, SOURCES, ROOT / "build",
                                 ["-std=c++20", f"-I{ROOT / 'csrc' / 'include'}"])
    kernels = {k for path in KERNELS for k in nvcc.kernel_names(path)}
    for line in nvcc.check_no_spills(kernels, reports):
        print(line)
