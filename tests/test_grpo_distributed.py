"""Flow-GRPO's global-batch statistics over gloo: 2 processes give what one process gives for the same batch."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import diffkern
from diffkern.grpo import IsoTimestepSampler, advantages
from diffkern.nn import FlashGRPOLoss

from test_grpo import make_loss_inputs, op_args

N, PROMPTS, WORLD = 16, 2, 2  # the paper's layout: 8 rollouts per prompt spread over the ranks
# prompt 100's rollouts are rows 0-7: the strided rows put half of each prompt's group on each rank
PROMPT_IDS = torch.arange(N) // (N // PROMPTS) + 100
REWARDS = torch.randn(N, generator=torch.Generator().manual_seed(3)) + (PROMPT_IDS == 100) * 2.0


def global_batch(variant="ref"):
    """The loss inputs of the whole batch: each sample at the step the sampler gave its prompt."""
    kw = make_loss_inputs((N, 3, 17), torch.float32, variant)
    return kw, torch.ops.diffkern.grpo_log_prob(*op_args(kw))[0].detach() - 0.01


def run(kw, log_prob_old, adv, rows):
    """(loss, dv) of the samples `rows` of the global batch; through FlashGRPOLoss from the rewards
    when adv is None."""
    local = {k: (t[rows].clone() if isinstance(t, torch.Tensor) else t) for k, t in kw.items()}
    local["v"].requires_grad_()
    if adv is None:
        step = {k: local.pop(k) for k in ("x", "x_next", "y", "v_ref") if k in local}
        loss, _ = FlashGRPOLoss(beta=0.1)(local["v"], local["sigma"], local["sigma_next"], log_prob_old[rows],
                                          REWARDS[rows], PROMPT_IDS[rows], **step)
    else:
        loss, _ = diffkern.grpo_iso_loss(**local, log_prob_old=log_prob_old[rows], advantages=adv, beta=0.1)
    return loss.detach(), torch.autograd.grad(loss, local["v"])[0]


def worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = torch.arange(rank, N, world)  # strided: each prompt's rollouts sit on every rank
        adv = advantages(REWARDS[rows], PROMPT_IDS[rows])
        steps = IsoTimestepSampler(seed=7).sample(PROMPT_IDS[rows])
        kw, log_prob_old = global_batch()
        loss, dv = run(kw, log_prob_old, adv, rows)
        module_loss, module_dv = run(*global_batch("y+ref"), None, rows)
        torch.save(dict(rows=rows, adv=adv, steps=steps, loss=loss, dv=dv, module_loss=module_loss,
                        module_dv=module_dv), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_match_one_process_on_the_global_batch():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(WORLD, os.path.join(tmp, "init"), tmp), nprocs=WORLD)
        parts = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(WORLD)]
    everything = torch.arange(N)
    adv = advantages(REWARDS, PROMPT_IDS)
    steps = IsoTimestepSampler(seed=7).sample(PROMPT_IDS)
    kw, log_prob_old = global_batch()
    loss, dv = run(kw, log_prob_old, adv, everything)
    module_loss, module_dv = run(*global_batch("y+ref"), None, everything)
    for name, ref_loss, ref_dv in (("", loss, dv), ("module_", module_loss, module_dv)):
        torch.testing.assert_close(torch.stack([p[name + "loss"] for p in parts]).mean(), ref_loss, rtol=1e-6,
                                   atol=1e-7)
        # a rank's loss is the mean over its N / WORLD samples: its gradient is WORLD times the global one
        for p in parts:
            torch.testing.assert_close(p[name + "dv"] / WORLD, ref_dv[p["rows"]], rtol=1e-5, atol=1e-9)
    for p in parts:
        torch.testing.assert_close(p["adv"], adv[p["rows"]], rtol=0, atol=1e-6)
        assert torch.equal(p["steps"], steps[p["rows"]])


def test_advantages_formula_in_one_process():
    rewards, ids = torch.tensor([1.0, 3.0, 10.0, 14.0, 0.0]), torch.tensor([0, 0, 1, 1, 2])
    std = rewards.std(correction=0)
    expected = torch.tensor([-1.0, 1.0, -2.0, 2.0, 0.0]) / (std + 1e-4)
    torch.testing.assert_close(advantages(rewards, ids), expected)
    per_group = advantages(rewards, ids, global_std=False, clip=1.5)
    torch.testing.assert_close(per_group, torch.tensor([1.0, 1.0, 2.0, 2.0, 0.0]).mul(
        torch.tensor([-1.0, 1.0, -1.0, 1.0, 0.0])).div(torch.tensor([1.0, 1.0, 2.0, 2.0, 1.0]) + 1e-4).clamp(-1.5, 1.5))


def test_sampler_gives_each_prompt_one_step_and_balances_the_window():
    ids = torch.arange(40).repeat_interleave(3)[torch.randperm(120, generator=torch.Generator().manual_seed(0))]
    steps = IsoTimestepSampler(num_steps=20, seed=1).sample(ids)
    per_prompt = {int(i): set(steps[ids == i].tolist()) for i in ids.unique()}
    assert all(len(s) == 1 for s in per_prompt.values())
    assert torch.bincount(torch.tensor([s.pop() for s in per_prompt.values()]), minlength=10).tolist() == [4] * 10
    with pytest.raises(ValueError, match="window must be a non-empty range"):
        IsoTimestepSampler(num_steps=20, window=range(15, 25))
