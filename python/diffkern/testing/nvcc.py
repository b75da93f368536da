"""Torch-free .cu kernels compiled with nvcc for the target GPUs, for ptxas's resource report (no GPU needed)."""
from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

ARCHS = {80: "sm_80", 90: "sm_90a"}
GENCODE = [f for sm in ARCHS.values() for f in ("-gencode", f"arch=compute_{sm[3:]},code={sm}")]
ROOT = Path(__file__).resolve().parents[3]
# What setup.py gives nvcc for csrc/cuda/*.cu, minus torch's include paths (the kernels include none).
SHIPPED_FLAGS = ["-std=c++20", "-O3", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc' / 'include'}",
                 "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__"]


def shipped_reports(nvcc: str) -> dict:
    """ptxas_reports of the shipped kernels (csrc/cuda/*.cu) as the real build compiles them."""
    cuda = ROOT / "csrc" / "cuda"
    inputs = [p for p in sorted(cuda.iterdir()) if p.suffix in (".h", ".cuh")]
    inputs += sorted((ROOT / "csrc" / "include" / "diffkern").glob("*.h"))
    return ptxas_reports(nvcc, sorted(cuda.glob("*.cu")), inputs, ROOT / "build", SHIPPED_FLAGS)


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME")
    candidates = [Path(cuda_home) / "bin" / "nvcc"] if cuda_home else []
    candidates += [Path(p) for p in (shutil.which("nvcc"),) if p] + [Path("/usr/local/cuda/bin/nvcc")]
    return next((str(p) for p in candidates if p.is_file()), None)


def _run(cmd) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def ptxas_reports(nvcc: str, kernels: list[Path], inputs: list[Path], cache: Path, flags: list[str]) -> dict:
    """(mangled kernel, arch) -> ptxas -v's lines for it, from one nvcc run per .cu in `kernels`.

    Cached under cache/nvcc-<hash of `inputs` (every file the kernels include), the flags and nvcc's version>.
    """
    h = hashlib.sha256()
    for path in sorted(set(inputs) | set(kernels)):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for item in (nvcc, _run([nvcc, "--version"]).stdout, *GENCODE, *flags):
        h.update(item.encode() + b"\0")
    out = cache / f"nvcc-{h.hexdigest()[:16]}"
    out.mkdir(parents=True, exist_ok=True)

    def report(cu: Path) -> str:
        cached = out / f"{cu.stem}.ptxas.txt"
        if not cached.exists():
            proc = _run([nvcc, *flags, *GENCODE, "-Xptxas", "-v", "-c", str(cu), "-o", str(out / f"{cu.stem}.o")])
            cached.write_text(proc.stderr + proc.stdout)
        return cached.read_text()

    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            text = "".join(pool.map(report, kernels))
    found = {}
    for match in re.finditer(r"Compiling entry function '(\w+)' for '(sm_\w+)'(.*?)(?=Compiling entry|\Z)", text, re.S):
        found[(match.group(1), match.group(2))] = match.group(3)
    return found


def readable(mangled: str) -> str:
    """`route_fwd_kernel<__nv_bfloat16, float>` for a mangled kernel name (c++filt, namespaces dropped)."""
    proc = subprocess.run(["c++filt", mangled], capture_output=True, text=True) if shutil.which("c++filt") else None
    name = proc.stdout.strip() if proc and proc.returncode == 0 else mangled
    name = re.sub(r"\(anonymous namespace\)::|\w+::", "", name.removeprefix("void "))
    return name.split("(")[0]


def resources(reports: dict, arch: str) -> list[dict]:
    """One row per kernel compiled for `arch`: registers, spills, stack frame and static shared memory."""
    rows = []
    for (name, sm), text in sorted(reports.items()):
        if sm != arch:
            continue
        number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else 0  # noqa: E731
        rows.append({"name": readable(name), "arch": sm, "registers": number(r"Used (\d+) registers"),
                     "spill_stores": number(r"(\d+) bytes spill stores"), "spill_loads": number(r"(\d+) bytes spill loads"),
                     "stack_bytes": number(r"(\d+) bytes stack frame"), "shared_bytes": number(r"(\d+) bytes smem")})
    return rows


def kernel_names(cu: Path) -> set[str]:
    """The __global__ functions a .cu defines."""
    return set(re.findall(r"__global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)", cu.read_text()))


def check_no_spills(kernels: set[str], reports: dict) -> list[str]:
    """Asserts every kernel compiled for every arch with no spill and no stack frame; returns one line per
    compiled kernel."""
    for sm in ARCHS.values():
        mangled = [name for name, arch in reports if arch == sm]
        missing = {k for k in kernels if not any(f"{len(k)}{k}" in name for name in mangled)}
        assert kernels and not missing, (sm, missing)
    lines = []
    for (name, sm), text in sorted(reports.items()):
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
        stack = [int(n) for n in re.findall(r"(\d+) bytes stack frame", text)]
        registers = re.search(r"Used (\d+) registers", text)
        assert registers and spills and stack and not any(spills) and not any(stack), f"{name} at {sm}:\n{text}"
        lines.append(f"{sm} {readable(name)}: {registers.group(1)} registers, no spills, no stack frame")
    return lines
