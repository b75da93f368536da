"""Checks of argument values that need them on the host (sink indices, NaN band tables): when they run
(diffkern._checks.host_value_check), and that where they are skipped (CUDA-graph capture, torch.compile
tracing) the kernels stay in bounds: an out-of-range sink index suppresses nothing."""
import math

import pytest
import torch

import diffkern
from diffkern import _checks
from diffkern.testing.backends import device_for, forced

from test_sinks import make_qkv

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 1)


@pytest.mark.parametrize("device, capturing, compiling, runs", [
    (CPU, False, False, True), (CPU, False, True, False),
    (CUDA, False, False, True), (CUDA, True, False, False), (CUDA, False, True, False), (CUDA, True, True, False)])
def test_host_value_check_runs_outside_capture_and_tracing(device, capturing, compiling, runs):
    assert _checks.host_value_check(device, capturing, compiling) is runs


@pytest.fixture
def check_skipped(monkeypatch):
    """The situation of a CUDA call under graph capture: value checks do not run."""
    monkeypatch.setattr(_checks, "values_readable", lambda t: False)


def suppress(idx, n_rows=9):
    q, k, v = make_qkv(1, 2, 9, 11, 64, torch.float32, seed=3, planted=1, device=device_for("triton"))
    with forced("triton"):  # bounds-checked under the interpreter
        o, lse, *_ = torch.ops.diffkern.sink_attention_fwd(q, k, v, 9, 0.125)
        out, post = torch.ops.diffkern.sink_suppress(q, k, v, o, lse, torch.tensor(idx, device=q.device), n_rows,
                                                     0.125, -1e4)
    return o, out, post


def test_unchecked_out_of_range_indices_suppress_nothing(check_skipped):
    o, out, post = suppress([[[-10**6, 10**6]]])
    assert torch.equal(out, o) and torch.equal(post, torch.zeros_like(post))


@pytest.mark.parametrize("n_rows", (9, 4))
def test_unchecked_out_of_range_index_leaves_the_others_alone(check_skipped, n_rows):
    """Key 1 is the planted sink: its rows are recomputed exactly, with the same bias row either way."""
    _, out, post = suppress([[[1, 10**6]]], n_rows)
    _, out_valid, post_valid = suppress([[[1]]], n_rows)
    assert torch.equal(out, out_valid) and torch.equal(post, post_valid)


def given(idx):
    q, k, v = make_qkv(1, 2, 9, 11, 64, torch.float32, seed=3, planted=1, device=device_for("triton"))
    with forced("triton"):
        return diffkern.sink_attention_given(q, k, v, torch.tensor(idx, dtype=torch.int64, device=q.device))


def test_unchecked_out_of_range_index_suppresses_no_key_in_the_given_path(check_skipped):
    assert torch.equal(given([[1, 10**6, -10**6]]), given([[1]]))
    assert torch.equal(given([[10**6]]), given([[]]))


def test_checked_out_of_range_index_raises():
    with pytest.raises(ValueError, match=r"idx values must be in \[0, N_k\) = \[0, 11\), got \[1, 11\]"):
        suppress([[[1, 11]]])


def test_unchecked_nan_band_is_not_an_error(check_skipped):
    # (tiles of 4 entries: the interpreter runs a quarter of the column programs that tiles of 16 take)
    lower, upper = (b.float().clone().to(device_for("triton")) for b in diffkern.twoos_bands(16, 4))
    upper[2, 3] = math.nan
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0)).to(lower.device)
    with forced("triton"):
        out, _ = diffkern.twoos_project(x, bands=(lower, upper), passes=1)  # a NaN band never converges: 1 pass
    assert out.shape == x.shape


def test_unreadable_counts_run_every_2os_pass_without_a_host_read(monkeypatch):
    """Under capture the projection cannot read its in-set counts to stop early: it runs every pass, which
    gives the early-exit answer (a pass after convergence clips nothing), and reads no tensor on the host."""
    # 16 tiles of 4 (the interpreter runs a quarter of the column programs that tiles of 16 take): samples 0 and 1
    # are in the set after 2 clipping passes, sample 2 after 3; the unreadable run clips 5 times
    lower, upper = (b.float().to(device_for("triton")) for b in diffkern.twoos_bands(16, 4))
    x = (3 * torch.randn(3, 64, generator=torch.Generator().manual_seed(1))).to(lower.device)
    with forced("triton"):
        expected = diffkern.twoos_project(x, bands=(lower, upper), passes=5)
        monkeypatch.setattr(_checks, "values_readable", lambda t: False)

        def no_host_read(t):
            raise AssertionError("a tensor was read on the host")
        monkeypatch.setattr(torch.Tensor, "__bool__", no_host_read)
        got = diffkern.twoos_project(x, bands=(lower, upper), passes=5)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.gpu
def test_out_of_range_index_under_graph_capture_suppresses_nothing():
    q, k, v = make_qkv(1, 2, 9, 11, 64, torch.float32, seed=3, planted=1, device="cuda")
    o, lse, *_ = torch.ops.diffkern.sink_attention_fwd(q, k, v, 9, 0.125)
    args = (q, k, v, o, lse)
    good, bad = (torch.tensor([[[j]]], device="cuda") for j in (1, 10**6))
    torch.ops.diffkern.sink_suppress(*args, good, 9, 0.125, -1e4)  # compiles the kernels before the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out, post = torch.ops.diffkern.sink_suppress(*args, bad, 9, 0.125, -1e4)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, o) and not post.any()
