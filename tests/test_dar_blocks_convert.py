"""The converter: a standard residual DiT (written out below, independently of diffkern's) becomes a DAR DiT
with every pretrained weight copied bit for bit; diffkern's residual stream on those weights is the source."""
import math

import pytest
import torch
from torch import nn

from diffkern.dar.blocks import DiT
from diffkern.dar.convert import to_dar

D, HEADS, DEPTH, PATCH, SIZE, CH, CLASSES = 32, 4, 3, 2, 8, 3, 10


class StdAttention(nn.Module):
    def __init__(self, d, num_heads):
        super().__init__()
        self.num_heads, self.qkv, self.proj = num_heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, T, d = x.shape
        hd = d // self.num_heads
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, hd).unbind(2)
        w = torch.einsum("bqhe,bkhe->bhqk", q, k).mul(hd ** -0.5).softmax(-1)
        return self.proj(torch.einsum("bhqk,bkhe->bqhe", w, v).reshape(B, T, d))


class StdMlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class StdBlock(nn.Module):
    def __init__(self, d, num_heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = StdAttention(d, num_heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = StdMlp(d, 4 * d)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = (m[:, None] for m in self.adaLN_modulation(c).chunk(6, dim=1))
        x = x + g1 * self.attn(self.norm1(x) * (1 + sc1) + s1)
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + s2)


class StdPatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(CH, D, PATCH, PATCH)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class StdTimestep(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))

    def forward(self, t):
        freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
        a = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(a), torch.sin(a)], -1))


class StdLabel(nn.Module):
    def __init__(self):
        super().__init__()
        self.dropout_prob, self.embedding_table = 0.1, nn.Embedding(CLASSES + 1, D)

    def forward(self, y):
        return self.embedding_table(y)


class StdFinal(nn.Module):
    def __init__(self, out_ch):
        super().__init__()
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(D, PATCH * PATCH * out_ch)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x, c):
        shift, scale = (m[:, None] for m in self.adaLN_modulation(c).chunk(2, dim=1))
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class StdDiT(nn.Module):
    """A residual DiT in the usual layout, weights random everywhere (as after training: no zero gates)."""

    def __init__(self):
        super().__init__()
        self.out_ch = 2 * CH
        self.x_embedder, self.t_embedder, self.y_embedder = StdPatchEmbed(), StdTimestep(), StdLabel()
        self.pos_embed = nn.Parameter(torch.randn(1, (SIZE // PATCH) ** 2, D), requires_grad=False)
        self.blocks = nn.ModuleList(StdBlock(D, HEADS) for _ in range(DEPTH))
        self.final_layer = StdFinal(self.out_ch)

    def forward(self, x, t, y):
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        h = self.final_layer(h, c)
        g = SIZE // PATCH
        h = h.reshape(-1, g, g, PATCH, PATCH, self.out_ch).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(-1, self.out_ch, SIZE, SIZE)


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return StdDiT().eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, CH, SIZE, SIZE, generator=g), torch.tensor([3.0, 700.0]), torch.tensor([1, 9])


def test_every_source_weight_is_copied_exactly(source):
    dar = to_dar(source)
    theirs = dar.state_dict()
    for name, w in source.state_dict().items():
        assert torch.equal(theirs[name], w), name
    extra = set(theirs) - set(source.state_dict())
    assert extra and all(k.startswith("router.") for k in extra)
    assert dar.stream == "dar" and len(dar.blocks) == DEPTH and dar.n_sublayers == 2 * DEPTH
    assert not dar.training


def test_residual_form_of_the_converted_weights_is_the_source(source):
    x, t, y = inputs()
    torch.testing.assert_close(to_dar(source, stream="residual")(x, t, y), source(x, t, y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size,query", [(4, "timestep"), (2, "static"), (None, "dynamic")])
def test_converted_dar_model_runs_forward_and_backward(source, chunk_size, query):
    assert_dar_trains(to_dar(source, chunk_size=chunk_size, query=query), *inputs(), (2, 2 * CH, SIZE, SIZE))


def assert_dar_trains(dar, x, t, y, out_shape) -> None:
    """A converted DAR model's forward is finite with the expected shape, and its backward reaches every
    parameter finitely, the router's with a nonzero gradient."""
    out = dar(x, t, y)
    assert out.shape == out_shape and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = {n: p.grad for n, p in dar.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("router."))


def scheduled_sources(x0, outs, l, S, final=False):
    """The router's sources for sublayer l (or the final aggregate): specs/dar.md, summaries = chunk sums."""
    if S is None:
        return [x0, *outs[:l]]
    j = (l - 1) // S if final else l // S
    return [x0, *(sum(outs[k * S:(k + 1) * S]) for k in range(j)), *outs[j * S:l]]


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_converted_dar_routes_uniformly_at_init(source, chunk_size):
    """At init every sublayer input, and the final aggregate, is the plain mean of its scheduled sources."""
    dar = to_dar(source, chunk_size=chunk_size)
    seen, branch_out, embeds = [], [], []
    for block in dar.blocks:
        for norm in (block.norm1, block.norm2):
            norm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        for sub in (block.attn, block.mlp):
            sub.register_forward_hook(lambda m, a, o: branch_out.append(o))
    dar.final_layer.norm_final.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    dar.x_embedder.register_forward_hook(lambda m, a, o: embeds.append(o))
    x, t, y = inputs()
    with torch.no_grad():
        dar(x, t, y)
        c = dar.t_embedder(t) + dar.y_embedder(y, False)
    x0 = embeds[0] + dar.pos_embed
    outs = [dar.blocks[l // 2].modulation(c)[2 if l % 2 == 0 else 5][:, None] * o for l, o in enumerate(branch_out)]
    L = 2 * DEPTH
    assert len(seen) == L + 1
    for l, h in enumerate(seen):
        sources = scheduled_sources(x0, outs, l, chunk_size, final=l == L)
        torch.testing.assert_close(h, torch.stack(sources).mean(0), rtol=1e-5, atol=1e-6)


def test_layouts_that_are_not_a_dit_are_refused(source):
    with pytest.raises(ValueError, match="lacks"):
        to_dar(nn.Linear(3, 3))
    broken = StdDiT()
    broken.blocks[0].adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 4 * D))
    with pytest.raises(ValueError, match="6 chunks"):
        to_dar(broken)


def test_builds_the_same_architecture_as_diffkern_dit():
    model = DiT(input_size=SIZE, patch_size=PATCH, in_channels=CH, hidden_size=D, depth=DEPTH, num_heads=HEADS,
                num_classes=CLASSES, stream="residual")
    again = to_dar(model, stream="residual")
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
