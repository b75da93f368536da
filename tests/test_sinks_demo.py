"""Smoke run of `python -m diffkern.demos.sinks` on a tiny pipeline and size: it runs every mode and k, writes its
report, plots and JSON, and says in the report what a random tiny model can and cannot show."""
import json

import pytest
import torch

from diffkern.demos import sinks as demo

TINY = ["--prompts", "a cat", "a red cube", "--seeds", "2", "--steps", "2", "--blocks", "2", "--layers", "0", "1",
        "--ks", "1", "3", "--controls", "random", "anti_sink", "--size", "16", "--quiet"]


@pytest.mark.parametrize("intervention", [[], ["--intervention", "value", "--alpha", "0.5"]], ids=["mask", "value"])
def test_demo_writes_its_report_plots_and_json(tmp_path, capsys, intervention):
    threads = torch.get_num_threads()
    try:
        result = demo.main(["--out", str(tmp_path), *TINY, *intervention])
    finally:
        torch.set_num_threads(threads)  # the demo runs on one thread; the tests after it in this process do not
    for name in ("sinks_mass.png", "sinks_deviation.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG", name
    report = (tmp_path / "sinks_report.md").read_text()
    assert demo.STATEMENT in report and report in capsys.readouterr().out
    assert ("Intervention: value, alpha 0.5." if intervention else "Intervention: mask (logit bias -10000).") in report
    for mode in ("head_union", "per_head", "random", "anti_sink"):
        assert f"| {mode} | " in report.split("ΔΔ")[0], mode
        assert f"| {mode} | 3 | " in report, mode
    for control in ("random", "anti_sink"):
        assert f"| {control} | " in report.split("ΔΔ")[1], control
    assert "| transformer_blocks.1.attn | max_mass |" in report
    saved = json.loads((tmp_path / "sinks_demo.json").read_text())
    assert saved["settings"]["layers"] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    dev = result.deviation["pixel_mse"]
    assert saved["deviation"]["pixel_mse"]["head_union"]["3"]["mean"] == dev["head_union"][3].mean
    assert len(saved["deviation"]["pixel_mse"]["random"]["1"]["values"]) == 4
