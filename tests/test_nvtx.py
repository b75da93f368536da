"""NVTX ranges around the public ops: off by default, opened when enabled, kept out of compiled graphs."""
import contextlib

import nvtx
import torch

import diffkern
from diffkern import _nvtx


def test_ranges_are_off_by_default():
    assert _nvtx.ENABLED is False


def test_enabled_ranges_wrap_the_op_eagerly_and_stay_out_of_compiled_graphs(monkeypatch):
    opened = []

    @contextlib.contextmanager
    def annotate(name, domain):
        opened.append((name, domain))
        yield

    monkeypatch.setattr(_nvtx, "ENABLED", True)
    monkeypatch.setattr(nvtx, "annotate", annotate)
    sources = [torch.randn(2, 3, 8) for _ in range(2)]
    q, gain = torch.randn(8), torch.ones(8)
    eager = diffkern.dar_route(sources, q, gain)
    assert opened == [("diffkern.dar_route", "diffkern")]
    torch._dynamo.reset()
    compiled = torch.compile(diffkern.dar_route, fullgraph=True)(sources, q, gain)
    torch.testing.assert_close(compiled, eager)
