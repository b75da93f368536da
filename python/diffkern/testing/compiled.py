"""torch.compile against eager: the same outputs and gradients."""
from __future__ import annotations

import torch


def assert_compiled_matches_eager(model, args, wrt, compiler: str, dynamic: bool) -> None:
    """torch.compile(model, fullgraph=True), from a fresh dynamo cache, gives eager's output and the same
    gradients of its sum to `wrt`."""
    torch._dynamo.reset()
    eager = model(*args)
    eager_grads = torch.autograd.grad(eager.sum(), wrt)
    compiled = torch.compile(model, backend=compiler, fullgraph=True, dynamic=dynamic)(*args)
    compiled_grads = torch.autograd.grad(compiled.sum(), wrt)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)
