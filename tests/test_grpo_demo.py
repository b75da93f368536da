"""The Flash-GRPO demo: its task and rollouts are built as documented, and a smoke run writes sane outputs
(few updates, two seeds; the outcome is the full run's to report, not asserted here)."""
import json
import math
import os

import pytest
import torch

from diffkern.demos import grpo as demo


def test_reward_is_layout_plus_detail():
    preferred, other, target = demo.blobs()
    c = torch.arange(demo.CLASSES)
    assert torch.equal(demo.reward(target, c), torch.ones(demo.CLASSES))  # the optimum: right layout, exact detail
    assert torch.equal(demo.reward(other, c), -torch.ones(demo.CLASSES))  # wrong layout, detail floored at -1
    layout, detail = demo.reward_parts(preferred, c)
    assert torch.equal(layout, torch.ones(demo.CLASSES))
    torch.testing.assert_close(detail, torch.full((demo.CLASSES,), -demo.DETAIL_SHIFT))


def _steps(iso: bool, seed: int = 3):
    torch.manual_seed(seed)
    model = demo.Velocity()
    sampler = demo.IsoTimestepSampler(demo.STEPS, demo.WINDOW, seed=seed)
    g, g_naive = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    return demo.rollout_step(model, iso, sampler, g, g_naive, prompts=6, group=4)


def test_iso_groups_share_their_step_and_their_trajectory_up_to_it():
    step = _steps(iso=True)
    x, sigma = step.x.view(6, 4, 2), step.sigma.view(6, 4)
    assert torch.equal(sigma, sigma[:, :1].expand(6, 4))          # one SDE step per prompt
    assert sigma[:, 0].unique().numel() == 6                      # distinct prompts: distinct steps (20 >= 6)
    assert torch.equal(x, x[:, :1].expand(6, 4, 2))               # shared initial noise, ODE up to the step
    assert torch.equal(step.prompt_ids, torch.arange(6).repeat_interleave(4))


def test_naive_groups_mix_steps():
    sigma = _steps(iso=False).sigma.view(6, 4)
    assert all(row.unique().numel() > 1 for row in sigma)         # seeded: every group mixes noise levels here


def test_demo_quick_run_writes_sane_outputs(tmp_path):
    result = demo.run(str(tmp_path), quick=True)
    assert os.path.getsize(tmp_path / "grpo_demo.png") > 10_000
    assert "| itg+tgr |" in (tmp_path / "grpo_demo.md").read_text()
    saved = json.loads((tmp_path / "grpo_demo.json").read_text())
    p, seeds = saved["params"], saved["seeds"]
    assert set(saved["curves"]) == set(demo.VARIANTS) == set(saved["summary"]["variants"])
    assert saved["eval_at"] == demo.eval_points(p["updates"], p["eval_every"])
    for runs in saved["curves"].values():
        assert len(runs["train"]) == len(runs["eval"]) == seeds
        for train, ev in zip(runs["train"], runs["eval"]):
            assert len(train) == p["updates"] and len(ev) == len(saved["eval_at"])
            assert all(-1 <= r <= 1 for r in train + ev)  # the reward's range
    for name, row in saved["summary"]["variants"].items():
        assert 0 <= row["collapsed"] <= seeds
        assert row["reward"]["values"] == [f["reward"] for f in saved["final"][name]]
        assert row["reward"]["lo"] <= row["reward"]["mean"] <= row["reward"]["hi"]
    assert all(-1 <= c <= 1 for d in saved["gradient_agreement"].values() for c in d["values"])
    sens = saved["sensitivity"]
    assert all(len(v) == demo.STEPS and all(math.isfinite(x) for x in v) for v in sens.values())
    assert all(0 <= f <= 1 for f in sens["flip"])
    assert result["cpu_seconds"] > 0


def test_fewer_than_two_seeds_is_refused(tmp_path):
    with pytest.raises(ValueError, match="seeds"):
        demo.run(str(tmp_path), quick=True, seeds=1)
