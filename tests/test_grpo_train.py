"""diffkern.grpo.grpo_train_step on a tiny random-config SD3 transformer with peft LoRA: it trains only the LoRA
weights, lowers the loss on its batch, and under DDP and FSDP2 (gloo, 2 CPU processes) gives the loss and the
parameter update one process gives on the same global batch."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import LoraConfig
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from diffkern.grpo import GRPOStep, flow_sde_step, flow_sigmas, grpo_train_step
from diffkern.nn import FlashGRPOLoss
from diffkern.testing import numerics

from test_sinks_processors import sd3

WORLD, PROMPTS, GROUP = 2, 2, 2
B = PROMPTS * GROUP
STEPS = (3, 3, 7, 7)  # ITG: one SDE step per prompt
# The attention projections; not add_q_proj: the last block's text queries feed nothing (context_pre_only), so
# its LoRA would get no gradient (and DDP would need find_unused_parameters=True).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "to_add_out"]
LR = 0.5


def lora_sd3(dtype=torch.float32):
    """The tiny SD3 transformer with LoRA on every attention projection; LoRA B starts random (not peft's zero)
    so that both LoRA factors get gradients."""
    model = sd3().requires_grad_(False)
    torch.manual_seed(1)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False))
    return model.to(dtype)


def sd3_velocity(model):
    """velocity(x, sigma, cond) of SD3 (diffusers' flow matching, timestep = 1000 sigma)."""
    def velocity(x, sigma, cond):
        return model(hidden_states=x, encoder_hidden_states=cond["prompt_embeds"],
                     pooled_projections=cond["pooled_prompt_embeds"], timestep=1000 * sigma).sample
    return velocity


def reference_velocity(model):
    """The base model (LoRA off): the KL term's reference policy."""
    policy = sd3_velocity(model)

    def velocity(x, sigma, cond):
        model.disable_adapters()
        try:
            return policy(x, sigma, cond)
        finally:
            model.enable_adapters()
    return velocity


def rollout_batch(stale: float = 0.0) -> GRPOStep:
    """B stored SDE steps of the LoRA policy (float32): x_k, flow_sde_step's y and log p, seeded rewards.
    stale > 0 shifts log_prob_old by stale N(0, 1) (a policy some updates old: ratios r != 1, so the loss is no
    sum of advantages that cancels)."""
    g = torch.Generator().manual_seed(5)
    sigmas = flow_sigmas(20, 3.0, torch.float32)
    step = torch.tensor(STEPS)
    x = torch.randn(B, 4, 8, 8, generator=g)
    cond = {"prompt_embeds": torch.randn(PROMPTS, 7, 32, generator=g).repeat_interleave(GROUP, 0),
            "pooled_prompt_embeds": torch.randn(PROMPTS, 16, generator=g).repeat_interleave(GROUP, 0)}
    sigma, sigma_next = sigmas[step], sigmas[step + 1]
    with torch.no_grad():
        v = sd3_velocity(lora_sd3())(x, sigma, cond)
    _, y, log_prob, _ = flow_sde_step(x, v, sigma, sigma_next, eps=torch.randn(x.shape, generator=g), std_rule="sd3")
    log_prob = log_prob + stale * torch.randn(B, generator=g)
    return GRPOStep(x=x, y=y, sigma=sigma, sigma_next=sigma_next, log_prob_old=log_prob, cond=cond,
                    prompt_ids=torch.arange(PROMPTS).repeat_interleave(GROUP) + 10,
                    rewards=torch.randn(B, generator=g))


def loss_fn():
    return FlashGRPOLoss(clip_eps=0.2, beta=0.05, std_rule="sd3")


def lora_params(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def full(p) -> torch.Tensor:
    """A parameter as one plain tensor (FSDP2's are sharded DTensors)."""
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()


def sgd_step(model, velocity, batch, ref, checkpointing=False):
    """(loss, {name: gradient}, {name: updated weight}) of one grpo_train_step and one SGD step on the LoRA
    weights (gathered when sharded)."""
    loss, _ = grpo_train_step(velocity, batch, loss_fn(), ref_velocity=ref, gradient_checkpointing=checkpointing)
    torch.optim.SGD(lora_params(model).values(), lr=LR).step()
    return loss, *({n: full(getattr(p, what)) for n, p in lora_params(model).items()} for what in ("grad", "data"))


def one_process(batch, dtype):
    model = lora_sd3(dtype)
    return sgd_step(model, sd3_velocity(model), batch, reference_velocity(model))


def as_dtype(batch, dtype):
    """The batch's floating tensors in dtype (the float64 oracle's copy)."""
    cast = {f: getattr(batch, f).to(dtype) for f in ("x", "y", "sigma", "sigma_next", "log_prob_old", "rewards")}
    return GRPOStep(**{**vars(batch), **cast, "cond": {k: t.to(dtype) for k, t in batch.cond.items()}})


def test_lora_step_trains_only_lora_weights_and_lowers_the_loss():
    batch = rollout_batch()
    model = lora_sd3()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert lora_params(model) and all("lora_" in n for n in lora_params(model))
    velocity, ref = sd3_velocity(model), reference_velocity(model)
    loss, stats = grpo_train_step(velocity, batch, loss_fn(), ref_velocity=ref)
    assert all(p.grad is None for n, p in model.named_parameters() if n in base)
    assert all(p.grad.abs().sum() > 0 for p in lora_params(model).values())
    torch.testing.assert_close(stats["ratio_mean"], torch.tensor(1.0))  # on-policy: the rollout's log p
    before = {n: p.detach().clone() for n, p in lora_params(model).items()}
    torch.optim.SGD(lora_params(model).values(), lr=LR).step()
    for n, p in model.named_parameters():
        assert torch.equal(p, base[n]) if n in base else not torch.equal(p, before[n]), n
    with torch.no_grad():
        v_ref = ref(batch.x, batch.sigma, batch.cond)
        after, _ = loss_fn()(velocity(batch.x, batch.sigma, batch.cond), batch.sigma, batch.sigma_next,
                             batch.log_prob_old, batch.rewards, batch.prompt_ids, y=batch.y, v_ref=v_ref)
    assert after < loss


def test_gradient_checkpointing_recomputes_the_velocity_and_gives_the_same_gradients():
    batch = rollout_batch()
    grads, calls = [], []
    for checkpointing in (False, True):
        model = lora_sd3()
        policy = sd3_velocity(model)

        def velocity(x, sigma, cond):
            calls.append(checkpointing)
            return policy(x, sigma, cond)
        grpo_train_step(velocity, batch, loss_fn(), ref_velocity=reference_velocity(model),
                        gradient_checkpointing=checkpointing)
        grads.append({n: p.grad for n, p in lora_params(model).items()})
    assert calls == [False, True, True]  # checkpointed: the forward, then its recompute in the backward
    for n, g in grads[0].items():
        assert torch.equal(grads[1][n], g), n


def test_bad_input_names_the_argument():
    batch = rollout_batch()
    with pytest.raises(ValueError, match="GRPOStep: sigma must be a \\[4\\] tensor"):
        GRPOStep(**{**vars(batch), "sigma": batch.sigma[:3]})
    with pytest.raises(ValueError, match="give rewards and prompt_ids, or advantages"):
        GRPOStep(**{**vars(batch), "advantages": torch.zeros(B)})
    with pytest.raises(ValueError, match="cond\\['pooled_prompt_embeds'\\] must be batch first"):
        GRPOStep(**{**vars(batch), "cond": {**batch.cond, "pooled_prompt_embeds": torch.zeros(3, 16)}})
    model = lora_sd3()
    with pytest.raises(ValueError, match="needs the reference velocity"):
        grpo_train_step(sd3_velocity(model), batch, loss_fn())
    with pytest.raises(ValueError, match="must return x's shape"):
        grpo_train_step(lambda x, s, c: x[:, :2], batch, FlashGRPOLoss())


def worker(rank, init_file, out_dir, batch):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        mine = batch.select(torch.arange(rank, B, WORLD))  # strided: each prompt's rollouts on every rank
        out = {}
        model = lora_sd3()
        ddp = DistributedDataParallel(model)
        out["ddp"] = sgd_step(model, sd3_velocity(ddp), mine, reference_velocity(model))
        model = lora_sd3()
        for block in model.transformer_blocks:
            fully_shard(block)
        fully_shard(model)
        out["sharded"] = all(isinstance(p, DTensor) for p in model.parameters())
        # (with gradient checkpointing: FSDP2 re-gathers the weights for the recompute)
        out["fsdp2"] = sgd_step(model, sd3_velocity(model), mine, reference_velocity(model), checkpointing=True)
        torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_match_one_process_on_the_global_batch():
    batch = rollout_batch(stale=0.05)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(os.path.join(tmp, "init"), tmp, batch), nprocs=WORLD)
        parts = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(WORLD)]
    assert all(p["sharded"] for p in parts)
    names = sorted(lora_params(lora_sd3()))

    def flat(loss, grads, weights):
        return [loss] + [grads[n] for n in names] + [weights[n] for n in names]

    plain = flat(*one_process(batch, torch.float32))
    D = batch.x[0].numel()

    def oracle(x, y, prompt_embeds, pooled):
        step = as_dtype(batch, torch.float64)
        step.x, step.y, step.cond = x, y, {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
        return flat(*one_process(step, torch.float64))
    # the loss sums over the B x D latent elements, a LoRA weight's gradient over at most as many (the updated
    # weights are w - LR grad)
    expected, spreads = numerics.oracle_with_spread(
        oracle, [batch.x, batch.y, batch.cond["prompt_embeds"], batch.cond["pooled_prompt_embeds"]], B * D,
        torch.float32)
    for engine in ("ddp", "fsdp2"):
        # every rank's loss is the mean over its B / WORLD samples: the global loss is their mean
        loss = torch.stack([p[engine][0] for p in parts]).mean()
        for p in parts:
            whats = ["loss"] + [f"{n} gradient" for n in names] + [f"updated {n}" for n in names]
            for what, actual, want, pl, spread in zip(whats, flat(loss, *p[engine][1:]), expected, plain, spreads):
                numerics.assert_close_to_oracle(actual, want, pl, f"{engine} {what}", spread)
