"""The NoiseTilt demo runs end to end at its smoke size (2 seeds, tiny model): structure and sanity only."""
import json
import math
import os

from diffkern.demos import ntrk as demo


def test_demo_quick_run_writes_table_json_and_plot(tmp_path, one_thread):
    result = demo.run(str(tmp_path), quick=True)
    assert os.path.getsize(tmp_path / "ntrk_demo.png") > 10_000
    saved = json.loads((tmp_path / "ntrk_demo.json").read_text())
    p = saved["params"]
    assert len(saved["seeds"]) == p["seeds"] == result["params"]["seeds"] == 2
    expected = {"data@0", "goal data@0", "NTRK-raw@1"} | {f"{m}@{n}" for n in p["ns"] for m in ("base", "DPS", "NTRK")}
    expected |= {f"SVDD@{n}" for n in p["ns"] if n > 1}
    for s in saved["seeds"]:
        assert set(s["rows"]) == expected
        for key, r in s["rows"].items():
            n = int(key.split("@")[1])
            method = key.split("@")[0]
            nfe = {"SVDD": 25 + 24 * (n - 1), "data": 0, "goal data": 0}.get(method, 25 * n)
            assert r["NFE"] == nfe and r["VJP"] == (25 * n if method in ("DPS", "NTRK", "NTRK-raw") else 0)
            assert r["reward"] <= 0 and 0 <= r["top_left"] <= 1 and r["off"] >= 0
            assert all(math.isfinite(r[k]) for k in ("mmd_data", "mmd_goal"))
            assert all(1 / (1 + p["permutations"]) <= r[k] <= 1 for k in ("p_data", "p_goal"))
        assert s["rows"]["goal data@0"]["top_left"] == 1
        assert set(s["noise"]) == {"base", "DPS", "NTRK", "NTRK-raw"}
        for c in s["noise"].values():
            assert c["steps"] == 25 and all(0 <= c[k] <= 25 for k in ("marginal", "white", "shared"))
    summary = saved["summary"]
    assert set(summary["rows"]) == expected
    iv = summary["rows"]["NTRK@1"]["mmd_goal"]
    assert iv["lo"] <= iv["mean"] <= iv["hi"] and len(iv["values"]) == 2
    assert "NTRK - DPS @1" in summary["diffs"] and "NTRK - SVDD @2" in summary["diffs"]
    text = (tmp_path / "ntrk_demo.md").read_text()
    assert all(f"| {key} |" in text for key in expected)
