"""Section 5: compute-sanitizer memcheck and racecheck over tiny calls of every CUDA C++ kernel.

Each tool runs `python -m diffkern.gpu_check.sanitize_cases` in a subprocess with PyTorch's caching
allocator off (PYTORCH_NO_CUDA_MEMORY_CACHING=1: every tensor its own allocation, so memcheck sees a
read past a tensor's end instead of landing in a neighbour within the same cached block), limited to
TOOL_TIMEOUT_S and to the run's time left. Its report is parsed (`parse`): 0 errors and every case done
passes; errors fail with the first one; a tool that never reaches its summary (it refuses the device,
the driver is too old, ...) is a skip quoting its message. The dry run runs the case script without the
tool: on the CUDA kernels in the host-execution harness where that is built (its bounds and race checks
stand in for the tools), else on the C++ CPU kernels (it proves the script runs); the tools are skips.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .context import Row

SECTION = "sanitizer"
TOOLS = ("memcheck", "racecheck")
# Seconds per tool at most, and kept for the sections after this one (timing, registers).
TOOL_TIMEOUT_S, RESERVE_S = 120.0, 150.0
CASES_DONE = "cases done"


def find_sanitizer() -> str | None:
    """compute-sanitizer on PATH, else in $CUDA_HOME/bin or /usr/local/cuda/bin."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        path = Path(root or "") / "bin" / "compute-sanitizer"
        if root and path.is_file():
            return str(path)
    return None


def parse(output: str, returncode: int = 0) -> dict:
    """What a compute-sanitizer run reported: errors (the ERROR SUMMARY, or racecheck's error count; None
    when the tool printed no summary), warnings (racecheck's), the first reported problem, the tool's
    own messages, whether the case script finished, and the exit status (the target's, which the tool
    passes on: a target that died can come with a clean summary)."""
    tool_lines = [line.removeprefix("=========").strip() for line in output.splitlines()
                  if line.startswith("=========") and line.strip("= ")]
    errors = warnings = None
    summary = re.search(r"ERROR SUMMARY: (\d+) errors?", output)
    if summary:
        errors = int(summary.group(1))
    race = re.search(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?, (\d+) warnings?\)", output)
    if race:
        errors, warnings = max(errors or 0, int(race.group(1))), int(race.group(2))
    problems = [line for line in tool_lines if re.match(r"(Invalid|Error|Race|Warning|Program hit|Barrier|"
                                                        r"Uninitialized|Malloc|Leaked|Address)", line)
                and "SUMMARY" not in line]
    return {"errors": errors, "warnings": warnings, "first_problem": problems[0] if problems else "",
            "tool_message": " | ".join(tool_lines[-3:]), "cases_done": CASES_DONE in output,
            "returncode": returncode}


def verdict(tool: str, report: dict) -> Row:
    """The row for one tool's parsed report."""
    name = f"compute-sanitizer {tool}"
    metrics = {k: report[k] for k in ("errors", "warnings", "cases_done", "returncode")}
    if report["errors"] is None:
        return Row(SECTION, name, "skip", f"no summary from the tool: {report['tool_message'] or 'no output'}",
                   metrics)
    if report["errors"]:
        return Row(SECTION, name, "fail", f"{report['errors']} errors; first: {report['first_problem']}", metrics)
    if not report["cases_done"] or report["returncode"]:
        return Row(SECTION, name, "fail", f"0 errors but the cases did not finish (exit status "
                                          f"{report['returncode']}): {report['tool_message']}", metrics)
    return Row(SECTION, name, "pass", f"0 errors ({report['warnings'] or 0} warnings)", metrics)


def _cases_cmd(device: str) -> list[str]:
    return [sys.executable, "-m", "diffkern.gpu_check.sanitize_cases", "--device", device]


def _run_tool(ctx, sanitizer: str, tool: str) -> Row:
    budget = min(TOOL_TIMEOUT_S, ctx.time_left() - RESERVE_S)
    if budget < 20:
        return Row(SECTION, f"compute-sanitizer {tool}", "skip", "out of time")
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    cmd = [sanitizer, "--tool", tool, "--print-limit", "20", *_cases_cmd("cuda")]
    try:
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return Row(SECTION, f"compute-sanitizer {tool}", "skip", f"timed out after {budget:.0f} s (the run's budget)")
    return verdict(tool, parse(run.stdout + run.stderr, run.returncode))


def run(ctx) -> list[Row]:
    if ctx.dry_run or ctx.device.type != "cuda":
        from ..testing import cuda_harness
        where = "harness" if cuda_harness.built() else "cpu"
        cases = subprocess.run(_cases_cmd(where), capture_output=True, text=True, timeout=300)
        ok = cases.returncode == 0 and CASES_DONE in cases.stdout
        n = sum(line.startswith("case ") for line in cases.stdout.splitlines())
        kernels = "the CUDA kernels in the host harness" if where == "harness" else "the C++ CPU kernels"
        rows = [Row(SECTION, f"sanitize_cases on {kernels}", "pass" if ok else "fail",
                    f"{n} cases" if ok else (cases.stderr.strip().splitlines() or ["no output"])[-1])]
        return rows + [Row(SECTION, f"compute-sanitizer {tool}", "skip", "needs CUDA") for tool in TOOLS]
    sanitizer = find_sanitizer()
    if sanitizer is None:
        return [Row(SECTION, f"compute-sanitizer {tool}", "skip", "compute-sanitizer not found") for tool in TOOLS]
    rows = []
    for tool in TOOLS:
        ctx.log(f"compute-sanitizer --tool {tool}")
        rows.append(_run_tool(ctx, sanitizer, tool))
    return rows
