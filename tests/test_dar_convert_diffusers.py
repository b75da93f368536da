"""to_dar on diffusers' DiTTransformer2DModel (tiny random config, no download): the weights land where they
belong, the residual form of the converted weights is the diffusers model, and layouts the DiT cannot hold
are refused by name."""
import pytest
import torch
import torch.nn.functional as F

from diffkern.dar.convert import to_dar
from diffkern.testing.numerics import assert_close_to_oracle, oracle_with_spread
from test_dar_blocks_convert import assert_dar_trains

diffusers = pytest.importorskip("diffusers")

HEADS, HEAD_DIM, CH, DEPTH, SIZE, PATCH, CLASSES = 2, 8, 3, 3, 8, 2, 10
D = HEADS * HEAD_DIM


def diffusers_dit(learn_sigma=True, **config):
    """A DiTTransformer2DModel with random weights everywhere (no zero gates), every block's conditioning
    embedder an equal copy of block 0's, as in converted DiT checkpoints."""
    torch.manual_seed(0)
    config = dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=CH,
                  out_channels=2 * CH if learn_sigma else None, num_layers=DEPTH, sample_size=SIZE,
                  patch_size=PATCH, num_embeds_ada_norm=CLASSES) | config
    model = diffusers.DiTTransformer2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)
    return model


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, CH, SIZE, SIZE, generator=g, dtype=dtype)
    return x, torch.tensor([3.0, 700.0], dtype=dtype), torch.tensor([1, CLASSES])  # CLASSES: the null class


@pytest.mark.parametrize("learn_sigma,config", [(True, dict(norm_eps=1e-5)),
                                                (False, dict(norm_eps=0.05, attention_bias=False))])
def test_residual_form_of_the_converted_model_is_the_diffusers_model(learn_sigma, config):
    """fp32 conversion against the diffusers model in float64 (the oracle), within the error model's fp32
    tolerance: the two layouts compute the same function in a different operation order. A norm_eps far from
    DiT's 1e-6 checks that the MLP LayerNorm's eps is carried over; attention_bias=False, the zero qkv bias."""
    model = diffusers_dit(learn_sigma, **config)
    x, t, y = inputs()
    converted = to_dar(model, stream="residual")
    assert converted.out_channels == (2 * CH if learn_sigma else CH) and not converted.training
    with torch.no_grad():
        actual, plain = converted(x, t, y), model(x, t, y).sample
        oracle_model = diffusers_dit(learn_sigma, **config).double()
        (oracle,), (spread,) = oracle_with_spread(lambda x: oracle_model(x, t.double(), y).sample, [x],
                                                  n=4 * D, dtype=torch.float32)
    assert_close_to_oracle(actual, oracle, plain, "converted residual DiT", spread)


def test_every_sublayer_holds_the_diffusers_weights():
    model = diffusers_dit()
    dar = to_dar(model)
    emb = model.transformer_blocks[0].norm1.emb
    pairs = [(dar.x_embedder.proj, model.pos_embed.proj), (dar.t_embedder.mlp[0], emb.timestep_embedder.linear_1),
             (dar.t_embedder.mlp[2], emb.timestep_embedder.linear_2),
             (dar.y_embedder.embedding_table, emb.class_embedder.embedding_table),
             (dar.final_layer.adaLN_modulation[1], model.proj_out_1), (dar.final_layer.linear, model.proj_out_2)]
    for ours, theirs in zip(dar.blocks, model.transformer_blocks):
        pairs += [(ours.adaLN_modulation[1], theirs.norm1.linear), (ours.attn.proj, theirs.attn1.to_out[0]),
                  (ours.mlp.fc1, theirs.ff.net[0].proj), (ours.mlp.fc2, theirs.ff.net[2])]
        a = theirs.attn1
        rows = zip(ours.attn.qkv.weight.chunk(3), ours.attn.qkv.bias.chunk(3))
        for part, (w, b) in zip((a.to_q, a.to_k, a.to_v), rows):
            assert torch.equal(w, part.weight) and torch.equal(b, part.bias)
    for ours, theirs in pairs:
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        assert all(torch.equal(w, theirs.state_dict()[k]) for k, w in ours.state_dict().items()), ours
    assert torch.equal(dar.pos_embed, model.pos_embed.pos_embed)
    assert dar.t_embedder.freq_shift == 1 and all(b.norm2.eps == 1e-5 for b in dar.blocks)


def test_each_sublayer_computes_what_the_diffusers_sublayer_computes():
    """Same input, same output, sublayer by sublayer: attention (q, k, v rows in order), MLP, modulation and
    the conditioning (timestep features with diffusers' frequency shift, label table)."""
    model = diffusers_dit()
    dar = to_dar(model, stream="residual")
    x, t, y = inputs()
    h = torch.randn(2, (SIZE // PATCH) ** 2, D, generator=torch.Generator().manual_seed(2))
    emb = model.transformer_blocks[0].norm1.emb
    with torch.no_grad():
        c = emb(t, y, hidden_dtype=torch.float32)
        torch.testing.assert_close(dar.t_embedder(t) + dar.y_embedder(y, False), c)
        for ours, theirs in zip(dar.blocks, model.transformer_blocks):
            torch.testing.assert_close(ours.attn(h), theirs.attn1(h))
            torch.testing.assert_close(ours.mlp(h), theirs.ff(h))
            torch.testing.assert_close(ours.adaLN_modulation(c), theirs.norm1.linear(F.silu(c)))
        torch.testing.assert_close(dar.x_embedder(x) + dar.pos_embed, model.pos_embed(x))


@pytest.mark.parametrize("chunk_size,query", [(2, "timestep"), (None, "dynamic")])
def test_converted_dar_model_runs_forward_and_backward(chunk_size, query):
    dar = to_dar(diffusers_dit(), chunk_size=chunk_size, query=query).train()
    assert_dar_trains(dar, *inputs(), (2, 2 * CH, SIZE, SIZE))


def test_a_block_whose_embedder_differs_is_refused_by_name():
    model = diffusers_dit()
    with torch.no_grad():
        model.transformer_blocks[2].norm1.emb.timestep_embedder.linear_2.bias[0] += 1
    with pytest.raises(ValueError, match=r"transformer_blocks\[2\]\.norm1\.emb\.timestep_embedder\.linear_2\.bias"):
        to_dar(model)


@pytest.mark.parametrize("config,match", [
    (dict(activation_fn="gelu"), "activation_fn"),
    (dict(norm_elementwise_affine=True), "norm_elementwise_affine"),
    (dict(dropout=0.1), "dropout"),
    (dict(out_channels=5), "out_channels"),
])
def test_layouts_the_dit_cannot_hold_are_refused_by_name(config, match):
    with pytest.raises(ValueError, match=match):
        to_dar(diffusers_dit(**config))


def test_a_weight_with_no_place_in_the_dit_is_refused_by_name():
    model = diffusers_dit()
    model.transformer_blocks[1].extra = torch.nn.Linear(D, D)
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.extra\.weight"):
        to_dar(model)
