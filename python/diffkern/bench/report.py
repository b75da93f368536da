"""The run's results as JSON and as a Markdown report (the tables `make bench` prints)."""
from __future__ import annotations

import json

from .kernel_roofline import TOTAL

MB = 1e6
MODE_NOTE = {
    "quick": "quick run (--quick: small shapes, not representative).",
    "default": "default run (headline shapes, fewer timing samples; traffic rows counted in the interpreter where "
               "that is quick, modeled where a tested model covers the case, the rest and the CUDA C++ counts left "
               "to the full run: `make bench FULL=1`).",
    "full": "full run (--full: every case counted in the interpreter).",
}


def section(rows: list | None = None, status: str = "ok", note: str = "") -> dict:
    """Every report section has one shape: status ("ok", "skipped", "error"), a note, its rows."""
    return {"status": status, "note": note, "rows": rows or []}


def write_json(results: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)


def _x(v) -> str:
    return "" if v is None else f"{v:.2f}x"


def _num(v, digits=3) -> str:
    if v is None:
        return ""
    return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"


def _table(header: list[str], lines: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return out


def _errors(rows: list[dict]) -> list[str]:
    """A line for every case a section has no figures for: a failure, or a case this run leaves to the full one."""
    return [f"- {r['case']}: **failed**: `{r['error']}`" if "error" in r else f"- {r['case']}: not counted in this "
            f"run: {r['not_counted']}" for r in rows if "error" in r or "not_counted" in r]


def _section_lines(title: str, sec: dict, header: list[str], line) -> list[str]:
    out = [f"### {title}", ""]
    if sec["status"] != "ok":
        return out + [f"{sec['status']}: {sec['note']}", ""]
    rows = [r for r in sec["rows"] if "error" not in r and "not_counted" not in r]
    out += _table(header, [line(r) for r in rows]) if rows else []
    errors = _errors(sec["rows"])
    out += ([""] if rows and errors else []) + errors
    return out + ([""] + [sec["note"]] if sec["note"] else []) + [""]


def _bars(bars: list[dict]) -> list[str]:
    def met(b):
        return "not measured in this run" if b["met"] is None else ("**met**" if b["met"] else "**not met**")

    def worst(b):
        if b["worst"] is None:
            return ""
        w = next(v for v in b["values"] if v["value"] == b["worst"])
        return f"{b['worst']:.2f}x ({w['case']}, {w['pass']})"
    return _table(["bar", "worst measured", "target", "verdict"],
                  [[b["bar"], worst(b), f"{b['op']} {b['target']:.2f}x", met(b)] for b in bars])


def _roofline_line(r: dict) -> list:
    """A kernel's row, or the op's total (in bold) beside its op-level minimum roofline."""
    is_total = r["kernel"] == TOTAL
    minimum = f"{_num(r['min_h100_us'])} ({r['min_bound']})" if "min_h100_us" in r else (
        "no op formula" if is_total else "")
    return [r["case"], r["pass"], r["source"], f"**{r['kernel']}**" if is_total else r["kernel"], r["launches"],
            _num(r["bytes"] / MB), "not counted" if r["flops"] is None else _num(r["flops"] / 1e9),
            r.get("precision", ""), _num(r["h100_us"]), r.get("bound", ""), minimum, _x(r.get("over_min"))]


def workload_markdown(name: str, w: dict, meta: dict) -> list[str]:
    out = [f"## {w['title']}", "", "Cases: " + "; ".join(c["name"] for c in w["cases"]) + ".", ""]
    out += ["### Bars (from the issue; judged on this run's numbers)", ""] + _bars(w["bars"]) + [""]
    out += _section_lines(
        f"CPU time ({meta['cpu_dtype']}, {meta['torch_threads']} threads, median per call)", w["cpu"],
        ["case", "pass", "eager ms", "torch.compile ms", "diffkern ms", "eager/diffkern", "compile/diffkern",
         "compile time s", "max abs err"],
        lambda r: [r["case"], r["pass"], _num(r["eager_ms"]), _num(r["compile_ms"]), _num(r["diffkern_ms"]),
                   _x(r["eager_over_diffkern"]), _x(r["compile_over_diffkern"]),
                   _num(r["compile_first_call_s"]), _num(r["max_abs_err_vs_eager"], 2)])
    out += _section_lines(
        f"Modeled GPU memory traffic ({meta['traffic_dtype']}; counted, not timed; "
        f"modeled H100 time = bytes / {meta['h100_hbm_bytes_per_s'] / 1e12:.2f} TB/s)", w["traffic"],
        ["case", "pass", "source", "minimum MB", "diffkern (Triton) MB", "diffkern/min", "CUDA C++ MB", "eager MB", "eager/diffkern",
         "diffkern launches", "eager kernels", "modeled H100 us: min / diffkern / eager"],
        lambda r: [r["case"], r["pass"], r["source"], _num(r["min_bytes"] / MB),
                   _num(r["diffkern_bytes"] / MB),
                   _x(r["diffkern_over_min"]), _num(r["cuda_bytes"] / MB) if "cuda_bytes" in r else "-",
                   _num(r["eager_bytes"] / MB), _x(r["eager_over_diffkern"]), r["diffkern_launches"],
                   r["eager_kernels"], " / ".join(_num(r["modeled_h100_us"][k]) for k in ("min", "diffkern", "eager"))])
    out += _section_lines(
        f"Per-kernel roofline ({meta['traffic_dtype']}; counted or modeled, not timed; predicted H100 time = "
        f"max(bytes / {meta['h100_hbm_bytes_per_s'] / 1e12:.2f} TB/s, FLOPs / the peak at the kernel's dot precision))",
        w["roofline"], ["case", "pass", "source", "kernel", "launches", "MB", "GFLOP", "dot precision",
                        "predicted H100 us", "bound", "op minimum H100 us", "total/minimum"], _roofline_line)
    out += _section_lines(
        f"Compiled resources ({meta['resources_arch']}, {meta['traffic_dtype']}, configs the cases launch)",
        w["resources"], ["kernel config", "warps", "registers", "spill stores/loads B", "stack B", "shared B"],
        lambda r: [r["name"], r["num_warps"], r["registers"], f"{r['spill_stores']}/{r['spill_loads']}",
                   r["stack_bytes"], r["shared_bytes"]])
    out += _section_lines(
        f"GPU time ({meta['traffic_dtype']}, triton.testing.do_bench median)", w["gpu"],
        ["case", "pass", "eager ms", "torch.compile ms", "diffkern ms", "eager/diffkern", "compile/diffkern",
         "diffkern TB/s (modeled bytes)"],
        lambda r: [r["case"], r["pass"], _num(r["eager_ms"]), _num(r["compile_ms"]), _num(r["diffkern_ms"]),
                   _x(r["eager_over_diffkern"]), _x(r["compile_over_diffkern"]), _num(r["diffkern_tb_per_s"])])
    return out


def markdown(results: dict) -> str:
    meta = results["meta"]
    out = ["# diffkern benchmark", "",
           f"{meta['date']}, {MODE_NOTE[meta['mode']]} "
           f"Machine: {meta['cpu']}, {meta['cores']} cores, torch threads {meta['torch_threads']}; "
           f"torch {meta['torch']}, triton {meta['triton']}; GPU: {meta['gpu'] or 'none'}. "
           "Every ratio compares candidates measured (interleaved) or counted in this one run.", ""]
    for name, w in results["workloads"].items():
        out += workload_markdown(name, w, meta)
    out.append("Harness run time, wall / CPU seconds (CPU: this process and its children, all cores): "
               + ", ".join(f"{k} {v:g} / {meta['seconds']['cpu'][k]:g}" for k, v in meta["seconds"]["wall"].items()) + ".")
    return "\n".join(out)
