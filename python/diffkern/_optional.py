"""Optional dependencies: imported where used, with the pip extra that installs them named when missing."""
from __future__ import annotations

import importlib
import types


def require(name: str, extra: str) -> types.ModuleType:
    """The module `name`, or an ImportError naming the extra (`pip install 'diffkern[extra]'`) that brings it."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"{name} is not installed; it is an optional dependency of diffkern, installed by "
                          f"`pip install 'diffkern[{extra}]'`") from err


def pyplot(extra: str) -> types.ModuleType:
    """matplotlib.pyplot on the non-interactive Agg backend (files only, no display needed), or the ImportError
    of `require` naming `extra`."""
    require("matplotlib", extra).use("Agg")
    return importlib.import_module("matplotlib.pyplot")
