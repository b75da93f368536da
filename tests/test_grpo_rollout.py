"""diffkern.grpo.rollout on tiny random-config diffusers pipelines (nothing is downloaded): the ODE steps are the
adapter's Euler loop, the one SDE step per prompt is flow_sde_step's, its stored log p is what the loss recomputes,
and grpo_train_step trains a peft LoRA on the result."""
import copy

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from diffkern.flow import FlowAdapter, sample  # noqa: E402
from diffkern.grpo import IsoTimestepSampler, flow_sde_step, grpo_train_step, rollout  # noqa: E402
from diffkern.grpo.reference import STD_RULES, default_std_coef  # noqa: E402
from diffkern.nn import FlashGRPOLoss  # noqa: E402
from diffkern.testing.tiny_pipelines import tiny_sd3_pipeline  # noqa: E402

from test_flow_adapter import MODELS, NEGATIVE, PROMPTS  # noqa: E402

STEPS = 6
SD3_SIZES = dict(height=32, width=32)


pytestmark = pytest.mark.usefixtures("one_thread")


def sd3_adapter(dtype=torch.float32):
    pipe = tiny_sd3_pipeline(blocks=2).to(dtype)
    return FlowAdapter.from_pipe(pipe, STEPS, **SD3_SIZES)


def over(adapter, sigmas):
    """The adapter with its schedule cut to `sigmas`: flow.sample then runs that part of the loop."""
    part = copy.copy(adapter)
    part.sigmas = sigmas
    return part


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def repeated(cond, group):
    return {k: t.repeat_interleave(group, 0) for k, t in cond.items()}


@pytest.mark.parametrize("name", MODELS)
def test_without_sde_noise_the_rollout_is_flow_sample(name):
    """std_coef = 1e-30: std^2 underflows in float32, so the SDE step's a = 1, b = dt and its noise is far below an
    ulp: x + dt v, the Euler step's arithmetic. The whole rollout (guidance on) is then the adapter's Euler loop on
    the pipeline's noise draw, bit for bit."""
    build, sizes, guidance = MODELS[name]
    adapter = FlowAdapter.from_pipe(build(), 3, **sizes)
    encode = {k: v for k, v in guidance.items() if k != "guidance_scale"}
    result = rollout(adapter, PROMPTS, 2, IsoTimestepSampler(3, range(3)), negative_prompts=NEGATIVE,
                     guidance_scale=guidance["guidance_scale"], std_coef=1e-30, generator=seeded(), **encode)
    cond = adapter.encode(PROMPTS, NEGATIVE, guidance_scale=guidance["guidance_scale"], **encode)
    assert "negative_prompt_embeds" in cond
    want = sample(adapter, adapter.init_noise(4, seeded()), repeated(cond, 2))
    assert result.latents.shape == want.shape and result.latents.dtype == want.dtype
    assert torch.equal(result.latents, want)


@pytest.mark.parametrize("std_rule", STD_RULES)
def test_the_sde_step_and_what_follows_replay_exactly(std_rule):
    """Every sample's SDE step at k = 2: Euler to x_k, flow_sde_step with the generator's next draw, Euler to the
    end; the rollout stores that step's x_k, y, sigmas and log p and ends on those latents."""
    adapter, k = sd3_adapter(), 2
    result = rollout(adapter, PROMPTS, 2, IsoTimestepSampler(STEPS, range(k, k + 1)), std_rule=std_rule,
                     generator=seeded())
    g, cond = seeded(), repeated(adapter.encode(PROMPTS), 2)
    x_k = sample(over(adapter, adapter.sigmas[:k + 1]), adapter.init_noise(4, g), cond)
    sigma, sigma_next = adapter.sigmas[k].expand(4), adapter.sigmas[k + 1].expand(4)
    v = adapter.velocity(x_k, sigma, cond)
    x_next, y, log_prob, _ = flow_sde_step(x_k, v, sigma.contiguous(), sigma_next.contiguous(),
                                           eps=randn_tensor(x_k.shape, generator=g, dtype=torch.float32),
                                           std_rule=std_rule)
    final = sample(over(adapter, adapter.sigmas[k + 1:]), x_next, cond)
    assert torch.equal(result.step_index, torch.full((4,), k))
    for got, want in ((result.x, x_k), (result.y, y), (result.sigma, sigma), (result.sigma_next, sigma_next),
                      (result.log_prob_old, log_prob), (result.latents, final)):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_each_prompt_takes_one_step_and_stores_its_x_k():
    """ITG: 4 prompts over a 3-step window, 2 rollouts each; a sample's stored x_k is the pure Euler loop's latents
    at its own step (the other samples' SDE steps do not touch it)."""
    adapter, prompts = sd3_adapter(), PROMPTS + ["a tree", "blue"]
    result = rollout(adapter, prompts, 2, IsoTimestepSampler(STEPS, range(3), seed=1), generator=seeded(2))
    k = result.step_index
    assert torch.equal(result.prompt_ids, torch.arange(4).repeat_interleave(2))
    assert torch.equal(k[0::2], k[1::2])  # one step per prompt
    assert set(k.tolist()) == {0, 1, 2}  # the window in equal shares (up to one)
    assert torch.equal(result.sigma, adapter.sigmas[k]) and torch.equal(result.sigma_next, adapter.sigmas[k + 1])
    noise = adapter.init_noise(8, seeded(2))
    cond = repeated(adapter.encode(prompts), 2)
    for step in range(3):
        ode = sample(over(adapter, adapter.sigmas[:step + 1]), noise, cond)
        assert torch.equal(result.x[k == step], ode[k == step]), step
    assert result.y.dtype == torch.float32 and result.log_prob_old.dtype == torch.float32
    assert torch.isfinite(result.log_prob_old).all()


@pytest.mark.parametrize("std_rule,dtype", [("wan", torch.float32), ("sd3", torch.float32), ("sd3", torch.bfloat16)],
                         ids=["wan", "sd3", "sd3-bf16"])
def test_log_prob_old_is_the_recomputed_log_prob(std_rule, dtype):
    """The training step's log p of the stored step, under the same policy (velocity at each sample's own sigma, the
    batch mixing steps): exactly the rollout's log_prob_old (both from y and b v on the CPU kernels; in bfloat16 the
    stored x_k is the model's input as it was, v its output), so the PPO ratio is exactly 1 before any update."""
    adapter = sd3_adapter(dtype)
    result = rollout(adapter, PROMPTS + ["a tree"], 2, IsoTimestepSampler(STEPS, range(1, 4), seed=3),
                     std_rule=std_rule, generator=seeded(3))
    assert len(set(result.step_index.tolist())) > 1
    v = adapter.velocity(result.x, result.sigma, result.cond)
    log_prob = torch.ops.diffkern.grpo_log_prob(v.float(), None, result.y, result.sigma, result.sigma_next, None,
                                                None, 1.0, STD_RULES[std_rule], default_std_coef(std_rule))[0]
    assert result.x.dtype == dtype and result.y.dtype == torch.float32
    assert torch.equal(log_prob, result.log_prob_old)


def test_a_lora_update_on_a_rewarded_rollout_trains_only_lora_weights():
    """reward on decoded images (and the prompts' text); grpo_train_step through the adapter's guided velocity:
    ratio exactly 1, gradients on the LoRA weights only, and one SGD step moves only them."""
    from peft import LoraConfig
    adapter = sd3_adapter()
    adapter.transformer.requires_grad_(False)
    torch.manual_seed(1)  # LoRA B random (not peft's zeros): both factors get gradients
    adapter.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                               init_lora_weights=False))

    def reward(images, prompts):
        return images.mean(dim=(1, 2, 3)) + torch.tensor([len(p) for p in prompts]) / 100

    result = rollout(adapter, PROMPTS, 3, IsoTimestepSampler(STEPS, range(1, 3), seed=4), reward, decode=True,
                     std_rule="sd3", generator=seeded(4))
    with torch.no_grad():
        images = adapter.decode(result.latents)
    assert torch.equal(result.images, images)
    lengths = torch.tensor([len(p) for p in PROMPTS]).repeat_interleave(3)
    assert torch.equal(result.rewards, images.mean(dim=(1, 2, 3)) + lengths / 100)
    assert "negative_prompt_embeds" in result.step.cond  # SD3's default guidance 7.0
    model = adapter.transformer
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, stats = grpo_train_step(adapter.velocity, result.step, FlashGRPOLoss(clip_eps=0.2, std_rule="sd3"))
    assert torch.equal(stats["ratio_mean"], torch.tensor(1.0))
    assert all((p.grad is not None and p.grad.abs().sum() > 0) == (n in lora) for n, p in model.named_parameters())
    torch.optim.SGD(lora.values(), lr=0.1).step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in lora), n


def test_prompts_as_a_cond_dict_are_the_encoded_prompts():
    """An adapter's cond of P prompts in place of their text: the same rollout; reward gets the prompts' rows."""
    adapter, sampler = sd3_adapter(), IsoTimestepSampler(STEPS, seed=5)
    text = rollout(adapter, PROMPTS, 2, copy.deepcopy(sampler), generator=seeded(5))
    rows = []
    cond = rollout(adapter, adapter.encode(PROMPTS), 2, sampler, lambda x, p: rows.extend(p) or x.mean((1, 2, 3)),
                   generator=seeded(5))
    assert torch.equal(cond.latents, text.latents) and rows == [0, 0, 1, 1]


def test_the_default_sampler_takes_the_first_half_after_the_pipelines_noise_draw():
    adapter = sd3_adapter()
    result = rollout(adapter, PROMPTS, 2, std_coef=1e-30, generator=seeded(6))
    assert torch.equal(result.step_index[0::2], result.step_index[1::2]) and (result.step_index < STEPS // 2).all()
    cond = repeated(adapter.encode(PROMPTS), 2)
    assert torch.equal(result.latents, sample(adapter, adapter.init_noise(4, seeded(6)), cond))


def test_bad_input_names_the_argument():
    adapter = sd3_adapter()
    sampler = IsoTimestepSampler(STEPS)
    with pytest.raises(TypeError, match="adapter must be a diffkern.flow.FlowAdapter"):
        rollout(adapter.transformer, PROMPTS, 2)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        rollout(adapter, PROMPTS, 0)
    with pytest.raises(TypeError, match="group_size must be an int"):
        rollout(adapter, PROMPTS, 2.0)
    with pytest.raises(ValueError, match="prompts must be"):
        rollout(adapter, [], 2)
    with pytest.raises(ValueError, match="prompts given as a cond dict"):
        rollout(adapter, {"prompt_embeds": torch.zeros(2, 3, 8), "pooled_prompt_embeds": torch.zeros(3, 8)}, 2)
    with pytest.raises(ValueError, match="prompt_ids must be an integer \\[P\\] = \\[2\\]"):
        rollout(adapter, PROMPTS, 2, prompt_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="std_rule must be"):
        rollout(adapter, PROMPTS, 2, std_rule="flux")
    with pytest.raises(TypeError, match="sampler must be an IsoTimestepSampler"):
        rollout(adapter, PROMPTS, 2, sampler=range(3))
    with pytest.raises(ValueError, match="sampler's window reaches step 9"):
        rollout(adapter, PROMPTS, 2, sampler=IsoTimestepSampler(20))
    with pytest.raises(ValueError, match="reward\\(samples, prompts\\) must be a floating \\[B\\] = \\[4\\]"):
        rollout(adapter, PROMPTS, 2, sampler, reward=lambda x, p: x.mean(dim=(2, 3)))
    result = rollout(adapter, PROMPTS, 2, sampler, generator=seeded())
    with pytest.raises(ValueError, match="no rewards"):
        result.step
    with pytest.raises(ValueError, match="rewards must be a floating \\[B\\] = \\[4\\]"):
        result.with_rewards(torch.zeros(2))
    assert torch.equal(result.with_rewards(torch.ones(4, dtype=torch.float64)).step.rewards, torch.ones(4))
