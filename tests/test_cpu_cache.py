"""The CPU output cache (csrc/include/diffkern/cpu_cache.h; diffkern.empty_cache, diffkern.cached_bytes): a released
output's block is reused by the next output of its byte size, in a fresh tensor; a block anything still refers to
(a tensor, a view, a numpy array, autograd's saved tensors) is never reused nor written; results do not depend on
the cache; empty_cache frees what it holds; the bounds hold; concurrent calls stay correct."""
import gc
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import diffkern

# ntrk_step on [B, N] float32: every output 128 KiB, above the cache's 64 KiB minimum (cpu_cache.h kMinBytes)
B, N = 2, 16384
NBYTES = B * N * 4
MAX_BLOCKS = 64  # cpu_cache.h kMaxBlocks


def inputs(seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    mu, w, eps = (torch.randn(B, N, generator=g).requires_grad_(grad) for _ in range(3))
    return mu, (0.2 + torch.rand(B, generator=g)), w, torch.rand(B, generator=g), eps


def step(seed=0):
    mu, sigma, w, rho, eps = inputs(seed)
    return diffkern.ntrk_step(mu, sigma, w, rho, eps=eps)


def training_step(seed=0):
    """x and the gradients of mu, w, eps (dmu is dx itself; dw and deps come from the fused backward)."""
    mu, sigma, w, rho, eps = inputs(seed, grad=True)
    x = diffkern.ntrk_step(mu, sigma, w, rho, eps=eps)
    dx = torch.randn(B, N, generator=torch.Generator().manual_seed(100 + seed))
    return (x.detach(), *torch.autograd.grad(x, (mu, w, eps), dx))


@pytest.fixture(autouse=True)
def empty():
    """Each test starts from an empty cache (tensors of earlier tests in this process released first)."""
    gc.collect()
    diffkern.empty_cache()
    assert diffkern.cached_bytes() == 0
    yield
    gc.collect()
    diffkern.empty_cache()


def test_a_released_output_is_reused_in_a_fresh_tensor():
    x = step(0)
    ptr = x.data_ptr()
    x.requires_grad_()
    x.mul(2).sum().backward()  # grad, a version bump, an attribute: none may reach the next output
    with torch.no_grad():
        x.add_(1)
    x.note = "stale"
    del x
    assert diffkern.cached_bytes() == NBYTES
    y = step(1)
    assert y.data_ptr() == ptr and diffkern.cached_bytes() == 0
    assert not y.requires_grad and y.grad is None and y.grad_fn is None and y._version == 0
    assert not hasattr(y, "note") and y.is_contiguous() and y.shape == (B, N)
    diffkern.empty_cache()
    assert torch.equal(y, step(1))  # the same values on a fresh block


@pytest.mark.parametrize("holder", ("tensor", "view", "numpy", "storage", "autograd"))
def test_a_referenced_output_is_never_reused_nor_overwritten(holder):
    mu, sigma, w, rho, eps = inputs(0, grad=holder == "autograd")
    x = diffkern.ntrk_step(mu, sigma, w, rho, eps=eps)
    ptr, before = x.data_ptr(), x.detach().clone()
    if holder == "autograd":
        kept = x.square().sum()  # the graph saves x itself
        expected = torch.autograd.grad(kept, mu, retain_graph=True)[0]
    else:
        kept = {"tensor": lambda: x, "view": lambda: x[1:, 7:], "numpy": x.numpy, "storage": x.untyped_storage}[holder]()
    del x
    others = [step(seed) for seed in (1, 2, 3)]
    assert all(o.data_ptr() != ptr for o in others)
    held = diffkern.cached_bytes()
    if holder == "autograd":  # the last backward frees the graph, and with it x
        assert torch.equal(torch.autograd.grad(kept, mu)[0], expected)
    elif holder == "storage":
        assert torch.equal(torch.empty(0).set_(kept, 0, (B, N)), before)
    else:
        assert torch.equal(torch.as_tensor(kept), before[1:, 7:] if holder == "view" else before)
    del kept
    gc.collect()
    assert diffkern.cached_bytes() == held + NBYTES  # released at last: the block comes back


def test_a_resize_releases_the_block():
    x = step(0)
    ptr = x.data_ptr()
    x.resize_(B, 2 * N)  # the storage moves to a new allocation; the old block goes back
    assert diffkern.cached_bytes() == NBYTES
    assert step(1).data_ptr() == ptr


def test_training_results_do_not_depend_on_reuse():
    """The fused step's forward and backward into reused blocks (holding an earlier step's values) equal the same
    step into fresh ones, bit for bit (the subprocess test below checks the cache switched off)."""
    fresh = training_step(1)
    del fresh
    training_step(0)  # leaves its blocks, full of its values, in the cache
    assert diffkern.cached_bytes() == 3 * NBYTES
    reused = training_step(1)
    diffkern.empty_cache()
    for a, b in zip(reused, training_step(1)):
        assert torch.equal(a, b)


SCRIPT = """
import gc, json, sys, torch, diffkern
sys.path.insert(0, {tests!r})
from test_cpu_cache import training_step
runs = [[t.tolist() for t in training_step(s)] for s in (0, 1, 1)]
gc.collect()
print(json.dumps({{"held": diffkern.cached_bytes(), "runs": runs}}))
"""


def run_script(**env):
    env = {k: v for k, v in {**os.environ, **env}.items() if k != "DIFFKERN_DEBUG_FILL"}
    code = SCRIPT.format(tests=os.path.dirname(__file__))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_results_are_bit_identical_with_the_cache_on_and_off():
    """Two processes without the NaN debug fill, so a reused block holds the last step's values: cache on (the
    default) and off (DIFFKERN_CPU_CACHE_BYTES=0: nothing held) give the same bits."""
    on, off = run_script(), run_script(DIFFKERN_CPU_CACHE_BYTES="0")
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    on, off = json.loads(on.stdout), json.loads(off.stdout)
    assert on["held"] == 3 * NBYTES and off["held"] == 0
    assert on["runs"] == off["runs"] and on["runs"][1] == on["runs"][2]


def test_a_bad_cache_size_is_refused_naming_the_variable():
    run = run_script(DIFFKERN_CPU_CACHE_BYTES="2GiB")
    assert run.returncode != 0 and "DIFFKERN_CPU_CACHE_BYTES must be a byte count >= 0" in run.stderr


def test_empty_cache_frees_every_held_block():
    outs = [step(seed) for seed in range(3)]
    del outs
    assert diffkern.cached_bytes() == 3 * NBYTES
    diffkern.empty_cache()
    assert diffkern.cached_bytes() == 0


def test_empty_cache_runs_inside_a_fullgraph_compiled_function():
    step(0)  # its output released at once: one block held
    assert diffkern.cached_bytes() == NBYTES
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: (diffkern.empty_cache(), x * 2)[1], fullgraph=True, backend="eager")
    assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0))
    assert diffkern.cached_bytes() == 0


def test_the_cache_holds_the_latest_released_blocks_up_to_its_bound():
    """kMaxBlocks released blocks at most, the oldest going first; outputs under 64 KiB never enter it."""
    sizes = [(B, N + 16 * i) for i in range(MAX_BLOCKS + 6)]
    outs = [diffkern.ntrk_step(torch.zeros(shape), 1.0, torch.zeros(shape), 0.5, eps=torch.zeros(shape)) for shape in sizes]
    for i in range(len(outs)):  # released in order
        outs[i] = None
    assert diffkern.cached_bytes() == sum(4 * b * n for b, n in sizes[-MAX_BLOCKS:])
    diffkern.empty_cache()
    small = diffkern.ntrk_step(torch.zeros(2, 64), 1.0, torch.zeros(2, 64), 0.5, eps=torch.zeros(2, 64))
    del small
    assert diffkern.cached_bytes() == 0


def test_concurrent_calls_get_their_own_blocks():
    """Two threads calling the op at once (it runs without the GIL), each holding several outputs: every output
    has the values of its own call."""
    expected = {seed: step(seed).clone() for seed in (0, 1)}
    failures = []

    def loop(seed):
        for _ in range(50):
            outs = [step(seed) for _ in range(4)]
            failures.extend(seed for o in outs if not torch.equal(o, expected[seed]))
    threads = [threading.Thread(target=loop, args=(seed,)) for seed in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
