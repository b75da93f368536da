"""What every gpu_check section shares: the run's `Context` and the `Row`s a section reports."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

SECTIONS = ("env", "correctness", "cooperative", "capture", "sanitizer", "timing", "registers")
STATUSES = ("pass", "fail", "skip", "info", "met", "not met")


@dataclass
class Row:
    """One line of the report: `status` is one of STATUSES; `detail` one line (the error, the max error
    against its bound, why skipped); `metrics` json-serialisable numbers."""
    section: str
    name: str
    status: str
    detail: str = ""
    metrics: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.section not in SECTIONS:
            raise ValueError(f"Row.section {self.section!r} is not one of {SECTIONS}")
        if self.status not in STATUSES:
            raise ValueError(f"Row.status {self.status!r} is not one of {STATUSES}")


@dataclass
class Context:
    """The run: `device` is the current CUDA device on a GPU and cpu in the dry run (tiny shapes, Triton
    interpreter; timings, sanitizer and capture skipped with a note); `deadline` is the time.monotonic()
    by which the whole run must end; `peaks` is filled by the env section ({"copy_gbps", "bf16_tflops"},
    None in the dry run)."""
    device: torch.device
    dry_run: bool
    out: Path
    deadline: float
    peaks: dict = field(default_factory=lambda: {"copy_gbps": None, "bf16_tflops": None})

    def time_left(self) -> float:
        """Seconds until the deadline (negative once past it)."""
        return self.deadline - time.monotonic()

    def log(self, msg: str) -> None:
        """One progress line on stderr, stamped with the seconds left, flushed."""
        print(f"[gpu_check {self.time_left():6.0f}s left] {msg}", file=sys.stderr, flush=True)
