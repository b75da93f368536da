"""Smoke test of the benchmark harness: `benchmarks/run.py --quick` end to end, structure only.

Timings are never asserted (benchmarks measure, tests assert); traffic counts are, because they are
deterministic counts with properties that must hold.
"""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from diffkern.bench import cpu_gap, dar, dar_stack, interpreted, kernel_roofline, report, traffic
from diffkern.bench.mode import MODES
from diffkern.bench.workload import REPORT_MODULES, registered

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSES_CPU = {"fwd", "fwd+bwd"}
PASSES_TRAFFIC = {"fwd", "bwd", "fwd+bwd"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]
    with open(out / "bench.json") as f:
        results = json.load(f)
    return out, run.stdout, results, run.stderr


def rows_by_case(results, section):
    """(rows of one case) for every case of every workload, in one section."""
    for w in results["workloads"].values():
        for case in w["cases"]:
            yield [r for r in w[section]["rows"] if r["case"] == case["name"]]


def test_quick_run_writes_json_markdown_and_png(quick_run):
    out, _, _, _ = quick_run
    assert (out / "bench.md").read_text().startswith("# diffkern benchmark")
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_is_printed(quick_run):
    out, stdout, _, _ = quick_run
    assert stdout.strip() == (out / "bench.md").read_text().strip()


def test_every_workload_has_every_section(quick_run):
    _, _, results, _ = quick_run
    assert results["workloads"], "no workload registered"
    assert results["meta"]["torch_threads"] >= 1
    for w in results["workloads"].values():
        for name in ("cpu", "traffic", "resources", "gpu"):
            assert w[name]["status"] in {"ok", "skipped", "error"}
        for name in ("cpu", "traffic", "resources"):
            assert w[name]["status"] == "ok", w[name]["note"]
            assert w[name]["rows"] and not [r for r in w[name]["rows"] if "error" in r]
        assert w["gpu"]["status"] == ("ok" if results["meta"]["gpu"] else "skipped")


def test_cpu_rows_cover_both_passes_with_positive_times(quick_run):
    _, _, results, _ = quick_run
    for rows in rows_by_case(results, "cpu"):
        assert {r["pass"] for r in rows} == PASSES_CPU
        for r in rows:
            for key in ("eager_ms", "compile_ms", "diffkern_ms", "compile_first_call_s"):
                assert r[key] > 0 and math.isfinite(r[key])


def test_traffic_counts_never_undercut_the_minimum(quick_run):
    _, _, results, _ = quick_run
    for rows in rows_by_case(results, "traffic"):
        assert {r["pass"] for r in rows} == PASSES_TRAFFIC
        for r in rows:
            assert isinstance(r["diffkern_bytes"], int) and r["diffkern_bytes"] >= r["min_bytes"] > 0
            assert r["eager_bytes"] > 0 and r["diffkern_launches"] >= 1 and r["eager_kernels"] >= 1


def test_every_bar_has_a_verdict(quick_run):
    _, stdout, results, _ = quick_run
    for w in results["workloads"].values():
        assert w["bars"]
        for bar in w["bars"]:
            assert bar["met"] in {True, False, None}
            assert bar["bar"] in stdout


def test_every_extra_report_is_written_without_error(quick_run):
    out, stdout, _, _ = quick_run
    for name in REPORT_MODULES:
        assert (out / f"{name}.md").read_text().strip() in stdout, name
    assert "error:" not in stdout


def test_progress_lines_are_stamped_and_name_every_workload(quick_run):
    _, _, results, stderr = quick_run
    steps = [m.group(1) for m in re.finditer(r"^\[ *\d+\.\ds\] (.*)$", stderr, re.MULTILINE)]
    for name in [*results["workloads"], *REPORT_MODULES]:
        assert any(step.startswith(f"{name}: ") for step in steps), name


def test_every_traffic_row_says_whether_it_is_counted_or_modeled(quick_run):
    _, stdout, results, _ = quick_run
    assert results["meta"]["mode"] == "quick"
    for w in results["workloads"].values():
        assert {r["source"] for r in w["traffic"]["rows"]} <= {"counted", "modeled"}
    assert "| case | pass | source |" in stdout


def test_every_workload_has_a_kernel_roofline_table_that_adds_up_to_its_traffic(quick_run):
    """Per case and pass, one total row; its launches and bytes are the traffic row's (the same counts), its
    predicted time the sum of its kernels' and at least the op-level minimum's (where the op has a FLOP
    formula); the table is printed."""
    _, stdout, results, _ = quick_run
    for w in results["workloads"].values():
        assert w["roofline"]["status"] == "ok", w["roofline"]["note"]
        traffic_rows = {(r["case"], r["pass"]): r for r in w["traffic"]["rows"]}
        for (case, p), t in traffic_rows.items():
            rows = [r for r in w["roofline"]["rows"] if (r["case"], r["pass"]) == (case, p)]
            (total,) = [r for r in rows if r["kernel"] == kernel_roofline.TOTAL]
            assert (total["launches"], total["bytes"]) == (t["diffkern_launches"], t["diffkern_bytes"])
            assert total["h100_us"] >= total.get("min_h100_us", 0) * (1 - 1e-9) and total["h100_us"] > 0
            if p != "fwd+bwd":
                kernels = [r for r in rows if r is not total]
                assert kernels and math.isclose(total["h100_us"], sum(r["h100_us"] for r in kernels))
    assert stdout.count("### Per-kernel roofline") == len(results["workloads"])


def test_the_default_run_counts_a_subset_of_the_full_runs_cases():
    full, default = MODES["full"], MODES["default"]
    cases = [(w, c) for w in registered() for c in w.cases(False)]
    assert all(full.counts(w, c) for w, c in cases if default.counts(w, c))
    assert not any(default.counts(dar.ROUTE, c) for c in dar.ROUTE.full_cases)
    assert all(full.counts(dar.ROUTE, c) for c in dar.ROUTE.full_cases)


def test_a_case_the_default_run_leaves_out_is_one_row_saying_so():
    case = dar_stack.STACK.full_cases[0]
    assert not MODES["default"].counts(dar_stack.STACK, case) and interpreted._modeled(dar_stack.STACK, case, "bfloat16") is None
    entry = interpreted._not_counted(case).result()
    rows = [r for r in traffic.rows(dar_stack.STACK, False, [entry], torch.bfloat16) if r["case"] == case.name]
    assert rows == [{"case": case.name, "pass": "fwd+bwd", "not_counted": entry["not_counted"]}]
    assert report._errors(rows) == [f"- {case.name}: not counted in this run: {entry['not_counted']}"]
    assert "FULL=1" in entry["not_counted"] and case.name in traffic.note([entry])


def test_cpu_gap_section_has_a_judged_line_per_row_case_pass_and_thread_count(quick_run):
    out, _, _, _ = quick_run
    lines = json.loads((out / "cpu_gap.json").read_text())["lines"]
    want = {(r.title, c.name, p, n) for r in cpu_gap.ROWS for c in r.cases(MODES["quick"]) for p in r.passes
            for n in cpu_gap.THREADS}
    assert {(x["row"], x["case"], x["pass"], x["threads"]) for x in lines} == want and len(lines) == len(want)
    for x in lines:
        assert x["verdict"] in {"met", "not met"} or x["verdict"].startswith("at machine limit (")
        assert (x["fraction"] is None) == (x["limit"] is None)
        if x["limit"] is not None:
            assert x["fraction"] > 0 and math.isfinite(x["fraction"]) and x["limit_rate"] > 0
