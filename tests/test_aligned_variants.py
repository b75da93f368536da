"""ALIGNED kernel variants: pointers read from tensor tables carry no alignment facts, so the host checks them.

The DAR routing kernels read their sources (and write their gradients) through a table of pointers and
strides, R-MDM's persistent kernel its weights through a table of pointers. Without help Triton must assume such
a pointer is only element-aligned and issues 2-byte loads for bf16. When `_triton.aligned` finds every
table tensor 16-byte aligned with strides in whole 16 bytes, the launchers pick the ALIGNED variant, which
states that with tl.multiple_of: its PTX for sm_90a (as a launch specialises it: divisible sizes) loads 16
bytes at a time (`ld.global.v4`). Misaligned views get the plain variant and still compute the right
result in the interpreter.
"""
import re
from dataclasses import replace

import pytest
import torch

import diffkern
from diffkern import _triton
from diffkern.dar import triton_kernels as dar
from diffkern.rmdm import triton_kernels as rmdm
from diffkern.rmdm import triton_persistent
from diffkern.testing.aot import compiled_ptx, launched
from diffkern.testing.backends import forced
from diffkern.testing.triton_monitor import TritonMonitor
from test_dar_route import make_inputs, misaligned_inputs
from test_rmdm_recurse import make

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests (CPU tensors)")
ARCH = 90


def global_accesses(spec, aligned: bool) -> dict[str, int]:
    """Counts of sm_90a PTX global loads/stores by kind (e.g. 'ld.global.b16', 'ld.global.v4.b32') of `spec`
    with ALIGNED set, compiled as a launch with 16-divisible sizes and aligned argument pointers compiles it."""
    spec = replace(spec, constexprs={**spec.constexprs, "ALIGNED": aligned})
    ptx = compiled_ptx(launched(spec, ARCH, divisible=True), ARCH)
    found = {}
    for access in re.findall(r"\b(?:ld|st)\.global(?:\.\w+)*", ptx):
        found[access] = found.get(access, 0) + 1
    return found


def scalar_16bit(accesses: dict[str, int]) -> int:
    return sum(n for access, n in accesses.items() if access.endswith(".b16"))


@pytest.mark.parametrize("kernel", ("route_fwd_kernel", "route_bwd_kernel"))
def test_aligned_dar_kernels_move_bf16_sources_16_bytes_at_a_time(kernel):
    """d = 1024, bf16, static q (the backward with dar_gather's summary gradient): the plain variant reads
    the sources (and writes their gradients) 2 bytes at a time, the ALIGNED one only in 16-byte vectors."""
    spec = next(s for s in dar.aot_specs() if s.kernel.__name__ == kernel and s.tags["dtype"] == "bfloat16"
                and s.tags["block_d"] == 1024 and not s.tags["dynamic_q"] and s.constexprs.get("HAS_DLAST", True))
    plain, fast = global_accesses(spec, False), global_accesses(spec, True)
    assert scalar_16bit(plain) > 0
    assert scalar_16bit(fast) == 0 and fast.get("ld.global.v4.b32", 0) > plain.get("ld.global.v4.b32", 0), fast


def test_aligned_rmdm_persistent_kernel_loads_bf16_weights_in_vectors():
    """The Sudoku shape in bf16 with adaLN: fewer 2-byte loads (those left read biases and LayerNorm vectors
    at offsets no vector fits), at least as many 16-byte ones. (The tiled kernels take each weight as its own
    argument, whose alignment Triton's launch specialises on.)"""
    spec = triton_persistent.aot_specs()[0]
    assert spec.tags["dtype"] == "bfloat16" and spec.constexprs["HAS_MOD"]
    plain, fast = global_accesses(spec, False), global_accesses(spec, True)
    assert scalar_16bit(fast) < scalar_16bit(plain), (fast, plain)
    assert fast.get("ld.global.v4.b32", 0) >= plain.get("ld.global.v4.b32", 0) > 0


def test_aligned_needs_a_16_byte_start_and_16_byte_strides():
    x = torch.zeros(4, 8, 16, dtype=torch.bfloat16)
    assert _triton.aligned([x], (0, 1)) and _triton.aligned([x[1:]], (0, 1))
    assert not _triton.aligned([x[..., 1:]])                     # starts 2 bytes in
    assert _triton.aligned([x[:, :, :12]], (0, 1))                # narrower rows, strides still whole 16 bytes
    assert not _triton.aligned([x.view(4, 16, 8)[:, :, :4].transpose(1, 2)], (0, 1))  # token stride 1 element
    assert _triton.aligned([x.expand(3, 4, 8, 16)], (0,))       # a broadcast (stride 0) dim
    assert not _triton.aligned([x.float()[..., 2:]], ())         # fp32: 8 bytes in


def aligned_flags(launches) -> set:
    return {launch.meta["ALIGNED"] for launch in launches}


def test_dar_launchers_pick_the_variant_the_inputs_allow():
    """Fresh [B, T, 16] tensors run ALIGNED forward and backward; odd-offset slices of a wider buffer and a
    transposed buffer run the plain variant, with the right result (tests/test_dar_route.py checks them
    against the float64 oracle on every backend: test_misaligned_rows)."""
    for (sources, q, gain), expected in ((make_inputs(2, 3, 16, 3, torch.bfloat16, "static")[:3], True),
                                         (misaligned_inputs(2, 3, 16, torch.bfloat16, "static", None), False)):
        sources = [s.detach().requires_grad_() for s in sources]
        with forced("triton"), TritonMonitor() as mon:
            diffkern.dar_route(sources, q, gain).float().sum().backward()
        assert [launch.kernel for launch in mon.launches] == ["route_fwd_kernel", "route_bwd_kernel"]
        assert aligned_flags(mon.launches) == {expected}


def test_rmdm_weights_at_odd_offsets_run_the_plain_variant_with_the_same_states():
    shape = (1, 5, 8, 12, 2, 2, 2)
    blocks, x, mod = make(shape, torch.float32, True)
    weights = [w for block in blocks for w in block]
    shifted = []
    for w in weights:  # each weight copied to 4 bytes past a 16-byte boundary
        buffer = torch.empty(w.numel() + 1, dtype=w.dtype)
        shifted.append(buffer[1:].view(w.shape).copy_(w))
    runs = []
    for ws, expected in ((weights, True), (shifted, False)):
        with TritonMonitor() as mon:
            runs.append(rmdm.recurse_fwd(x, ws, mod, shape[6], shape[4], 1e-5))
        assert aligned_flags(mon.launches) == {expected}
    assert torch.equal(runs[0], runs[1])
