"""One PNG: per workload, CPU time and modeled GPU traffic of eager, torch.compile/minimum and diffkern (a traffic
bar from a workload's model rather than the interpreter's count is labelled "(modeled)"; a case the run did not
count has no bar)."""
from __future__ import annotations

import textwrap

from .. import _optional

plt = _optional.pyplot("plots")

_COLORS = {"eager": "#c44e52", "compile": "#dd8452", "minimum": "#8c8c8c", "diffkern": "#4c72b0"}


def _bars(ax, rows: list[dict], series: dict[str, str], scale: float, ylabel: str, title: str) -> None:
    rows = [r for r in rows if "error" not in r and "not_counted" not in r]
    if not rows:
        ax.set_axis_off()
        ax.set_title(textwrap.fill(f"{title}: not in this run (the report says why)", 70), fontsize=9)
        return
    width = 0.8 / len(series)
    for i, (label, key) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [r[key] * scale for r in rows], width, label=label, color=_COLORS[label])
    ax.set_xticks(range(len(rows)), [f"{textwrap.fill(r['case'], 13)}\n{r['pass']}"
                                     + ("\n(modeled)" if r.get("source") == "modeled" else "") for r in rows], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def plot(results: dict, path: str) -> None:
    workloads = results["workloads"]
    fig, axes = plt.subplots(len(workloads), 2, figsize=(14, 4.5 * len(workloads)), squeeze=False)
    meta = results["meta"]
    for (name, w), (cpu_ax, traffic_ax) in zip(workloads.items(), axes):
        _bars(cpu_ax, w["cpu"]["rows"], {"eager": "eager_ms", "compile": "compile_ms", "diffkern": "diffkern_ms"},
              1.0, "ms per call (log)", f"{w['title']}: CPU time, {meta['cpu_dtype']}, {meta['torch_threads']} threads")
        _bars(traffic_ax, w["traffic"]["rows"],
              {"eager": "eager_bytes", "minimum": "min_bytes", "diffkern": "diffkern_bytes"},
              1e-6, "MB moved (log)", f"{w['title']}: modeled GPU traffic, {meta['traffic_dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
