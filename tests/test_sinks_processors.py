"""The sink processors inside real diffusers models built from tiny random-weight configs (no downloads)."""
import pytest
import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel

from diffkern import sink_attention
from diffkern.sinks import processors, reference
from diffkern.sinks.processors import (SinkAttnProcessor, SinkJointAttnProcessor, SinkRecorder,
                                       install_sink_processors)
from diffkern.testing.backends import forced


def sd3():
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=64,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=128,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8,
                                 qk_norm="rms_norm").eval()


def sd3_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(2, 7, 32, generator=g),
                pooled_projections=torch.randn(2, 16, generator=g), timestep=torch.tensor([500.0, 20.0]))


def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=64, norm_num_groups=16).eval()


def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor(10),
                encoder_hidden_states=torch.randn(2, 5, 32, generator=g))


def run(model, inputs, backend="cpu"):
    with torch.no_grad(), forced(backend):
        return model(**inputs).sample


class _Explicit:
    """The authors' way, inside the same projections: the float64 probability matrix, sort, bias, re-softmax."""

    def _attend(self, query, key, value, n_query):
        q, k, v = (x.double() for x in (query, key, value))
        scale = q.shape[-1] ** -0.5
        mass = reference.sink_mass(q, k, n_query, scale)[0]
        idx = reference.sink_topk(mass, self.k_sink, True)
        rows = n_query if self.row_scope == "image" else q.shape[2]
        self.recorder.records.append({"layer": self.layer, "indices": idx})
        return reference.sink_suppress(q, k, v, None, None, idx, rows, scale, self.bias)[0].to(query.dtype)


class ExplicitJoint(_Explicit, SinkJointAttnProcessor):
    pass


class ExplicitAttn(_Explicit, SinkAttnProcessor):
    pass


@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_sd3_measure_mode_output_is_identical_to_stock(backend):
    model, inputs = sd3(), sd3_inputs()
    stock = run(model, inputs)
    rec = install_sink_processors(model, layers={0, 2}, mode="measure")
    assert torch.equal(run(model, inputs, backend), stock)
    assert [r["layer"] for r in rec.records] == ["transformer_blocks.0.attn", "transformer_blocks.2.attn"]
    for r in rec.records:
        assert 0 < r["max_mass"] <= 1 and r["indices"] is None and 0 < r["top5_mass"] <= 1 + 1e-6


@pytest.mark.parametrize("row_scope", ("image", "all"))
def test_sd3_suppression_matches_explicit_matrix_reference(row_scope):
    model, inputs = sd3(), sd3_inputs()
    settings = dict(mode="per_head", k_sink=2, row_scope=row_scope)
    want_rec = install_sink_processors(model, layers={1}, processor=ExplicitJoint, **settings)
    want = run(model, inputs)
    rec = install_sink_processors(model, layers={1}, processor=SinkJointAttnProcessor, **settings)
    got = run(model, inputs)
    assert torch.equal(rec.records[0]["indices"], want_rec.records[0]["indices"])
    assert rec.records[0]["indices"].shape == (2, 2, 2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, run(sd3(), inputs), atol=1e-3), "suppression changed nothing"


def test_unet_measure_mode_output_is_identical_to_stock():
    model, inputs = unet(), unet_inputs()
    stock = run(model, inputs)
    rec = install_sink_processors(model, layers=range(len(model.attn_processors)), mode="measure")
    assert torch.equal(run(model, inputs), stock)
    assert len(rec.records) == len(model.attn_processors)


def test_unet_suppression_matches_explicit_matrix_reference():
    model, inputs = unet(), unet_inputs()
    layers = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor",
              "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"}
    want_rec = install_sink_processors(model, layers, processor=ExplicitAttn, mode="per_head", k_sink=1)
    want = run(model, inputs)
    rec = install_sink_processors(model, layers, processor=SinkAttnProcessor, mode="per_head", k_sink=1)
    got = run(model, inputs)
    for a, b in zip(rec.records, want_rec.records):
        assert a["layer"] == b["layer"] and torch.equal(a["indices"], b["indices"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_random_mode_draws_a_fresh_reproducible_set_per_call():
    model, inputs = sd3(), sd3_inputs()
    rec = install_sink_processors(model, layers={1}, mode="random", k_sink=1, seed=3)
    run(model, inputs)
    run(model, inputs)
    first, second = (r["indices"] for r in rec.records)
    assert [r["call"] for r in rec.records] == [0, 1] and not torch.equal(first, second)
    fresh = sd3()
    again = install_sink_processors(fresh, layers={1}, mode="random", k_sink=1, seed=3, recorder=SinkRecorder())
    run(fresh, inputs)
    assert again is not rec and torch.equal(again.records[0]["indices"], first)


@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_random_mode_without_statistics_suppresses_the_same_keys_in_one_given_forward(backend, monkeypatch):
    """statistics=False: call by call the same random keys as with the statistics, suppressed through
    sink_attention_given (sink_attention, which runs the mass passes, is never called), the same model output
    (masked softmax against the corrected one) and records holding the indices only."""
    model, inputs = sd3(), sd3_inputs()
    settings = dict(layers={0, 2}, mode="random", k_sink=1, seed=3, row_scope="all")
    with_stats = install_sink_processors(model, **settings)
    want = run(model, inputs, backend)
    fast = install_sink_processors(model, **settings, statistics=False)

    def refuse(*args, **kwargs):
        raise AssertionError("sink_attention called with statistics=False")
    monkeypatch.setattr(processors, "sink_attention", refuse)
    got = run(model, inputs, backend)
    assert len(fast.records) == len(with_stats.records) == 2
    for a, b in zip(fast.records, with_stats.records):
        assert a["layer"] == b["layer"] and torch.equal(a["indices"], b["indices"]) and a["max_mass"] is None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class ExplicitAntiSinkJoint(SinkJointAttnProcessor):
    """The anti-sink control the authors' way: the float64 matrix, the image rows' head-mean max probability,
    sort, bias those image tokens as keys, re-softmax."""

    def _attend(self, query, key, value, n_query):
        q, k, v = (x.double() for x in (query, key, value))
        scale = q.shape[-1] ** -0.5
        p = torch.softmax(reference.logits(q, k, scale), -1)[:, :, :n_query]
        r = p.amax(-1).mean(1, keepdim=True)
        idx = r.sort(dim=-1, descending=True, stable=True).indices[..., :self.k_sink * q.shape[1]]
        self.recorder.records.append({"layer": self.layer, "indices": idx})
        return reference.sink_suppress(q, k, v, None, None, idx, n_query, scale, self.bias)[0].to(query.dtype)


def test_sd3_anti_sink_matches_explicit_matrix_reference():
    model, inputs = sd3(), sd3_inputs()
    want_rec = install_sink_processors(model, layers={1}, processor=ExplicitAntiSinkJoint, mode="anti_sink", k_sink=2)
    want = run(model, inputs)
    rec = install_sink_processors(model, layers={1}, processor=SinkJointAttnProcessor, mode="anti_sink", k_sink=2)
    got = run(model, inputs)
    record = rec.records[0]
    assert torch.equal(record["indices"], want_rec.records[0]["indices"]) and record["indices"].shape == (2, 1, 4)
    assert (record["indices"] < 16).all(), "image tokens (16 of them), as keys"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert 0 < record["top_k_conc"] <= 1 + 1e-6 and 0 < record["max_act"] <= 1
    assert record["sink_at_index0"] + record["sink_in_image"] + record["sink_in_text"] == 1


def test_attention_mask_is_refused():
    proc = SinkAttnProcessor()
    with pytest.raises(NotImplementedError, match="attention_mask"):
        proc(None, torch.zeros(1, 2, 3), attention_mask=torch.zeros(1, 2))


def sd35():
    """A tiny SD3.5-Medium-style transformer: blocks 0 and 1 have a second attention `attn2` (dual attention)."""
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=64,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=128,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8,
                                 qk_norm="rms_norm", dual_attention_layers=(0, 1)).eval()


def sink_layers(model) -> dict:
    return {name.removesuffix(".processor"): type(p) for name, p in model.attn_processors.items()
            if isinstance(p, (SinkJointAttnProcessor, SinkAttnProcessor))}


@pytest.mark.parametrize("layers, want", [
    ({2}, {"transformer_blocks.2.attn": SinkJointAttnProcessor}),
    (-1, {"transformer_blocks.2.attn": SinkJointAttnProcessor}),
    ({1}, {"transformer_blocks.1.attn": SinkJointAttnProcessor}),
    ((1, "attn2"), {"transformer_blocks.1.attn2": SinkJointAttnProcessor}),
    ({(0, "attn"), (0, "attn2"), 2}, {"transformer_blocks.0.attn": SinkJointAttnProcessor,
                                      "transformer_blocks.0.attn2": SinkJointAttnProcessor,
                                      "transformer_blocks.2.attn": SinkJointAttnProcessor}),
    ({"transformer_blocks.1.attn2.processor"}, {"transformer_blocks.1.attn2": SinkJointAttnProcessor}),
])
def test_sd35_layers_are_transformer_block_indices(layers, want):
    model = sd35()
    install_sink_processors(model, layers, mode="measure")
    assert sink_layers(model) == want


def oracle_stats(attn, hidden_states, encoder_hidden_states=None, **_):
    """The measure-mode statistics of `attn` (an Attention module) on its inputs, projected as diffusers does."""
    def heads(x, norm):
        x = x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
        return x if norm is None else norm(x)
    q, k, v = (heads(attn.to_q(hidden_states), attn.norm_q), heads(attn.to_k(hidden_states), attn.norm_k),
               heads(attn.to_v(hidden_states), None))
    if encoder_hidden_states is not None:
        e = encoder_hidden_states
        q, k, v = (torch.cat(p, dim=2) for p in ((q, heads(attn.add_q_proj(e), attn.norm_added_q)),
                                                  (k, heads(attn.add_k_proj(e), attn.norm_added_k)),
                                                  (v, heads(attn.add_v_proj(e), None))))
    return sink_attention(q, k, v, mode="measure", n_query=hidden_states.shape[1], return_stats=True)[1]


def test_sd35_statistics_come_from_the_chosen_block():
    model, inputs = sd35(), sd3_inputs()
    seen = {}  # each attention module's inputs, found through the module tree, not through attn_processors

    def keep(key):
        def hook(module, args, kwargs):
            seen[key] = (module, kwargs)
        return hook
    for i, block in enumerate(model.transformer_blocks):
        for name in ("attn", "attn2"):
            if getattr(block, name, None) is not None:
                getattr(block, name).register_forward_pre_hook(keep(f"transformer_blocks.{i}.{name}"), with_kwargs=True)
    stock = run(sd35(), inputs)
    rec = install_sink_processors(model, {2, (1, "attn2")}, mode="measure")
    assert torch.equal(run(model, inputs), stock)
    with torch.no_grad(), forced("cpu"):
        want = {key: oracle_stats(m, **kwargs) for key, (m, kwargs) in seen.items()}
    assert sorted(r["layer"] for r in rec.records) == ["transformer_blocks.1.attn2", "transformer_blocks.2.attn"]
    for r in rec.records:
        assert r["max_mass"] == want[r["layer"]]["max_mass"].item()
        assert r["row_entropy"] == want[r["layer"]]["row_entropy"].item()
        others = [w["max_mass"].item() for key, w in want.items() if key != r["layer"]]
        assert r["max_mass"] not in others, "the statistics do not single out one block"


@pytest.mark.parametrize("bad", (3, -4, True, 1.0, (2, "attn2"), (0, "attn3"), (1, 2), (0, "attn", 1),
                                 "transformer_blocks.9.attn.processor"))
def test_sd35_bad_layers_raise(bad):
    with pytest.raises(ValueError, match="layers"):
        install_sink_processors(sd35(), [bad])


def test_unet_layers_refuse_block_pairs():
    with pytest.raises(ValueError, match="layers"):
        install_sink_processors(unet(), {(0, "attn1")})


@pytest.mark.parametrize("settings,name", [(dict(mode="top"), "mode"), (dict(k_sink=-1), "k_sink"),
                                           (dict(mode="random"), "seed"), (dict(bias=1.0), "bias"),
                                           (dict(intervention="soft"), "intervention"),
                                           (dict(intervention="value", alpha=-1.0), "alpha"),
                                           (dict(alpha=0.5), "alpha"),
                                           (dict(intervention="scale", bias=-5.0), "bias"),
                                           (dict(statistics=False), "statistics"),
                                           (dict(mode="random", seed=1, statistics=False, intervention="value"),
                                            "statistics")])
def test_bad_settings_are_refused_at_install(settings, name):
    """A setting sink_attention would refuse raises when the processors are installed, naming it, and leaves
    the model's processors as they were."""
    model = sd3()
    stock = {k: type(v) for k, v in model.attn_processors.items()}
    with pytest.raises(ValueError, match=name):
        install_sink_processors(model, {0}, **settings)
    assert {k: type(v) for k, v in model.attn_processors.items()} == stock
