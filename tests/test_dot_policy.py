"""diffkern._dot.dot_meta: the precision every Triton matrix product runs at, per input dtype."""
import pytest
import torch

from diffkern import _dot, _triton


def test_interpreter_runs_every_product_in_fp32_ieee():
    assert _triton.interpreting()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert _dot.dot_meta(dtype) == {"DOT_F32": True, "PRECISION": "ieee"}


@pytest.mark.parametrize("matmul_precision, expected", [("highest", "tf32x3"), ("high", "tf32"), ("medium", "tf32")])
def test_gpu_fp32_follows_torch_matmul_precision(monkeypatch, matmul_precision, expected):
    monkeypatch.setattr(_triton, "interpreting", lambda: False)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(matmul_precision)
        assert _dot.dot_meta(torch.float32) == {"DOT_F32": True, "PRECISION": expected}
        assert _dot.dot_meta(torch.bfloat16)["DOT_F32"] is False
        assert _dot.dot_meta(torch.float16)["DOT_F32"] is False
    finally:
        torch.set_float32_matmul_precision(before)


def test_the_gpu_policy_can_be_asked_for_under_the_interpreter():
    """What bench.roofline's per-kernel peaks take: the precision a GPU runs, while the tests interpret."""
    assert _triton.interpreting()
    assert _dot.dot_meta(torch.bfloat16, interpreting=False)["DOT_F32"] is False
    assert _dot.dot_meta(torch.float32, interpreting=False)["PRECISION"] in ("tf32x3", "tf32")
    assert _dot.dot_meta(torch.float32, interpreting=True) == _dot.dot_meta(torch.float32)


def test_every_fp32_product_kernel_compiles_ahead_of_time_in_both_gpu_precisions():
    """Each kernel with fp32 products has AOT specs (tests/test_kernels_compile.py: compiled, 0 spills) for every
    precision dot_meta can give it on a GPU, so the tf32 that torch.set_float32_matmul_precision("high") selects
    is compiled by CI too, not first on a user's GPU."""
    from diffkern.testing.aot import library_specs

    precisions = {}
    for spec in library_specs():
        if spec.constexprs.get("DOT_F32") is True:
            precisions.setdefault(spec.kernel, set()).add(spec.constexprs["PRECISION"])
    assert len(precisions) == 8  # sinks: forward, column mass, suppression; R-MDM: 2 forward, 3 backward
    assert all(found == set(_dot.FP32_PRECISIONS) for found in precisions.values()), precisions
