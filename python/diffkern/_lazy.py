"""Modules imported on first use, so that `import diffkern` does not pay for triton.

The Triton kernels (`<technique>/triton_kernels.py`) import triton and define every @triton.jit kernel at
import, about 0.2 s; they are needed only when a Triton backend runs. Code that registers a backend
before then must not read the module's attributes (register `kernels.function("f")` instead).
"""
from __future__ import annotations

import importlib


class _LazyModule:
    """Stands for a module and imports it when one of its attributes is first read.

    It is not placed in sys.modules (inspect.getmodule, which torch.library calls, reads every module
    there and would import it at once); the real module lands there on first use, as any import does.
    """

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)

    def function(self, attr: str):
        """The module's function `attr` as a callable that imports the module on its first call, so a
        backend can be registered at import without importing it."""
        return lambda *args: getattr(self, attr)(*args)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def module(name: str) -> _LazyModule:
    """The module `name` (absolute), imported when one of its attributes is first read."""
    return _LazyModule(name)
