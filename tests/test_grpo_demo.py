"""The Flash-GRPO demo runs end to end (a smoke run: few updates, one seed)."""
import json
import math
import os

from diffkern.demos import grpo as demo


def test_demo_quick_run_writes_finite_curves_and_a_plot(tmp_path):
    result = demo.run(str(tmp_path), quick=True)
    assert os.path.getsize(tmp_path / "grpo_demo.png") > 10_000
    saved = json.loads((tmp_path / "grpo_demo.json").read_text())
    assert set(saved["curves"]) == set(demo.VARIANTS) == set(result["table"])
    for runs in saved["curves"].values():
        assert len(runs) == 1 and len(runs[0]) == result["params"]["updates"]
        assert all(math.isfinite(r) and r < 0 for r in runs[0])  # rewards are minus distances
