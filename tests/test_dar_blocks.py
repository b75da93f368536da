"""The DiT/SiT family with a residual or DAR stream: paper sizes, adaLN-Zero start, torch.compile, bad arguments."""
import pytest
import torch

from diffkern.dar.blocks import CONFIGS, DiT, dit

# Published parameter counts of the residual DiT family (ImageNet 256: 32x32x4 latents, 1000 classes).
PUBLISHED_M = {"DiT-S/2": 33, "DiT-B/2": 130, "DiT-L/2": 458, "DiT-XL/2": 675}
SUBLAYERS = {"DiT-S/2": 24, "DiT-B/2": 24, "DiT-L/2": 48, "DiT-XL/2": 56}


def tiny(stream="dar", **kw):
    torch.manual_seed(0)
    return DiT(**{**dict(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=2, num_heads=2,
                         num_classes=3, learn_sigma=False, class_dropout_prob=0.0, chunk_size=2), **kw}, stream=stream)


def batch(B=2):
    g = torch.Generator().manual_seed(5)
    return torch.randn(B, 1, 4, 4, generator=g), torch.tensor([1.0, 500.0])[:B], torch.tensor([0, 2])[:B]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_family_has_the_paper_sizes(name):
    with torch.device("meta"):
        residual, dar = dit(name, stream="residual"), dit(name)
    millions = sum(p.numel() for p in residual.parameters()) / 1e6
    assert abs(millions - PUBLISHED_M[name]) < 1, millions
    assert residual.n_sublayers == dar.n_sublayers == SUBLAYERS[name]
    assert not hasattr(residual, "router") and hasattr(dar, "router")
    shapes = {k: v.shape for k, v in dar.state_dict().items() if not k.startswith("router.")}
    assert shapes == {k: v.shape for k, v in residual.state_dict().items()}


@pytest.mark.parametrize("stream", ["residual", "dar"])
def test_adaln_zero_start_outputs_zero_and_trains_the_final_layer_first(stream):
    model = tiny(stream)
    out = model(*batch())
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def perturbed(model):
    """`model` moved off adaLN-Zero, so every sublayer and the router carry gradient."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


def test_chunk_recomputation_gives_the_same_outputs_and_gradients():
    plain, recomputed = perturbed(tiny(depth=3)), perturbed(tiny(depth=3, recompute=True))
    x, t, y = batch()
    out, out_r = plain(x, t, y), recomputed(x, t, y)
    torch.testing.assert_close(out_r, out, rtol=0, atol=0)
    grads = torch.autograd.grad(out.square().sum(), list(plain.parameters()))
    grads_r = torch.autograd.grad(out_r.square().sum(), list(recomputed.parameters()))
    for g, g_r in zip(grads, grads_r):
        torch.testing.assert_close(g_r, g, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("query,recompute", [("timestep", False), ("dynamic", True)])
def test_torch_compile_fullgraph_matches_eager(query, recompute):
    model = perturbed(tiny(query=query, recompute=recompute))
    x, t, y = batch()
    params = [p for p in model.parameters() if p.requires_grad]
    expected = model(x, t, y)
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    torch._dynamo.reset()
    got = torch.compile(model, fullgraph=True)(x, t, y)
    grads = torch.autograd.grad(got.square().sum(), params)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="stream"):
        tiny("highway")
    with pytest.raises(ValueError, match="name"):
        dit("DiT-XXL/2")
    with pytest.raises(ValueError, match="patch_size"):
        tiny(input_size=5)
    with pytest.raises(ValueError, match="num_heads"):
        tiny(num_heads=3)
    with pytest.raises(ValueError, match="recompute"):
        tiny("residual", recompute=True)
    with pytest.raises(ValueError, match="recompute"):
        tiny(chunk_size=None, recompute=True)
