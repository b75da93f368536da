"""SiT's velocity loss and sampler on the DiT family's defaults: a learned-sigma head (2C output channels)
gives its velocity in the first C channels, as in SiT's code."""
import pytest
import torch

from diffkern.dar.blocks import DiT, dit
from diffkern.dar.sit import sample, velocity_loss


def test_readme_use_with_the_default_learned_sigma_head():
    torch.manual_seed(0)
    model = dit("DiT-S/2", stream="dar", input_size=8)                       # learn_sigma=True by default
    latents, labels = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])
    loss = velocity_loss(model, latents, labels)
    loss.backward()
    assert model.out_channels == 8 and loss.isfinite()
    rows = torch.arange(model.final_layer.linear.out_features) % model.out_channels  # channel is innermost
    grad = model.final_layer.linear.bias.grad
    assert grad[rows < 4].abs().sum() > 0 and torch.equal(grad[rows >= 4], torch.zeros_like(grad[rows >= 4]))


def learned_sigma_model():
    torch.manual_seed(0)
    model = DiT(input_size=4, patch_size=2, in_channels=2, hidden_size=16, depth=2, num_heads=2, num_classes=3,
                learn_sigma=True, class_dropout_prob=0.0, chunk_size=2).eval()
    with torch.no_grad():  # leave adaLN-Zero's all-zero start, so the two halves of the output differ
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def test_learned_sigma_velocity_is_the_first_C_channels():
    model = learned_sigma_model()
    x, y, noise = torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 2]), torch.randn(3, 2, 4, 4)
    halves = [lambda x, t, y, s=s: model(x, t, y)[:, s] for s in (slice(0, 2), slice(2, 4))]
    with torch.no_grad():
        losses = [velocity_loss(m, x, y, torch.Generator().manual_seed(1)) for m in (model, *halves)]
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])
    samples = [sample(m, noise, y, steps=3) for m in (model, *halves)]
    assert torch.equal(samples[0], samples[1]) and not torch.equal(samples[0], samples[2])


@pytest.mark.parametrize("channels", [1, 3])
def test_output_neither_C_nor_2C_channels_raises(channels):
    x, y = torch.randn(2, 2, 4, 4), torch.tensor([0, 1])
    model = lambda x, t, y: x.new_zeros(x.shape[0], channels, *x.shape[2:])  # noqa: E731
    with pytest.raises(ValueError, match="model output"):
        velocity_loss(model, x, y)
    with pytest.raises(ValueError, match="model output"):
        sample(model, x, y, steps=1)
