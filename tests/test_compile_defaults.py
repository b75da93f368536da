"""Every call the README shows, in its default form, under torch.compile(fullgraph=True, dynamic=True).

Each case compiles once (one frame, no graph break: fullgraph raises on one) and then runs at four
batch sizes without a recompile, giving eager's result bit for bit: the aot_eager backend runs the same
kernels as eager, so any difference is a traced-region bug, not rounding. Random defaults (ntrk_step,
flow_sde_step, the random sink set) draw from torch's default generator inside the graph: the same
generator state gives the same noise as eager, and consecutive calls draw fresh noise. One case runs
through Inductor (fallback_random, so its noise is eager's) to hold the default path end to end.
"""
import torch
import contextlib
import copy

import diffkern
from diffkern.dar import dar_gather
from diffkern.dar.blocks import DiT
from diffkern.dar.sit import velocity_loss
from diffkern.nn import DARRouter, FlashGRPOLoss
from diffkern.rmdm import RecursiveMDM
from diffkern.rmdm import reference as rmdm_reference
from diffkern.sinks.op import MODES
from diffkern.sinks.processors import install_sink_processors

BATCHES = (11, 12, 13, 14)  # no other dim of the inputs equals one (duck sizing would tie it to B)


def randn(*shape, seed=0, requires_grad=False):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(requires_grad)


def assert_equal(got, want):
    """Bitwise equality of nested outputs (tensors, floats, None, dicts, tuples)."""
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for k in want:
            assert_equal(got[k], want[k])
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert_equal(a, b)
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got, want), (got, want)
    else:
        assert got == want


def compiles_once(fn, make_args, backend="aot_eager", loss=None, eager=None):
    """fn compiled fullgraph with dynamic shapes: one compile over BATCHES, each result equal to eager's
    (`eager`, default fn itself) under the same global RNG state, and with `loss(outputs)` the gradients
    of that scalar to every input and parameter that requires grad too (the compiled backward).
    Returns the compiled outputs."""
    torch._dynamo.reset()
    params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else getattr(fn, "params", [])
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=True)
    outs = []
    for i, B in enumerate(BATCHES):
        args = make_args(B)
        results = []
        # the first batch compiles (fullgraph: a graph break raises); a recompile after it raises too
        stance = torch.compiler.set_stance("fail_on_recompile") if i else contextlib.nullcontext()
        for run in (compiled, eager or fn):
            torch.manual_seed(100 + i)
            with stance if run is compiled else contextlib.nullcontext():
                out = run(*args)
            leaves = [t for t in (*args, *params) if isinstance(t, torch.Tensor) and t.requires_grad]
            results.append((out, torch.autograd.grad(loss(out), leaves) if loss else ()))
        assert_equal(*results)
        outs.append(results[0][0])
    return outs


def test_dar_route_forward_and_backward():
    d = 16
    q, gain = torch.zeros(d, requires_grad=True), torch.ones(d, requires_grad=True)

    def f(a, b, c):
        return diffkern.dar_route([a, b, c], q, gain)
    f.params = [q, gain]
    compiles_once(f, lambda B: [randn(B, 5, d, seed=s, requires_grad=True) for s in range(3)],
                  loss=lambda h: h.square().sum())


def test_dar_gather():
    d = 16
    q, gain = randn(d, seed=7), 1 + randn(d, seed=8) / 4
    compiles_once(lambda s0, s1, a0, a1: dar_gather([s0, s1], [a0, a1], q, gain),
                  lambda B: [randn(B, 5, d, seed=s) for s in range(4)])


def router_and_sublayers(d=16):
    """The README's DARRouter (timestep query, chunks of 2) over 4 linear sublayers."""
    torch.manual_seed(0)
    router = DARRouter(d, n_sublayers=4, chunk_size=2, query="timestep", cond_dim=d, summary="sum")
    return router, [torch.nn.Linear(d, d) for _ in range(4)]


def test_dar_router_run():
    d = 16
    router, sublayers = router_and_sublayers(d)

    def f(x0, cond):
        hist = router.begin(x0)
        for l, sub in enumerate(sublayers):
            hist.append(sub(router(hist, l, cond)))
        return router.final(hist, cond), router.run(x0, sublayers, cond)
    compiles_once(f, lambda B: (randn(B, 5, d), randn(B, d, seed=1)))


def test_dit_velocity_loss():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                learn_sigma=False, stream="dar")
    def f(x, y):
        return velocity_loss(model, x, y)
    f.params = list(model.parameters())
    compiles_once(f, lambda B: (randn(B, 4, 8, 8), torch.arange(B) % 10), loss=lambda l: l)


def test_sink_mass():
    compiles_once(lambda q, k: diffkern.sink_mass(q, k, n_query=6),
                  lambda B: (randn(B, 2, 9, 16), randn(B, 2, 9, 16, seed=1)))


def test_sink_attention():
    """Every mode, one call each in one graph (one compile instead of one per mode)."""
    def f(q, k, v):
        with torch.no_grad():
            return {mode: diffkern.sink_attention(q, k, v, k_sink=1, mode=mode, row_scope="image", n_query=6,
                                                  seed=3 if mode == "random" else None, return_stats=True)
                    for mode in MODES}
    compiles_once(f, lambda B: (randn(B, 2, 9, 16), randn(B, 2, 9, 16, seed=1), randn(B, 2, 9, 16, seed=2)))


def test_sink_attention_given():
    def f(q, k, v, idx):
        with torch.no_grad():
            return diffkern.sink_attention_given(q, k, v, idx, n_query=6)
    compiles_once(f, lambda B: (randn(B, 2, 9, 16), randn(B, 2, 9, 16, seed=1), randn(B, 2, 9, 16, seed=2),
                                torch.arange(2 * B).view(B, 2) % 9))


def test_sd3_sink_processors():
    """A tiny real diffusers SD3 transformer with sink processors on two layers, mode "measure" on block 0 and
    "random" on block 1 (the last, context_pre_only: the processors' text-stream handling is the same in every
    mode), sharing one recorder: one graph, and the recorder's records (statistics read once, after the calls)
    equal eager's."""
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8,
                                  qk_norm="rms_norm").eval()
    twin = copy.deepcopy(model)  # run eagerly: its processors count their calls apart
    recorders = [install_sink_processors(m, layers=0, mode="measure", k_sink=1, seed=5) for m in (model, twin)]
    for m, recorder in zip((model, twin), recorders):
        install_sink_processors(m, layers=1, mode="random", k_sink=1, seed=5, recorder=recorder)

    def forward(m):
        def f(x, c, p, t):
            with torch.no_grad():
                return m(hidden_states=x, encoder_hidden_states=c, pooled_projections=p, timestep=t).sample
        return f

    def args(B):
        return randn(B, 4, 8, 8), randn(B, 7, 32, seed=1), randn(B, 16, seed=2), torch.linspace(20.0, 500.0, B)
    compiles_once(forward(model), args, eager=forward(twin))
    records, want = (r.records for r in recorders)
    assert len(records) == 2 * len(BATCHES) and [r["call"] for r in records[::2]] == list(range(len(BATCHES)))
    assert [r["mode"] for r in records[:2]] == ["measure", "random"]
    assert_equal(records, want)


def test_flow_sde_step_and_flash_grpo_loss():
    def f(x, v, rewards, ids):
        sigma, sigma_next = torch.full((x.shape[0],), 0.8), torch.full((x.shape[0],), 0.75)
        x_next, y, log_prob_old, _ = diffkern.flow_sde_step(x, v, sigma, sigma_next)
        loss, stats = FlashGRPOLoss()(v, sigma, sigma_next, log_prob_old, rewards, ids, y=y)
        return x_next, loss, stats
    outs = compiles_once(f, lambda B: (randn(B, 37), randn(B, 37, seed=1, requires_grad=True),
                                       randn(B, seed=2), torch.arange(B) // 2), loss=lambda o: o[1])
    assert not torch.equal(outs[0][0][:2], outs[1][0][:2])  # fresh noise per call


def test_grpo_iso_loss():
    def f(v, x, x_next, lp, adv):
        s, sn = torch.full((x.shape[0],), 0.8), torch.full((x.shape[0],), 0.75)
        return diffkern.grpo_iso_loss(v, x, x_next, s, sn, lp, adv)
    compiles_once(f, lambda B: (randn(B, 37, requires_grad=True), randn(B, 37, seed=1), randn(B, 37, seed=2),
                                randn(B, seed=3), randn(B, seed=4)), loss=lambda o: o[0])


def test_twoos_bands_project_and_whiten():
    def f(z, g):
        lower, upper = diffkern.twoos_bands(M=2, D=256)
        w_proj, in_set = diffkern.twoos_project(z, tile=256)
        return lower, upper, w_proj, in_set, diffkern.whiten(g)
    compiles_once(f, lambda B: (2 * randn(B, 2, 16, 16), randn(B, 4, 8, 16, seed=1).cumsum(-1)))


def test_ntrk_step_draws_fresh_noise_per_call():
    def f(mu, w):
        return diffkern.ntrk_step(mu, 0.5, w, 0.3)
    outs = compiles_once(f, lambda B: (torch.zeros(B, 3, 67, requires_grad=True), randn(B, 3, 67, requires_grad=True)),
                         loss=lambda x: x.square().sum())
    assert not torch.equal(outs[0][:2], outs[1][:2])


def test_ntrk_step_through_inductor():
    def f(mu, w):
        return diffkern.ntrk_step(mu, 0.5, w, 0.3)
    with torch._inductor.config.patch(fallback_random=True):
        compiles_once(f, lambda B: (torch.zeros(B, 3, 67), randn(B, 3, 67)), backend="inductor")


def test_recurse():
    d, f_, K = 16, 32, 2
    g = torch.Generator().manual_seed(0)
    blocks = [[torch.randn(s, generator=g) / s[-1] ** 0.5 for s in rmdm_reference.param_shapes(d, f_)]
              for _ in range(K)]

    def f(x):
        return diffkern.recurse(blocks, x, n_iter=3, heads=2), diffkern.recurse(blocks, x, 3, heads=2, return_all=True)
    compiles_once(f, lambda B: (randn(B, 9, d),))


def test_recursive_mdm_loss():
    torch.manual_seed(0)
    model = RecursiveMDM(vocab=9, d=16, heads=2, K=2, L=2, seq_len=81)

    def f(x, prompt):
        return model.loss(x, prompt)
    f.params = list(model.parameters())
    compiles_once(f, lambda B: (torch.arange(B * 81).view(B, 81) % 9, torch.arange(B * 81).view(B, 81) % 3 == 0),
                  loss=lambda l: l)


def test_dar_router_run_with_recomputation():
    d = 16
    router, sublayers = router_and_sublayers(d)

    def f(x0, cond):
        return router.run(x0, sublayers, cond, recompute=True)
    f.params = [*router.parameters(), *(p for sub in sublayers for p in sub.parameters())]
    compiles_once(f, lambda B: (randn(B, 5, d, requires_grad=True), randn(B, d, seed=1)), loss=lambda h: h.square().sum())


def test_the_opaque_ops_the_defaults_compile_through_pass_opcheck():
    """diffkern::twoos_band_table (band tables inside a graph) and diffkern::sink_record (the sink
    processors' device-side recording): schema, fake and dispatch consistent."""
    from diffkern.ntrk.bands import band_table, bands_on
    from diffkern.sinks.processors import SinkRecorder
    lower, upper = band_table(3, 8, 0.3, "chi2", 8.0, torch.float32, torch.device("cpu"))
    want = bands_on(3, 8, 0.3, "chi2", 8.0, torch.float32, torch.device("cpu"))
    assert torch.equal(lower, want[0]) and torch.equal(upper, want[1]) and lower.data_ptr() != want[0].data_ptr()
    torch.library.opcheck(torch.ops.diffkern.twoos_band_table.default,
                          (3, 8, 0.3, "normal", None, torch.float32, torch.device("cpu")))
    rec, calls = SinkRecorder(), torch.zeros((), dtype=torch.int64)
    args = (calls, torch.tensor([0.5, 0.25]), torch.tensor([[[1]]]), torch.tensor([[[0.5]]]), id(rec), "blocks.0",
            "per_head", "max_mass,index0_mass")
    torch.library.opcheck(torch.ops.diffkern.sink_record.default, args)
    records = rec.records  # opcheck runs the op on copies of `calls`: every record is call 0
    assert records and all(r["call"] == 0 and r["layer"] == "blocks.0" for r in records)
    assert records[0]["max_mass"] == 0.5 and records[0]["index0_mass"] == 0.25 and records[0]["row_entropy"] is None
