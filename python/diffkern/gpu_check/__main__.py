"""`python -m diffkern.gpu_check --out DIR [--cpu-dry-run] [--sections a,b] [--budget-s 480]`.

Runs the sections in order (context.SECTIONS), each `diffkern.gpu_check.<section>.run(ctx)`; a section
that raises is one "fail" row with the error's last line and the run goes on; a section whose module is
not there is one "skip" row. Writes DIR/gpu_check.json and DIR/gpu_check.md, prints the table; exit
code 0 when no row is "fail" ("not met" bars do not fail the run).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from .context import SECTIONS
    parser = argparse.ArgumentParser(prog="python -m diffkern.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run on CPU: Triton interpreter, tiny shapes, GPU-only work skipped with a note")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall seconds the whole run may take")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {SECTIONS}")
    if args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    return args


def _section_rows(name: str, ctx) -> list:
    from .context import Row
    ctx.log(f"section {name}")
    try:
        module = importlib.import_module(f"{__package__}.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"{__package__}.{name}":
            return [Row(name, name, "skip", "section not built")]
        return _failed(name, err)
    except Exception as err:  # noqa: BLE001 - a module that does not import is that section's failure
        return _failed(name, err)
    try:
        return list(module.run(ctx))
    except Exception as err:  # noqa: BLE001 - one broken section must not hide the others
        return _failed(name, err)


def _failed(name: str, err: Exception) -> list:
    from .context import Row
    traceback.print_exc(file=sys.stderr)
    return [Row(name, f"{name} section", "fail", traceback.format_exception_only(type(err), err)[-1].strip())]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.cpu_dry_run:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--cpu-dry-run needs TRITON_INTERPRET=1 before triton is imported; triton already is")
        os.environ["TRITON_INTERPRET"] = "1"
        from .. import _triton
        _triton.restore_after_device_calls()  # diffkern._triton was imported before the switch was set
    import torch

    from . import report
    from .context import Context

    start = time.monotonic()
    if args.cpu_dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        raise SystemExit("no CUDA device: run with --cpu-dry-run")
    args.out.mkdir(parents=True, exist_ok=True)  # sections may write their own files there
    ctx = Context(device=device, dry_run=args.cpu_dry_run, out=args.out, deadline=start + args.budget_s)
    rows = []
    for name in args.sections:
        rows += _section_rows(name, ctx)
    table = report.write(ctx, rows, args.sections, wall_s=time.monotonic() - start)
    print(table)
    return 1 if any(r.status == "fail" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
