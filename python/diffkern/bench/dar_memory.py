"""Bytes autograd keeps for DAR routing across a whole stack: full vs chunked, with and without recomputation.

    python -m diffkern.bench.dar_memory [--L 56] [--S 4] [--B 2] [--T 16] [--d 64]

Counted with torch.autograd.graph.saved_tensors_hooks: every tensor autograd saves during one forward
(checkpoint inputs included, which non-reentrant checkpointing saves through autograd), deduplicated
by storage, so a tensor saved by several ops counts once. The sublayers are o_l = h_l / 2 (a multiply
by a Python number saves nothing), so the count is the routing's alone. A "stream tensor" is one
[B, T, d] tensor: bytes / (B T d itemsize).
"""
from __future__ import annotations

import argparse
import os

import torch

from ..nn import DARRouter

SCHEMES = {  # name: (chunk_size or None, recompute)
    "full": (None, False),
    "chunked": ("S", False),
    "chunked+recompute": ("S", True),
}


def saved_bytes(fn) -> tuple[object, int]:
    """(fn(), bytes of the unique storages autograd saved while fn ran)."""
    storages: dict[int, int] = {}

    def pack(x):
        st = x.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return out, sum(storages.values())


def stack_saved_bytes(L: int, chunk_size: int | None, recompute: bool, B: int, T: int, d: int,
                      query: str = "timestep", dtype: torch.dtype = torch.float32) -> int:
    """Bytes autograd keeps after one forward of L routed sublayers (o_l = h_l / 2) and the final aggregate."""
    cond_dim = 16
    router = DARRouter(d, L, chunk_size=chunk_size, query=query, cond_dim=cond_dim)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, T, d, generator=gen).to(dtype).requires_grad_()
    cond = torch.randn(B, cond_dim, generator=gen)
    sublayers = [lambda h: h / 2] * L
    out, nbytes = saved_bytes(lambda: router.run(x0, sublayers, cond, recompute=recompute))
    assert out.requires_grad
    return nbytes


def measure(L: int = 56, S: int = 4, B: int = 2, T: int = 16, d: int = 64, query: str = "timestep") -> dict:
    """Per scheme: bytes kept and stream-tensor equivalents; plus each scheme's ratio to the full scheme."""
    stream = B * T * d * 4
    rows = {}
    for name, (chunk, recompute) in SCHEMES.items():
        nbytes = stack_saved_bytes(L, S if chunk == "S" else None, recompute, B, T, d, query)
        rows[name] = {"bytes": nbytes, "stream_tensors": nbytes / stream}
    for row in rows.values():
        row["over_full"] = row["bytes"] / rows["full"]["bytes"]
    return rows


def markdown(rows: dict, L: int, S: int, B: int, T: int, d: int, query: str) -> str:
    out = [f"## DAR routing: bytes autograd keeps (L={L} sublayers, S={S}, B={B} T={T} d={d} float32, query={query})",
           "", "| scheme | bytes | stream tensors | / full |", "|---|---|---|---|"]
    out += [f"| {name} | {r['bytes']} | {r['stream_tensors']:.1f} | {r['over_full']:.3f} |" for name, r in rows.items()]
    ratio = rows["chunked+recompute"]["over_full"]
    out += ["", f"- Bar: chunked routing (S={S}, with chunk recomputation) keeps <= 40% of the full scheme: "
                f"{ratio:.1%}, **{'met' if ratio <= 0.4 else 'not met'}**"]
    return "\n".join(out) + "\n"


def report(quick: bool, out: str | None, mode=None) -> str:
    """The issue's setting (56 sublayers, S=4) at small B, T, d (the ratio does not depend on them). It counts
    bytes and times nothing: `quick` and `mode` are the harness's call shape (REPORT_MODULES), unused."""
    L, S, B, T, d, query = 56, 4, 2, 16, 64, "timestep"
    md = markdown(measure(L, S, B, T, d, query), L, S, B, T, d, query)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "dar_memory.md"), "w") as f:
            f.write(md)
    return md


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("L", 56), ("S", 4), ("B", 2), ("T", 16), ("d", 64)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--query", default="timestep")
    a = parser.parse_args(argv)
    print(markdown(measure(a.L, a.S, a.B, a.T, a.d, a.query), a.L, a.S, a.B, a.T, a.d, a.query))

if __name__ == "__main__":
    main()
