"""Smoke test of the benchmark harness: `benchmarks/run.py --quick` end to end, structure only.

Timings are never asserted (benchmarks measure, tests assert); traffic counts are, because they are
deterministic counts with properties that must hold.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from diffkern.bench.workload import REPORT_MODULES

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
    return out, run.stdout, results


def rows_by_case(results, section):
    """(rows of one case) for every case of every workload, in one section."""
    for w in results["workloads"].values():
        for case in w["cases"]:
            yield [r for r in w[section]["rows"] if r["case"] == case["name"]]


def test_quick_run_writes_json_markdown_and_png(quick_run):
    out, _, _ = quick_run
    assert (out / "bench.md").read_text().startswith("# diffkern benchmark")
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_is_printed(quick_run):
    out, stdout, _ = quick_run
    assert stdout.strip() == (out / "bench.md").read_text().strip()


def test_every_workload_has_every_section(quick_run):
    _, _, results = quick_run
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
    _, _, results = quick_run
    for rows in rows_by_case(results, "cpu"):
        assert {r["pass"] for r in rows} == PASSES_CPU
        for r in rows:
            for key in ("eager_ms", "compile_ms", "diffkern_ms", "compile_first_call_s"):
                assert r[key] > 0 and math.isfinite(r[key])


def test_traffic_counts_never_undercut_the_minimum(quick_run):
    _, _, results = quick_run
    for rows in rows_by_case(results, "traffic"):
        assert {r["pass"] for r in rows} == PASSES_TRAFFIC
        for r in rows:
            assert isinstance(r["diffkern_bytes"], int) and r["diffkern_bytes"] >= r["min_bytes"] > 0
            assert r["eager_bytes"] > 0 and r["diffkern_launches"] >= 1 and r["eager_kernels"] >= 1


def test_every_bar_has_a_verdict(quick_run):
    _, stdout, results = quick_run
    for w in results["workloads"].values():
        assert w["bars"]
        for bar in w["bars"]:
            assert bar["met"] in {True, False, None}
            assert bar["bar"] in stdout


def test_every_extra_report_is_written_without_error(quick_run):
    out, stdout, _ = quick_run
    for name in REPORT_MODULES:
        assert (out / f"{name}.md").read_text().strip() in stdout, name
    assert "error:" not in stdout
