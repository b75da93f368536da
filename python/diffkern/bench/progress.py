"""Progress lines on stderr while the harness runs, each stamped with the seconds since it started."""
from __future__ import annotations

import sys
import time


class Progress:
    """Callable as `log(msg)`: prints `[  12.3s] msg` to stderr at once (the Markdown goes to stdout)."""

    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, msg: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {msg}", file=sys.stderr, flush=True)
