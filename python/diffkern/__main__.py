"""`python -m diffkern`: how diffkern was built and what it finds here, as plain text for a bug report.

Sections: versions (built with / running with), the CPU kernels' ISA (baseline, variants, the one
loaded), GPU and Triton (CUDA kernels built, driver and devices, Triton, its interpreter), the
environment variables diffkern reads that are set, and for each op the backends for CPU tensors and
for CUDA tensors (default first; one that cannot run here says why in parentheses).
"""
from __future__ import annotations

import os
import platform

import torch

from . import _registry, _triton
from ._ops import build_info

# Runtime variables worth a line when set (README, "Environment variables").
RUNTIME_VARIABLES = ("DIFFKERN_CPU_ISA", "DIFFKERN_CPU_CACHE_BYTES", "DIFFKERN_DEBUG_FILL", "DIFFKERN_NVTX",
                     "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def _gpus() -> list[str]:
    return [f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
            for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _triton_version() -> str:
    try:
        import triton
    except Exception as err:  # a broken install raises more than ImportError
        return f"not importable ({type(err).__name__}: {err})"
    return triton.__version__


def _versions(info: dict) -> list[str]:
    runtime = "-"
    if info["with_cuda"]:
        found = info["cuda_runtime_found"]
        runtime = f"{found} found" if found is not None else "no driver"
    rows = [("", "built with", "running with"),
            ("python", info["python"], platform.python_version()),
            ("torch", info["torch"], torch.__version__),
            ("torch CUDA", str(info["torch_cuda"]), str(torch.version.cuda)),
            ("nvcc", info["nvcc"] or "- (no CUDA kernels built)", "-"),
            ("CUDA runtime", str(info.get("cuda_runtime_compiled", "-")), runtime),
            ("GPU archs", info["cuda_archs"] or "-", ", ".join(_gpus()) or "no GPU")]
    return ["versions", *_table(rows)]


def _cpu(info: dict) -> list[str]:
    forced = os.environ.get("DIFFKERN_CPU_ISA")
    how = f"DIFFKERN_CPU_ISA={forced}" if forced else "the widest this CPU runs"
    rows = [("machine", f"{platform.machine()}, {_cpu_model()}, {os.cpu_count()} cores, "
                        f"{torch.get_num_threads()} torch threads"),
            ("baseline", info["cpu_arch"]),
            ("variants", ", ".join(info["cpu_variants"])),
            ("loaded", f"{info['cpu_isa']} ({how})")]
    return ["CPU kernels", *_table(rows)]


def _gpu_and_triton(info: dict) -> list[str]:
    interpret = ("1: Triton kernels run on CPU tensors in the interpreter" if _triton.interpreting()
                 else f"{os.environ.get('TRITON_INTERPRET', 'unset')}: no Triton on CPU tensors "
                      "(TRITON_INTERPRET=1 must be set before triton is imported)")
    rows = [("CUDA kernels", "built" if info["with_cuda"] else "not built (CUDA tensors run Triton)"),
            ("GPU driver", f"present, {torch.cuda.device_count()} device(s)" if torch.cuda.is_available()
             else "none (or no visible device)"),
            ("triton", _triton_version()),
            ("TRITON_INTERPRET", interpret)]
    return ["GPU and Triton", *_table(rows)]


def _environment() -> list[str]:
    rows = [(name, os.environ[name]) for name in RUNTIME_VARIABLES if name in os.environ]
    return ["environment", *(_table(rows) if rows else ["  none of " + ", ".join(RUNTIME_VARIABLES) + " set"])]


def _on_cpu(op: str, name: str) -> str | None:
    """Why backend `name` of `op` cannot run on CPU tensors here, or None when it can."""
    if name == "triton" and not _triton.interpreting():
        return "needs TRITON_INTERPRET=1"
    if name == "cuda" and _registry.harness_missing(op):
        return "test harness only"
    return None


def _listing(names: list[str], why) -> str:
    return ", ".join(name if why(name) is None else f"{name} ({why(name)})" for name in names)


def _backends(info: dict) -> list[str]:
    gpu = "CUDA tensors" + ("" if torch.cuda.is_available() else " (no GPU here)")
    rows = [("op", "CPU tensors", gpu)]
    for op in sorted(_registry._impls):
        names = list(_registry.available(op))
        try:
            on_gpu, default = [_registry.gpu_backend(op)], ""
        except NotImplementedError:
            on_gpu, default = [], "no default; "
        on_gpu += [n for n in names if n not in on_gpu and n != "cpu"]
        unbuilt = "" if info["with_cuda"] else "cuda"
        rows.append((op, _listing(names, lambda n: _on_cpu(op, n)),
                     default + _listing(on_gpu, lambda n: "not built" if n == unbuilt else None)))
    return ["backends (default first)", *_table(rows)]


def report() -> str:
    """The whole report as text."""
    info = build_info()
    header = f"diffkern at {os.path.dirname(os.path.abspath(__file__))}, {platform.platform()}"
    sections = [[header], _versions(info), _cpu(info), _gpu_and_triton(info), _environment(), _backends(info)]
    return "\n\n".join("\n".join(lines) for lines in sections)


if __name__ == "__main__":
    print(report())
