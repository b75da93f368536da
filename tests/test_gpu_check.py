"""python -m diffkern.gpu_check: the CPU dry run end to end, and the driver's fail rows.

The dry run proves the GPU check runs before any GPU minute is spent on it: every section present in
gpu_check.json and gpu_check.md, no "fail" row, exit code 0. The other tests show that it can fail: a
backend giving a wrong answer is a "fail" row, a section that raises is one, and either makes the exit
code 1.
"""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import torch

from diffkern import _registry
from diffkern.gpu_check import __main__ as driver
from diffkern.gpu_check import cases, correctness
from diffkern.gpu_check.context import SECTIONS, Context, Row

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def dry_context(tmp_path) -> Context:
    return Context(device=CPU, dry_run=True, out=tmp_path, deadline=float("inf"))


def test_cpu_dry_run_runs_every_section_without_a_fail_row(tmp_path):
    """The dry run as a user starts it, on a machine whose Triton cache is empty (so its registers section
    compiles after the interpreted sections, as on a fresh CI machine)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the driver sets it itself
    env["PYTHONPATH"] = str(ROOT / "python") + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    run = subprocess.run([sys.executable, "-m", "diffkern.gpu_check", "--cpu-dry-run", "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    fails = [r for r in doc["rows"] if r["status"] == "fail"]
    assert not fails, fails
    assert doc["dry_run"] and doc["sections"] == list(SECTIONS)
    assert {r["section"] for r in doc["rows"]} == set(SECTIONS)
    md = (tmp_path / "gpu_check.md").read_text()
    assert all(f"## {s}\n" in md for s in SECTIONS)
    assert md.strip() in run.stdout
    # every public op has correctness rows, forward and backward where it has one
    names = " ".join(r["name"] for r in doc["rows"] if r["section"] == "correctness" and r["status"] == "pass")
    for op in ("dar_route", "dar_gather", "flow_sde_step", "grpo_iso_loss", "ntrk_step", "twoos_project", "whiten",
               "recurse", "sink_mass", "sink_attention", "sink_attention_given"):
        assert f"{op} " in names, op
    assert " triton float32 fwd" in names and " cpu float32 bwd" in names


def ntrk_case() -> cases.OpCase:
    return next(c for c in cases.catalogue(tiny=True) if c.op == "ntrk_step" and c.shape == "odd misaligned")


def test_a_backend_off_the_reference_is_a_fail_row(tmp_path, monkeypatch):
    """ntrk_step's Triton backend replaced by the reference with x off by one part in 10^4: a fail row,
    where the real backend passes."""
    ctx, oracles, case = dry_context(tmp_path), correctness.Oracles(CPU), ntrk_case()
    row, _ = correctness.check(ctx, oracles, case, torch.float32, "fwd", "triton", "triton")
    assert row.status == "pass", row
    reference = _registry._impls["ntrk_step"]["reference"]
    monkeypatch.setitem(_registry._impls["ntrk_step"], "triton", lambda *args: reference(*args) * (1 + 1e-4))
    row, _ = correctness.check(ctx, oracles, case, torch.float32, "fwd", "triton", "triton")
    assert row.status == "fail" and "max error" in row.detail, row


def test_a_backend_that_raises_is_a_fail_row_naming_the_error(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("kernel launch failed")
    monkeypatch.setitem(_registry._impls["ntrk_step"], "triton", broken)
    row, _ = correctness.check(dry_context(tmp_path), correctness.Oracles(CPU), ntrk_case(), torch.float32, "fwd",
                               "triton", "triton")
    assert row.status == "fail" and "kernel launch failed" in row.detail, row


def test_a_section_that_raises_is_a_fail_row_and_the_exit_code_is_1(tmp_path, monkeypatch, capsys):
    module = types.ModuleType("diffkern.gpu_check.sanitizer")
    module.run = lambda ctx: 1 / 0
    monkeypatch.setitem(sys.modules, "diffkern.gpu_check.sanitizer", module)
    assert driver._section_rows("sanitizer", dry_context(tmp_path)) == \
        [Row("sanitizer", "sanitizer section", "fail", "ZeroDivisionError: division by zero")]
    assert driver.main(["--cpu-dry-run", "--out", str(tmp_path), "--sections", "env,sanitizer"]) == 1
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["status"] for r in doc["rows"] if r["section"] == "sanitizer"] == ["fail"]
    assert "| sanitizer section | fail |" in capsys.readouterr().out


def test_the_dar_cases_differentiate_every_input():
    """The backward rows check the gradient of every source, q and gain (a case that forgot requires_grad
    would check nothing)."""
    case = next(c for c in cases.catalogue(tiny=True) if c.op == "dar_route" and c.shape == "strided")
    grads = correctness.backward_of(case.call, torch.float32)(*case.make(torch.float32, CPU, True))
    assert len(grads) == 3 + 2 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_gpu_rows_force_every_gpu_backend_and_the_default_routing_where_the_backward_differs(tmp_path, monkeypatch):
    """On a GPU (CUDA build): dar_route runs forced cuda and triton both ways; recurse, whose forward is
    Triton alone, runs its backward forced to Triton (its default; the ATen backward has no forward beside it)."""
    monkeypatch.setattr(_registry, "_built", lambda name: True)
    ctx = Context(device=CPU, dry_run=False, out=tmp_path, deadline=float("inf"))
    by_op = {c.op: c for c in cases.catalogue(tiny=True)}
    assert correctness._backends(by_op["dar_route"], ctx, "bwd") == [("cuda", "cuda"), ("triton", "triton")]
    assert correctness._backends(by_op["recurse"], ctx, "fwd") == [("triton", "triton")]
    assert correctness._backends(by_op["recurse"], ctx, "bwd") == [("triton", "triton")]
    assert correctness._backends(by_op["sink_attention"], ctx, "fwd") == [("triton", "triton")]
