"""R-MDM's two Triton forward kernels, each called directly (the op picks one per call), in the interpreter.

* persistent (weight-stationary, grid barriers, programs run as threads): against the float64 plain block
  for several programs-per-block splits, including splits that leave some programs without weight rows;
  each weight tensor is loaded exactly once per call, whatever n_iter;
* tiled (seven many-program launches per block evaluation): against the same oracle in every dtype, on
  awkward shapes (its traffic model: test_rmdm_tiled_model.py);
* the regime `plan` and the op's dispatch between them.
"""
import pytest
import torch

import diffkern
from diffkern.rmdm import reference, triton_kernels, triton_persistent
from diffkern.testing.backends import forced
from diffkern.testing.numerics import assert_close_to_oracle
from diffkern.testing.triton_monitor import TritonMonitor
from test_rmdm_recurse import EPS, ids, make, plain_oracle

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests (CPU tensors)")

# (B, T, d, f, heads, K, n_iter), programs per block: one program per block; slices of 2 and 3 rows; 5
# programs over d = 8 (RD = 2: programs 4.. own no d rows, and f = 12 gives program 3 a partial f slice)
CASES = (((2, 5, 6, 10, 2, 2, 3), 1), ((2, 19, 12, 40, 3, 2, 2), 3), ((3, 7, 8, 12, 4, 1, 2), 5),
         ((1, 17, 16, 24, 1, 3, 2), 2))


def weights_of(blocks):
    return [w for b in blocks for w in b]


def check_against_oracle(states, shape, dtype, blocks, x, mod):
    n_iter, heads = shape[6], shape[4]
    with torch.no_grad():
        (oracle,), (spread,) = plain_oracle(shape, x, blocks, mod)
        low = reference.recurse(x, weights_of(blocks), mod, n_iter, heads, EPS)
    assert states.dtype == dtype
    assert_close_to_oracle(states, oracle, low, "states", spread)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("with_mod", (False, True), ids=("plain", "adaln"))
@pytest.mark.parametrize("shape,pb", CASES, ids=lambda c: ids(c) if isinstance(c, tuple) else f"PB{c}")
def test_persistent_matches_the_plain_block(shape, pb, with_mod, dtype):
    blocks, x, mod = make(shape, dtype, with_mod)
    with TritonMonitor():
        states = triton_persistent.recurse_persistent(x, weights_of(blocks), mod, shape[6], shape[4], EPS, pb)
    check_against_oracle(states, shape, dtype, blocks, x, mod)


# The tiled form's awkward shapes besides CASES: d = 40 (head width 20), head widths 16 and 32, T = 81 over three
# 32-query tiles.
TILED_SHAPES = [c[0] for c in CASES] + [(1, 33, 40, 72, 2, 1, 2), (3, 17, 48, 96, 3, 1, 2), (1, 81, 96, 160, 3, 2, 1)]


def run_tiled(shape, dtype, with_mod):
    blocks, x, mod = make(shape, dtype, with_mod)
    with TritonMonitor():
        states = triton_kernels.recurse_tiled(x, weights_of(blocks), mod, shape[6], shape[4], EPS)
    check_against_oracle(states, shape, dtype, blocks, x, mod)


@pytest.mark.parametrize("with_mod", (False, True), ids=("plain", "adaln"))
@pytest.mark.parametrize("shape", TILED_SHAPES, ids=ids)
def test_tiled_matches_the_plain_block(shape, with_mod):
    run_tiled(shape, torch.float32, with_mod)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("with_mod", (False, True), ids=("plain", "adaln"))
@pytest.mark.parametrize("shape", TILED_SHAPES[-2:], ids=ids)
def test_tiled_matches_the_plain_block_in_16_bit(shape, with_mod, dtype):
    """16-bit storage (u, qkv, ctx, g rounded to it, as the low-precision reference rounds every op's output);
    the products run through _dot's fp32 switch here, their 16-bit form is compiled AOT."""
    run_tiled(shape, dtype, with_mod)


@pytest.mark.parametrize(("dtype", "shape"), [(torch.float32, (2, 19, 12, 40, 3, 2, 2)),
                                             (torch.bfloat16, (2, 19, 12, 40, 3, 2, 2)),
                                             (torch.bfloat16, (2, 19, 16, 48, 2, 2, 2))], ids=str)
def test_tuning_runs_every_candidate_and_each_launch_can_be_repeated(dtype, shape, monkeypatch):
    """What pick does on a GPU: every launch runs each candidate configuration before the chosen one. The
    launches are repeatable (a residual reads one fp32 state buffer and writes the other), so the states equal
    a run of the chosen (last) candidates alone, and those larger tiles match the float64 oracle too. At d = 16,
    f = 48 the widths are multiples of 16: the products' aligned-only candidates (128 x 256, and 128 x 128 for the
    residual) run and are the last."""
    blocks, x, mod = make(shape, dtype, True)
    runs, tried = [], set()
    for tune in (True, False):
        def pick(name, key, configs, launch, kernel=None, tune=tune):
            for config in configs if tune else ():
                launch(config)
                tried.add(config)
            return configs[-1]
        monkeypatch.setattr(triton_kernels._autotune, "pick", pick)
        with TritonMonitor():
            runs.append(triton_kernels.recurse_tiled(x, weights_of(blocks), mod, shape[6], shape[4], EPS))
    assert torch.equal(runs[0], runs[1])
    check_against_oracle(runs[1], shape, dtype, blocks, x, mod)
    assert (set(triton_kernels._WIDE.values()) <= tried) == (shape[2] == 16)


def weight_loads(launch, weights) -> list[int]:
    """Bytes loaded from each weight tensor (they reach the kernel through the pointer table)."""
    return [launch.loaded_by.get(f"tensor_table tensor #{i}", 0) for i in range(len(weights))]


@pytest.mark.parametrize("n_iter", (1, 3))
def test_persistent_reads_each_weight_once_per_call(n_iter):
    """The bar's count: one launch, and every byte of every weight matrix and bias loaded exactly once, for any
    n_iter; the LayerNorm vectors once per program of their block (each normalises the rows it multiplies)."""
    shape, pb = (2, 19, 12, 40, 3, 2, n_iter), 3
    blocks, x, mod = make(shape, torch.float32, True)
    weights = weights_of(blocks)
    with TritonMonitor(by_tensor=True) as mon:
        triton_persistent.recurse_persistent(x, weights, mod, n_iter, 3, EPS, pb)
    assert mon.num_launches == 1
    times = [pb if reference.BLOCK_PARAMS[i % len(reference.BLOCK_PARAMS)].startswith("ln") else 1
             for i in range(len(weights))]
    assert weight_loads(mon.launches[0], weights) == [n * w.numel() * w.element_size() for n, w in zip(times, weights)]
    assert mon.launches[0].loaded_by["argument 'x_ptr'"] == x.numel() * x.element_size()


def test_plan_picks_the_persistent_regime_where_the_slices_fit():
    sudoku = dict(n_rows=81, d=256, f=1024, K=2)
    assert triton_persistent.plan(**sudoku, itemsize=2, max_programs=132) == 32
    assert triton_persistent.plan(**sudoku, itemsize=4, max_programs=132) == 64
    assert triton_persistent.plan(**sudoku, itemsize=4, max_programs=108) is None  # an A100 has 108 SMs
    assert triton_persistent.plan(**{**sudoku, "n_rows": 64 * 81}, itemsize=2, max_programs=132) is None
    assert triton_persistent.plan(**{**sudoku, "n_rows": 3 * 81}, itemsize=4, max_programs=132) == 64
    assert triton_persistent.plan(**{**sudoku, "n_rows": 4 * 81}, itemsize=4, max_programs=132) is None  # partials
    assert triton_persistent.plan(81, 512, 2048, 1, 2, 132) is None
    assert triton_persistent.plan(9, 12, 40, 2, 4, 132) == 1
    for d, f, K, itemsize in ((256, 1024, 2, 2), (256, 1024, 4, 2), (128, 512, 4, 2), (64, 256, 8, 4)):
        pb = triton_persistent.plan(81, d, f, K, itemsize, 132)
        assert pb is not None and K * pb <= 132
        assert triton_persistent._held_bytes(d, f, pb, itemsize) <= triton_persistent.WEIGHT_BUDGET


def tiled_launches(K, n_iter):
    """The kernels recurse_tiled launches, in order: seven per block evaluation."""
    norm, linear, attention = "recurse_norm_kernel", "recurse_linear_kernel", "recurse_attention_kernel"
    return [norm, linear, attention, linear, norm, linear, linear] * K * n_iter


def test_the_op_runs_the_kernel_the_plan_picks(monkeypatch):
    shape = (2, 5, 6, 10, 2, 2, 3)
    blocks, x, _ = make(shape, torch.float32, False)
    for max_programs, kernels in ((132, ["recurse_persistent_kernel"]), (1, tiled_launches(shape[5], shape[6]))):
        monkeypatch.setattr(triton_kernels._cooperative, "max_programs", lambda device, n=max_programs: n)
        with forced("triton"), TritonMonitor() as mon:
            diffkern.recurse(blocks, x, shape[6], heads=shape[4])
        assert [r.kernel for r in mon.launches] == kernels


def test_a_refused_cooperative_launch_falls_back_to_the_tiled_kernels(monkeypatch):
    """The driver refusing the persistent kernel's grid (simulated: the launch dirties the counter and raises
    Triton's error for CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE) runs the tiled kernels: the same states, one
    warning for any number of calls, the counter zeroed."""
    from diffkern import _cooperative

    def refused(kernel, grid, args, kwargs):
        kwargs.get("sync_ptr", args[kernel.arg_names.index("sync_ptr")]).fill_(5)
        raise RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")
    monkeypatch.setattr(_cooperative, "_launch_interpreted", refused)
    monkeypatch.setattr(_cooperative, "_warned", set())
    shape = (2, 5, 6, 10, 2, 2, 3)
    blocks, x, mod = make(shape, torch.float32, True)
    tiled = triton_kernels.recurse_tiled(x, weights_of(blocks), mod, shape[6], shape[4], EPS)
    with pytest.warns(RuntimeWarning, match="recurse_persistent_kernel.*refused.*tiled kernels") as caught:
        for _ in range(2):
            with forced("triton"), TritonMonitor() as mon:
                states = diffkern.recurse(blocks, x, shape[6], heads=shape[4], mod=mod, return_all=True)
            assert [r.kernel for r in mon.launches] == tiled_launches(shape[5], shape[6])
            assert torch.equal(states, tiled)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert _cooperative.sync_buffer(x.device).tolist() == [0, 0]


def test_every_program_passes_syncs_per_call_barriers(monkeypatch):
    """Counts the barrier arrivals (atomic adds of 1): syncs_per_call per program, plus one exit each; the
    counter is back at zero afterwards, ready for the next launch on the stream."""
    from triton.runtime import interpreter

    from diffkern import _cooperative

    arrivals = []
    add = interpreter.InterpreterBuilder.create_atomic_rmw

    def counting(self, rmw_op, ptr, val, *args):
        if int(val.data.ravel()[0]) == 1:
            arrivals.append(1)
        return add(self, rmw_op, ptr, val, *args)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_atomic_rmw", counting)
    shape, pb = (2, 5, 6, 10, 2, 2, 3), 2
    blocks, x, _ = make(shape, torch.float32, False)
    triton_persistent.recurse_persistent(x, weights_of(blocks), None, shape[6], shape[4], EPS, pb)
    programs = shape[5] * pb
    assert len(arrivals) == programs * (triton_persistent.syncs_per_call(shape[5], shape[6]) + 1)
    assert _cooperative.sync_buffer(x.device).tolist() == [0, 0]


def test_refuses_f_past_the_int32_offsets_within_a_tile_naming_it():
    """16-bit products run tiles up to 256 columns wide, addressed in int32 from their corner: f = 2**23 - 1 is
    refused before any launch (W_1 [f, d] and W_2 [d, f] expanded views: no memory)."""
    blocks, x, _ = make((1, 3, 4, 6, 2, 1, 1), torch.float16, False)
    weights = weights_of(blocks)
    f = 2 ** 23 - 1
    weights[8], weights[9] = weights[8][:1].expand(f, -1), weights[9][:1].expand(f)
    weights[10] = weights[10][:, :1].expand(-1, f)
    with pytest.raises(ValueError, match=f"f={f}"):
        triton_kernels.recurse_fwd(x, weights, None, 1, 2, EPS)
