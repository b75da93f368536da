"""The per-call overhead section of the benchmark (diffkern.bench.overhead) in its quick form: structure only,
no timing thresholds (benchmarks measure, tests assert)."""
import json

import torch

from diffkern.bench import overhead


def test_quick_report_has_every_public_op_beside_the_trivial_custom_op(tmp_path):
    threads = torch.get_num_threads()
    md = overhead.report(True, str(tmp_path))
    assert torch.get_num_threads() == threads  # the one-thread timing leaves the process as it found it
    rows = json.loads((tmp_path / "overhead.json").read_text())
    assert [r["op"] for r in rows] == ["dar_route", "ntrk_step", "flow_sde_step", "grpo_iso_loss",
                                       "grpo_log_prob (log p alone)", "recurse", "trivial custom op"]
    for r in rows:
        assert r["grad_us"] > 0 and r["no_grad_us"] > 0
        assert r["grad_over_trivial_grad"] == r["grad_us"] / r["trivial_grad_us"]
        assert f"| {r['op']} |" in md
    assert rows[-1]["grad_over_trivial_grad"] == 1.0
    assert (tmp_path / "overhead.md").read_text() == md


def test_the_timed_calls_build_an_autograd_graph_only_with_grad():
    """The with-grad candidates really record a node (else the comparison would time the no-grad path twice)."""
    for grad in (True, False):
        for name, call in overhead._calls(grad).items():
            out = call()
            out = out[0] if isinstance(out, tuple) else out
            assert out.requires_grad == (grad and name != "flow_sde_step"), name
