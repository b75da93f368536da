"""Smoke run of `python -m diffkern.demos.flow_pipelines --smoke` on the tiny SD3 pipeline: both parts run, the
report, plot and JSON are written, the budget accounting is the samplers' own, and the naive GRPO ablation
really draws one SDE step per rollout."""
import json
import math

import torch

from diffkern.demos import flow_pipelines as demo
from diffkern.flow import FlowAdapter
from diffkern.grpo.rollout import rollout
from diffkern.testing.tiny_pipelines import tiny_sd3_pipeline


def test_demo_smoke_run_writes_report_plot_and_json(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        result = demo.main(["--out", str(tmp_path), "--smoke"])
    finally:
        torch.set_num_threads(threads)  # the demo runs on one thread; the tests after it in this process do not
    assert (tmp_path / "flow_pipelines.png").read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "flow_pipelines.md").read_text()
    assert demo.STATEMENT in report and report in capsys.readouterr().out
    assert "FlowAdapter.from_pipe" in report  # the lines for a real checkpoint
    saved = json.loads((tmp_path / "flow_pipelines.json").read_text())
    K, units = demo.SMOKE["steps"], demo.SMOKE["seeds"] * len(demo.PROMPTS)
    budget = {"base": (K, 0), "ntrk": (K, K), "dps": (K, K), "svdd": (K + 2 * (K - 1), 0), "best-of-3": (3 * K, 0)}
    methods = saved["summary"]["methods"]
    assert set(methods) == set(budget)
    for name, (nfe, vjp) in budget.items():
        assert (methods[name]["nfe"], methods[name]["vjp"]) == (nfe, vjp), name
        assert len(methods[name]["vs_base"]["values"]) == units and f"| {name} | {nfe} | {vjp} |" in report
    for name, runs in (("base", 1), ("ntrk", 1), ("dps", 1), ("svdd", 1), ("best-of-3", 3)):
        assert methods[name]["gaussian_steps"][1] == runs * demo.SMOKE["seeds"] * K, name
    for name in ("base", "ntrk"):  # the model's own noise, and NTRK's tilted noise, stay N(0, I) at every step
        assert methods[name]["gaussian_steps"][0] == methods[name]["gaussian_steps"][1], name
    # best-of-3 keeps the best of runs whose first is the base sampler's own (same noise, same generator)
    assert min(methods["best-of-3"]["vs_base"]["values"]) >= 0
    assert saved["summary"]["dps_sweep"]["chosen"] in demo.DPS_SCALES
    assert set(saved["curves"]) == set(demo.VARIANTS) == set(result["summary"]["variants"])
    for name, runs in saved["curves"].items():
        assert len(runs) == demo.SMOKE["grpo_seeds"]
        assert all(len(c) == demo.SMOKE["updates"] and all(math.isfinite(r) for r in c) for c in runs)
        assert f"| {name} | " in report


def test_redness_of_pure_colours():
    images = torch.zeros(3, 3, 2, 2, dtype=torch.float64)
    images[0, 0] = 1          # red
    images[1] = 0.5           # grey
    images[2, 1:] = 1         # cyan
    assert demo.redness(images).tolist() == [1.0, 0.0, -1.0]


def test_naive_ablation_draws_a_step_per_rollout():
    """PerRolloutSampler gives the rollouts of one prompt different SDE steps, which rollout stores per sample;
    IsoTimestepSampler gives them one."""
    pipe = tiny_sd3_pipeline(blocks=1)
    adapter = FlowAdapter.from_pipe(pipe, 8, 16, 16)
    cond = adapter.encode(["a red cube", "a cat"], guidance_scale=1.0)
    for cls, shared in ((demo.PerRolloutSampler, False), (demo.IsoTimestepSampler, True)):
        result = rollout(adapter, cond, 6, cls(8, seed=0), std_rule=demo.ROLLOUT_RULE,
                         generator=torch.Generator().manual_seed(0))
        k = result.step_index.reshape(2, 6)
        assert bool((k == k[:, :1]).all()) == shared, cls.__name__
        assert int(k.min()) >= 0 and int(k.max()) < 4  # the window: the first half of the schedule
        assert torch.equal(result.sigma, adapter.sigmas[result.step_index])
