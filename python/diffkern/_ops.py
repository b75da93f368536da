"""Loads the compiled extension (every op schema and the C++ kernels) after checking it matches this torch.

A missing or mismatched extension does not fail `import diffkern`: the references, models and modules
still import and run, `LOAD_ERROR` holds the reason, and `ops` (the op namespace every public wrapper
calls through, `torch.ops.diffkern` when loaded) raises that `ExtensionError` when a compiled op is called.

A mismatched build is the most common way a torch extension breaks, so the build's torch/CUDA versions
are read from a plain Python file first and compared before the shared library is touched. Loading
diffkern._C also loads the CPU kernels of the widest ISA variant this CPU runs, or of the one
DIFFKERN_CPU_ISA names (csrc/diffkern/cpu_dispatch.cpp); `build_info()["cpu_isa"]` says which.
"""
from __future__ import annotations

import glob
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_REBUILD = ("rebuild it against the installed torch: `make build` in a source checkout, or from anywhere "
            "`pip install --no-build-isolation --force-reinstall --no-deps <diffkern source directory or archive>`")


class ExtensionError(ImportError):
    """diffkern._C is missing or was built for another torch."""


def _build_info() -> dict:
    try:
        from ._build_info import BUILD_INFO
    except ImportError:
        raise ExtensionError(f"diffkern's compiled extension (diffkern._C) is not built; {_REBUILD}") from None
    return BUILD_INFO


def _check_versions(info: dict) -> None:
    if info["torch"] != torch.__version__:
        raise ExtensionError(
            f"diffkern._C was built for torch {info['torch']} but torch {torch.__version__} is installed; install "
            f"that torch (`pip install torch=={info['torch'].split('+')[0]}`) or {_REBUILD}")
    if info["torch_cuda"] != torch.version.cuda:
        raise ExtensionError(
            f"diffkern._C was built for a torch with CUDA {info['torch_cuda']} but the installed torch has "
            f"CUDA {torch.version.cuda}; {_REBUILD}")


def load() -> dict:
    """Loads diffkern._C once and returns the build info (versions, archs, CUDA on/off)."""
    info = _build_info()
    _check_versions(info)
    # _C itself, not the CPU kernel libraries beside it (_C_cpu_<variant>.*.so), which it loads.
    libraries = [path for ext in ("so", "pyd") for pattern in (f"_C.{ext}", f"_C.*.{ext}")
                 for path in glob.glob(os.path.join(_HERE, pattern))]
    if not libraries:
        raise ExtensionError(f"diffkern._C is not built (no _C library next to {__file__}); {_REBUILD}")
    try:
        torch.ops.load_library(libraries[0])
    except OSError as err:
        raise ExtensionError(f"diffkern._C failed to load ({err}); {_REBUILD}") from err
    try:
        torch.ops.diffkern.cpu_isa()
    except RuntimeError as err:
        fix = "unset DIFFKERN_CPU_ISA" if os.environ.get("DIFFKERN_CPU_ISA") else _REBUILD
        raise ExtensionError(f"{err}; {fix}") from None
    return info


class _Missing:
    """Stands in for torch.ops.diffkern when the extension did not load: calling any op raises the load error."""

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise ExtensionError(f"diffkern::{name} cannot run: {LOAD_ERROR}")
        return missing


try:
    BUILD_INFO, LOAD_ERROR = load(), None
except ExtensionError as err:
    if hasattr(torch.ops.diffkern, "cpu_isa"):
        raise  # _C loaded but no CPU kernel variant can (DIFFKERN_CPU_ISA): a setting to fix, not a missing build
    BUILD_INFO, LOAD_ERROR = None, err
LOADED = LOAD_ERROR is None
ops = torch.ops.diffkern if LOADED else _Missing()


def build_info() -> dict:
    """How the extension was built (torch, CUDA, archs, CPU arch) and what it runs with here.

    cpu_arch is the baseline -march everything but the wide CPU kernels was compiled for, cpu_variants the
    CPU kernels' ISA variants (baseline first), cpu_isa the one loaded in this process. With CUDA built:
    the CUDA runtime compiled against and the one found (None without a driver). Raises ExtensionError when
    the extension did not load.
    """
    if not LOADED:
        raise LOAD_ERROR
    info = dict(BUILD_INFO, cpu_isa=torch.ops.diffkern.cpu_isa())
    if info["with_cuda"]:
        linked = torch.ops.diffkern.cuda_runtime_version()
        info["cuda_runtime_compiled"] = linked % 1_000_000
        info["cuda_runtime_found"] = linked // 1_000_000 if linked >= 0 else None
    return info
