"""gpu_check's outputs: DIR/gpu_check.json (every row, the peaks, the run's settings) and DIR/gpu_check.md
(one table per section), whose text is also what the run prints."""
from __future__ import annotations

import json
from dataclasses import asdict

from .context import Context, Row


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(ctx: Context, rows: list[Row], sections: list[str], wall_s: float) -> str:
    """The report as Markdown: a summary line, then per section a table name | status | detail."""
    fails = sum(r.status == "fail" for r in rows)
    mode = "CPU dry run" if ctx.dry_run else f"device {ctx.device}"
    lines = [f"# gpu_check ({mode}): {len(rows)} rows, {fails} fail, {wall_s:.1f} s wall", ""]
    for section in sections:
        lines += [f"## {section}", "", "| name | status | detail |", "|---|---|---|"]
        lines += [f"| {_cell(r.name)} | {r.status} | {_cell(r.detail)} |" for r in rows if r.section == section]
        lines.append("")
    return "\n".join(lines)


def write(ctx: Context, rows: list[Row], sections: list[str], wall_s: float) -> str:
    """Writes gpu_check.json and gpu_check.md into ctx.out; returns the Markdown."""
    text = markdown(ctx, rows, sections, wall_s)
    env = {r.name: r.metrics for r in rows if r.section == "env"}
    doc = {"dry_run": ctx.dry_run, "device": str(ctx.device), "wall_s": wall_s, "sections": sections,
           "peaks": ctx.peaks, "env": env, "rows": [asdict(r) for r in rows]}
    (ctx.out / "gpu_check.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (ctx.out / "gpu_check.md").write_text(text)
    return text
