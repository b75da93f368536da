"""compile_spec: kernels compile for sm_80 and sm_90a without a GPU, and ptxas's report is read right."""
import types

import pytest
import triton
import triton.language as tl

from diffkern._triton import KernelSpec
from diffkern.testing.aot import AotCompileError, compile_spec, jit_function


@triton.jit
def _times(x, s):
    return x * s


@triton.jit
def _plus_one(x):
    return x + 1.0


helpers = types.ModuleType("helpers")  # kernels may call helpers as `module.helper(...)`
helpers.plus_one = _plus_one


@triton.jit
def scale_kernel(x_ptr, y_ptr, n, s, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + offs, helpers.plus_one(_times(x, s)).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def normalize_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    row = tl.program_id(0) * n
    x = tl.load(x_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    x = x - tl.sum(x, axis=0) / n
    tl.store(y_ptr + row + offs, x / tl.sqrt(tl.sum(x * x, axis=0) / n), mask=mask)


@triton.autotune(configs=[triton.Config({"BLOCK": 256}, num_warps=4)], key=["n"])
@triton.jit
def autotuned_scale_kernel(x_ptr, y_ptr, n, s, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, _times(tl.load(x_ptr + offs, mask=mask), s), mask=mask)


def scale_spec(dtype: str = "bf16", block: int = 1024, kernel=scale_kernel) -> KernelSpec:
    signature = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "n": "i32", "s": "fp32"}
    return KernelSpec(f"scale_{dtype}_{block}", kernel, signature, {"BLOCK": block}, num_warps=4)


def normalize_spec(block: int, num_warps: int) -> KernelSpec:
    signature = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}
    return KernelSpec(f"normalize_{block}_w{num_warps}", normalize_kernel, signature, {"BLOCK": block}, num_warps)


@pytest.mark.parametrize("arch, name", [(80, "sm_80"), (90, "sm_90a")])
def test_kernel_with_helpers_compiles_without_spills(arch, name):
    res = compile_spec(scale_spec(), arch)
    assert (res.name, res.arch, res.num_warps) == ("scale_bf16_1024", name, 4)
    assert res.registers > 0
    assert (res.spill_stores, res.spill_loads, res.stack_bytes) == (0, 0, 0)


@pytest.mark.parametrize("arch", [80, 90])
def test_reduction_reports_its_shared_memory(arch):
    assert compile_spec(normalize_spec(1024, num_warps=4), arch).shared_bytes > 0


@pytest.mark.parametrize("arch", [80, 90])
def test_register_hungry_config_reports_spills(arch):
    # 8192 fp32 values live across two reductions in one warp: 256 per thread, over the 255-register cap.
    res = compile_spec(normalize_spec(8192, num_warps=1), arch)
    assert res.registers == 255
    assert res.spill_stores > 0 and res.spill_loads > 0 and res.stack_bytes > 0


def test_config_that_cannot_compile_raises_with_name_and_config():
    with pytest.raises(AotCompileError, match=r"(?s)scale_fp16_100 \(kernel scale_kernel, sm_80.*'BLOCK': 100.*power of 2"):
        compile_spec(scale_spec("fp16", block=100), 80)


def test_autotuned_kernel_compiles_through_its_wrapper():
    assert compile_spec(scale_spec("fp32", block=256, kernel=autotuned_scale_kernel), 90).registers > 0


def test_compiled_jit_function_is_used_as_is(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    compiled = triton.jit(normalize_kernel.fn)
    assert jit_function(compiled) is compiled


def test_second_compile_hits_the_triton_cache(monkeypatch):
    compile_spec(scale_spec("fp16"), 80)
    hits = []
    monkeypatch.setattr(triton.knobs.compilation, "listener", lambda **kw: hits.append(kw["cache_hit"]))
    compile_spec(scale_spec("fp16"), 80)
    assert hits == [True]

