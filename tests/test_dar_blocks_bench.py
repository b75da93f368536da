"""The DiT-S step benchmark (diffkern.bench.dar_model) runs end to end on its --quick shapes and reports every
candidate; it asserts the report's shape, never a timing."""
import json

from diffkern.bench import dar_model


def test_quick_run_reports_every_candidate_against_the_residual(tmp_path):
    md = dar_model.report(quick=True, out=str(tmp_path), batch=1, rounds=1)
    rows = json.loads((tmp_path / "dar_model.json").read_text())
    assert [r["model"] for r in rows] == list(dar_model.CANDIDATES)
    base = rows[0]
    assert base["over_residual"] == 1.0 and base["routing_share"] is None
    for r in rows[1:]:
        assert r["cpu_ms"] > 0 and r["wall_ms"] > 0 and 0 < r["routing_share"] < 1
        assert r["params"] > base["params"]  # the router's own parameters
    assert "Bar: DAR step <= 1.50x residual" in md
