"""A build that runs elsewhere: the portable baseline, the CPU kernels' ISA chosen at load, and the
`python -m diffkern` report."""
import glob
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import diffkern
from diffkern import _ops

# /proc/cpuinfo flags each x86-64 level adds (the ones the kernels can use), cumulative.
LEVEL_FLAGS = {"x86-64-v2": {"sse4_2", "popcnt", "ssse3"},
               "x86-64-v3": {"avx", "avx2", "fma", "f16c", "bmi2", "movbe"},
               "x86-64-v4": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}}
# An AVX instruction in objdump's listing: a ymm/zmm register, or a VEX-encoded (v-prefixed) SSE op.
AVX = re.compile(r"^\s*[0-9a-f]+:\s+(\S+\s.*%[yz]mm|v\w+\s.*%xmm)", re.MULTILINE)
DEFAULT_X86 = ["x86-64-v2", "x86-64-v3", "x86-64-v4"]
ROUTE = """
import sys, torch, diffkern
g = torch.Generator().manual_seed(0)
sources = [torch.randn(2, 37, 264, generator=g) for _ in range(3)]
q, gain = torch.randn(264, generator=g), torch.rand(264, generator=g) + 0.5
h, lse = torch.ops.diffkern.dar_route_fwd(sources, q, gain, 1e-6)
"""
SAVE = """
torch.save({"isa": diffkern.build_info()["cpu_isa"], "h": h, "lse": lse}, sys.argv[1])
"""

def python(*args, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=120)


def cpu_flags() -> set:
    with open("/proc/cpuinfo") as f:
        return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())


def runs_here(level: str) -> bool:
    levels = list(LEVEL_FLAGS)
    return all(LEVEL_FLAGS[lv] <= cpu_flags() for lv in levels[:levels.index(level) + 1])


x86_default_build = pytest.mark.skipif(
    platform.machine() != "x86_64" or diffkern.build_info()["cpu_variants"] != DEFAULT_X86 or not shutil.which("objdump"),
    reason="needs the default x86-64 build (DIFFKERN_CPU_ARCH unset), /proc/cpuinfo and objdump")


def test_build_info_names_the_baseline_and_the_variants_with_the_loaded_one_among_them():
    info = diffkern.build_info()
    assert info["cpu_arch"] == info["cpu_variants"][0] != "native"
    assert info["cpu_isa"] == torch.ops.diffkern.cpu_isa() and info["cpu_isa"] in info["cpu_variants"]


@x86_default_build
def test_the_loaded_variant_is_the_widest_this_cpu_runs():
    assert diffkern.build_info()["cpu_isa"] == [lv for lv in DEFAULT_X86 if runs_here(lv)][-1]


@x86_default_build
@pytest.mark.parametrize("library", ("_C", "_C_cpu_x86_64_v2"))
def test_baseline_libraries_hold_no_avx_instruction(library):
    path, = glob.glob(os.path.join(os.path.dirname(_ops.__file__), f"{library}.*so"))
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True).stdout
    assert listing and not AVX.search(listing), AVX.search(listing).group(0)


def test_forced_baseline_matches_the_loaded_variant(tmp_path):
    proc = python("-c", ROUTE + SAVE, str(tmp_path / "baseline.pt"), env={"DIFFKERN_CPU_ISA": "baseline"})
    assert proc.returncode == 0, proc.stderr
    base, loaded = torch.load(tmp_path / "baseline.pt"), {}
    exec(ROUTE, loaded)  # the same inputs through the variant this process loaded
    assert base["isa"] == diffkern.build_info()["cpu_variants"][0]
    # The variants differ only in vector width and FMA contraction: the same sums in another order.
    torch.testing.assert_close(base["h"], loaded["h"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(base["lse"], loaded["lse"], rtol=1e-5, atol=1e-6)


def test_an_unknown_forced_isa_fails_the_import_naming_the_variants():
    proc = python("-c", "import diffkern", env={"DIFFKERN_CPU_ISA": "pentium"})
    assert proc.returncode != 0
    assert "DIFFKERN_CPU_ISA=pentium names no compiled variant" in proc.stderr
    assert ",".join(diffkern.build_info()["cpu_variants"]) in proc.stderr


def test_python_m_diffkern_prints_the_bug_report_sections():
    proc = python("-m", "diffkern")
    assert proc.returncode == 0, proc.stderr
    info = diffkern.build_info()
    for words in ("versions", "built with", "running with", torch.__version__, "CPU kernels",
                  f"loaded    {info['cpu_isa']}", ", ".join(info["cpu_variants"]), "GPU and Triton", "triton",
                  "TRITON_INTERPRET", "environment", "backends (default first)", "CPU tensors", "CUDA tensors"):
        assert words in proc.stdout, words
    route = next(line for line in proc.stdout.splitlines() if line.split()[:1] == ["dar_route_fwd"])
    assert route.split()[1] == "cpu," and "reference" in route
