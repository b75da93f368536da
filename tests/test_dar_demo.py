"""Smoke run of `python -m diffkern.demos.dar` on a tiny model and a few steps: it trains both streams, writes its
figures and JSON, prints the table, and gives both models the same start."""
import json

from diffkern.demos import dar as demo

TINY = ["--steps", "4", "--batch", "8", "--hidden", "16", "--depth", "2", "--heads", "2", "--chunk-size", "2",
        "--samples-per-class", "1", "--ode-steps", "2", "--eval-every", "2", "--quiet"]


def test_demo_trains_both_streams_and_writes_its_outputs(tmp_path, capsys):
    summary = demo.main(["--out", str(tmp_path), *TINY])
    for name in ("dar_demo_loss.png", "dar_demo_samples.png", "dar_demo_diagnose.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG", name
    saved = json.loads((tmp_path / "dar_demo.json").read_text())
    assert set(saved["results"]) == set(saved["losses"]) == {"residual", "dar"}
    out = capsys.readouterr().out
    assert "| residual |" in out and "| dar |" in out
    losses = summary["losses"]
    assert all(len(v) == 4 for v in losses.values())
    # adaLN-Zero: both models output 0 before the first update, and they see the same first batch and draws
    assert losses["residual"][0] == losses["dar"][0]
    # ...after which they differ: the DAR stream is a different model
    assert losses["residual"][1:] != losses["dar"][1:]
    for r in saved["results"].values():
        assert [s for s, _ in r["val"]] == [2, 4]
        assert 0.0 <= r["sample_accuracy"] <= 1.0
