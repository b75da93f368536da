"""The compiled extension: what it records about its build, and the errors a mismatched build gives."""
import re

import pytest
import torch

import diffkern
from diffkern import _ops


def test_build_info_records_the_torch_it_was_built_with():
    info = diffkern.build_info()
    assert info["torch"] == torch.__version__
    assert info["torch_cuda"] == torch.version.cuda
    if info["with_cuda"]:
        assert info["cuda_archs"] and info["cuda_runtime_compiled"] > 0


@pytest.mark.parametrize("field,value,words", (
    ("torch", "2.13.0+cpu", "built for torch 2.13.0+cpu but torch"),
    ("torch_cuda", "12.8", "built for a torch with CUDA 12.8"),
))
def test_mismatched_build_names_both_versions_and_the_fix(field, value, words):
    info = dict(_ops.BUILD_INFO, **{field: value})
    with pytest.raises(diffkern.ExtensionError, match=re.escape(words)) as err:
        _ops._check_versions(info)
    assert "make build" in str(err.value) and "pip install --no-build-isolation" in str(err.value)


def test_missing_build_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_ops.glob, "glob", lambda pattern: [])
    with pytest.raises(diffkern.ExtensionError, match="not built.*make build"):
        _ops.load()


def test_every_op_has_a_schema_and_python_registrations():
    for name in ("dar_route_fwd", "dar_route_bwd"):
        op = getattr(torch.ops.diffkern, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta")


def test_without_the_extension_a_compiled_op_raises_the_load_error(monkeypatch):
    """What `diffkern._ops.ops` is when _C did not load (tests/test_install.py runs a real install without it)."""
    monkeypatch.setattr(_ops, "LOAD_ERROR", diffkern.ExtensionError("diffkern._C is not built; rebuild it"))
    with pytest.raises(diffkern.ExtensionError, match=r"diffkern::dar_route_fwd cannot run: diffkern._C is not built"):
        _ops._Missing().dar_route_fwd([], None, None, 1e-6)
    with pytest.raises(AttributeError):
        _ops._Missing()._private


def test_loaded_ops_are_torch_ops():
    assert _ops.LOADED and _ops.ops is torch.ops.diffkern
