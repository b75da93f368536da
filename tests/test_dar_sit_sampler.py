"""SiT's samplers (Euler ODE, Euler–Maruyama SDE, classifier-free guidance) on an analytic velocity field.

Data x ~ N(mean[y], STD^2) per element has, for x_t = (1 - t) noise + t x, the exact velocity
    v(x, t) = m + (t STD^2 - (1 - t)) / V_t (x - t m),   V_t = (1 - t)^2 + t^2 STD^2,  m = mean[y],
affine in x, so every sampler here is an affine Gaussian chain whose law is computed exactly in float64 (the
oracle). Sample moments are held to it, or to the data, within Z standard errors of the sample size."""
import math

import pytest
import torch

from diffkern.dar.blocks import DiT
from diffkern.dar.sit import TIME_SCALE, sample

MEANS, STD = torch.tensor([0.7, -0.4, 0.1], dtype=torch.float64), 0.5   # class 2 is the null class below
N = (512, 1, 8, 8)                                                        # 32768 independent elements
Z = 5.0  # standard errors: a correct sampler fails a check with probability ~6e-7 (the draws are seeded)


def gaussian_velocity(x, t_scaled, y):
    t = (t_scaled / TIME_SCALE).view(-1, *([1] * (x.dim() - 1)))
    m = MEANS.to(x)[y].view_as(t)
    return m + (t * STD**2 - (1 - t)) / ((1 - t) ** 2 + (t * STD) ** 2) * (x - t * m)


def chain_law(steps, method, diffusion_norm=1.0, last_step_size=0.04, mean=MEANS[0].item()):
    """(mean, variance) of the sampler's output when noise ~ N(0, 1): the chain x <- (1 + a dt) x + b dt
    (+ noise of variance 2 norm (1 - t) dt) with the drift's slope a and offset b, propagated exactly."""
    norm = 0.0 if method == "ode" else diffusion_norm
    if method == "ode":
        grid = [(k / steps, 1 / steps, False) for k in range(steps)]
    else:
        dt = (1 - last_step_size) / (steps - 1)
        grid = [(k * dt, dt, True) for k in range(steps - 1)] + [(1 - last_step_size, last_step_size, False)]
    m, var = 0.0, 1.0
    for t, dt, noisy in grid:
        slope = (t * STD**2 - (1 - t)) / ((1 - t) ** 2 + (t * STD) ** 2)
        a, b = (1 + norm * t) * slope - norm, (1 + norm * t) * (mean - slope * t * mean)
        m, var = (1 + a * dt) * m + b * dt, (1 + a * dt) ** 2 * var + (2 * norm * (1 - t) * dt if noisy else 0.0)
    return m, var


def draw(steps, method, seed=0, y=0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(N, generator=g, dtype=torch.float64)
    labels = torch.full((N[0],), y, dtype=torch.long)
    return sample(gaussian_velocity, noise, labels, steps=steps, method=method, generator=g, **kwargs)


def assert_moments(x, mean, var, what):
    n = x.numel()
    se_mean, se_var = math.sqrt(var / n), var * math.sqrt(2 / (n - 1))  # Gaussian sample mean and variance
    assert abs(x.mean().item() - mean) <= Z * se_mean, f"{what}: mean {x.mean().item():.5f} vs {mean:.5f}"
    assert abs(x.var().item() - var) <= Z * se_var, f"{what}: variance {x.var().item():.5f} vs {var:.5f}"


@pytest.mark.parametrize("method,kwargs", [("ode", {}), ("sde", dict(last_step_size=0.0)),
                                           ("sde", dict(last_step_size=0.0, diffusion_norm=0.3))])
def test_samplers_reach_the_data_distribution(method, kwargs):
    """With fine steps the discretisation bias is below one standard error (checked on the exact chain law),
    so the samples must have the data's mean and variance."""
    steps = 500
    law = chain_law(steps, method, **kwargs)
    n = math.prod(N)
    assert abs(law[1] - STD**2) < STD**2 * math.sqrt(2 / (n - 1))
    assert_moments(draw(steps, method, **kwargs), MEANS[0].item(), STD**2, f"{method} {kwargs}")


@pytest.mark.parametrize("steps,method,kwargs", [(50, "ode", {}), (250, "sde", {}),
                                                 (40, "sde", dict(diffusion_norm=2.0, last_step_size=0.1))])
def test_samplers_follow_their_exact_discretised_law(steps, method, kwargs):
    """SiT's defaults (250 SDE steps, last step 0.04, which leaves the variance ~2% low) and coarse grids:
    the samples' moments are those of the exact law of the discretised chain."""
    assert_moments(draw(steps, method, **kwargs), *chain_law(steps, method, **kwargs), f"{method} {steps} {kwargs}")


def test_sde_without_diffusion_is_the_ode():
    steps = 8  # powers of two: the SDE grid (1 - 1/8) / 7 is exactly the ODE's 1/8
    ode = draw(steps, "ode")
    assert torch.equal(draw(steps, "sde", diffusion_norm=0.0, last_step_size=1 / steps), ode)


def test_sde_is_reproducible_with_a_seeded_generator():
    a, b, c = draw(20, "sde", seed=3), draw(20, "sde", seed=3), draw(20, "sde", seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("method", ["ode", "sde"])
def test_guidance_scale_one_is_conditional_and_zero_unconditional(method):
    cond, uncond = draw(10, method, y=0), draw(10, method, y=2)
    assert torch.equal(draw(10, method, y=0, cfg_scale=1.0), cond)
    assert torch.equal(draw(10, method, y=0, cfg_scale=0.0, null_class=2), uncond)


@pytest.mark.parametrize("method", ["ode", "sde"])
def test_guidance_combines_conditional_and_null_velocities(method):
    """cfg_scale 3 samples the field v_null + 3 (v_y - v_null) on every channel."""
    def guided(x, t, y):
        null = gaussian_velocity(x, t, torch.full_like(y, 2))
        return null + 3.0 * (gaussian_velocity(x, t, y) - null)
    g = torch.Generator().manual_seed(5)
    noise, y = torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    ours = sample(gaussian_velocity, noise, y, steps=6, method=method, cfg_scale=3.0, null_class=2,
                  generator=torch.Generator().manual_seed(6))
    theirs = sample(guided, noise, y, steps=6, method=method, generator=torch.Generator().manual_seed(6))
    assert torch.equal(ours, theirs)


def tiny_dit(dropout):
    torch.manual_seed(0)
    return DiT(input_size=4, patch_size=2, in_channels=2, hidden_size=16, depth=1, num_heads=2, num_classes=3,
               class_dropout_prob=dropout, stream="residual").eval()


def test_null_class_defaults_to_the_models_dropout_class():
    model, noise, y = tiny_dit(0.1), torch.randn(2, 2, 4, 4), torch.tensor([0, 1])
    assert torch.equal(sample(model, noise, y, steps=2, cfg_scale=4.0),
                       sample(model, noise, y, steps=2, cfg_scale=4.0, null_class=3))
    with pytest.raises(ValueError, match="null_class"):
        sample(tiny_dit(0.0), noise, y, steps=2, cfg_scale=4.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps"), (dict(steps=1, method="sde"), "steps"), (dict(steps=2.0), "steps"),
    (dict(method="heun"), "method"), (dict(cfg_scale=2.0), "null_class"), (dict(cfg_scale=math.inf), "cfg_scale"),
    (dict(method="sde", diffusion_norm=-1.0), "diffusion_norm"), (dict(method="sde", last_step_size=1.0),
                                                                  "last_step_size"),
])
def test_bad_arguments_are_refused_by_name(kwargs, match):
    noise, y = torch.randn(2, 1, 2, 2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=match):
        sample(gaussian_velocity, noise, y, **kwargs)
