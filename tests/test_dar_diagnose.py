"""diffkern.dar.diagnose: per-block amplitude, gradient RMS and adjacent cosine, checked against hand-made streams."""
import pytest
import torch
from torch import nn

from diffkern.dar import diagnose
from diffkern.dar.blocks import DiT


def tiny(stream, **kw):
    torch.manual_seed(0)
    m = DiT(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=3, num_heads=2, num_classes=3,
            learn_sigma=False, class_dropout_prob=0.1, chunk_size=2, stream=stream, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return m


BATCH = (torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2]))


class Doubling(nn.Module):
    """blocks[i] sees 2^i * x (known amplitudes, cosine 1); the loss sum(h_last) has gradient 1 at the last
    input and 2^(last - i) at input i (known gradient RMS)."""

    def __init__(self, depth):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Module() for _ in range(depth))
        for b in self.blocks:
            b.norm1 = nn.Identity()

    def forward(self, x):
        for b in self.blocks:
            x = b.norm1(x)
            last = x
            x = 2 * x
        return last


def test_symptoms_of_a_known_stream(tmp_path):
    x = torch.full((2, 3, 4), 0.5, requires_grad=True)
    r = diagnose(Doubling(4), (x, None), path=str(tmp_path / "d.png"), loss_fn=lambda m, b: m(b[0]).sum())["model"]
    assert r["amplitude"] == pytest.approx([0.5, 1.0, 2.0, 4.0])
    assert r["grad_rms"] == pytest.approx([8.0, 4.0, 2.0, 1.0])
    assert r["cosine"] == pytest.approx([1.0, 1.0, 1.0])
    assert (tmp_path / "d.png").stat().st_size > 1000


def test_residual_and_dar_models_side_by_side(tmp_path):
    models = {"residual": tiny("residual"), "dar": tiny("dar")}
    for m in models.values():
        m.train()
    r = diagnose(models, BATCH, path=str(tmp_path / "both.png"))
    assert (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG"
    for name, m in models.items():
        assert len(r[name]["amplitude"]) == len(r[name]["grad_rms"]) == 3 and len(r[name]["cosine"]) == 2
        assert all(v > 0 for v in r[name]["amplitude"] + r[name]["grad_rms"])
        assert all(-1 <= v <= 1 for v in r[name]["cosine"])
        assert m.training and all(p.grad is None for p in m.parameters())
    # the residual stream's first block input is the embedding of what the model is given
    res = models["residual"]
    direct = diagnose(res, BATCH, loss_fn=lambda m, b: m(b[0], torch.full((3,), 250.0), b[1]).square().mean())
    with torch.no_grad():
        x0 = res.x_embedder(BATCH[0]) + res.pos_embed
    assert direct["model"]["amplitude"][0] == pytest.approx(x0.pow(2).mean().sqrt().item(), rel=1e-5)
    # the same draw of (t, noise) each call: the numbers repeat exactly
    assert diagnose(models["dar"], BATCH)["model"] == r["dar"]


def test_a_recomputing_model_gives_the_numbers_of_the_plain_one():
    plain, recomputing = diagnose(tiny("dar"), BATCH)["model"], diagnose(tiny("dar", recompute=True), BATCH)["model"]
    assert recomputing["amplitude"] == plain["amplitude"] and recomputing["cosine"] == plain["cosine"]
    assert recomputing["grad_rms"] == pytest.approx(plain["grad_rms"], rel=1e-6)


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="blocks"):
        diagnose(nn.Linear(2, 2), BATCH)
