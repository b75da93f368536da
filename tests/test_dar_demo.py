"""`python -m diffkern.demos.dar --smoke`: it trains every (model, seed) job on two worker processes, writes its
figures, table and JSON, and gives every model of a seed the same start; and the demo's two readings of a
validation curve (steps to a target loss, loss at a CPU-time budget)."""
import json
import math

import pytest

from diffkern.demos import dar as demo

VARIANTS = {"residual", "dar-static", "dar-dynamic"}


def test_smoke_run_writes_finite_curves_tables_and_diagnostics(tmp_path, capsys):
    summary = demo.main(["--out", str(tmp_path), "--smoke", "--quiet"])
    for name in ("dar_demo_val.png", "dar_demo_diagnose.png", "dar_demo_samples.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG", name
    md = (tmp_path / "dar_demo.md").read_text()
    out = capsys.readouterr().out
    for v in VARIANTS:
        assert f"| {v} |" in md and f"| {v} |" in out
    saved = json.loads((tmp_path / "dar_demo.json").read_text())
    assert set(saved["runs"]) == set(saved["stats"]) == set(saved["diagnose_mean"]) == VARIANTS
    steps, depth = demo.SMOKE["steps"], demo.SMOKE["depth"]
    for v, by_seed in saved["runs"].items():
        assert sorted(by_seed) == ["0", "1"]
        for r in by_seed.values():
            assert len(r["losses"]) == steps and all(math.isfinite(x) for x in r["losses"])
            assert [s for s, _, _ in r["val"]] == [0, 2, 4, 6]
            assert all(math.isfinite(x) and x > 0 for _, _, x in r["val"])
            cpu = [c for _, c, _ in r["val"]]
            assert cpu == sorted(cpu) and cpu[-1] == r["train_cpu_s"] > 0
            d = r["diagnose"]
            assert [len(d[k]) for k in ("amplitude", "grad_rms", "cosine")] == [depth, depth, depth - 1]
            assert all(math.isfinite(x) for k in ("amplitude", "grad_rms", "cosine") for x in d[k])
        stats = saved["stats"][v]
        for key in ("final_val", "equal_time_val", "cpu_ms_per_step", "amplitude_growth", "grad_ratio", "cosine_mean"):
            assert math.isfinite(stats[key]["mean"]) and stats[key]["lo"] <= stats[key]["mean"] <= stats[key]["hi"], key
        assert 0.0 <= stats["sample_accuracy"]["mean"] <= 1.0
    # the baseline reaches its own final loss at its last step, and equal time is its own final loss
    assert saved["stats"]["residual"]["steps_to_residual_final"] == [steps, steps]
    base = saved["stats"]["residual"]
    assert base["equal_time_val"]["mean"] == pytest.approx(base["final_val"]["mean"])
    assert saved["timing"]["wall_s"] > 0 and saved["timing"]["cpu_s"] > 0
    # adaLN-Zero: every model outputs 0 before its first update and a seed's models see the same first batch and draws
    runs = summary["runs"]
    for seed in (0, 1):
        first = {v: runs[v][seed]["losses"][0] for v in VARIANTS}
        assert len(set(first.values())) == 1, first
        assert runs["residual"][seed]["losses"][1:] != runs["dar-static"][seed]["losses"][1:]


VAL = [(0, 0.0, 2.0), (50, 5.0, 1.0), (100, 10.0, 0.6), (150, 15.0, 0.7), (200, 20.0, 0.5)]


def test_steps_to_reach_is_the_first_evaluated_step_at_or_below_the_target():
    assert demo.steps_to_reach(VAL, 0.6) == 100
    assert demo.steps_to_reach(VAL, 0.65) == 100
    assert demo.steps_to_reach(VAL, 0.55) == 200
    assert demo.steps_to_reach(VAL, 0.4) is None


def test_val_at_cpu_interpolates_along_training_cpu_seconds():
    assert demo.val_at_cpu(VAL, 7.5) == pytest.approx(0.8)
    assert demo.val_at_cpu(VAL, 15.0) == pytest.approx(0.7)
    assert demo.val_at_cpu(VAL, 99.0) == pytest.approx(0.5)  # past the run's end: its last value


def test_one_seed_is_refused_since_the_intervals_need_two(tmp_path):
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path), "--seeds", "1"])
