"""The CUDA build embeds PTX beside its cubins, so a GPU newer than sm_90 (Blackwell) JIT-compiles the kernels."""
import pathlib
import re
import shutil
import subprocess

import pytest
from torch.utils import cpp_extension

import diffkern

ROOT = pathlib.Path(__file__).resolve().parents[1]


def default_arch_lists() -> tuple[str, str]:
    setup = re.search(r'^CUDA_ARCHS = "([^"]+)"$', (ROOT / "setup.py").read_text(), re.MULTILINE)
    cmake = re.search(r'^set\(_cuda_archs "([^"]+)"\)', (ROOT / "CMakeLists.txt").read_text(), re.MULTILINE)
    return setup.group(1), cmake.group(1)


def test_the_default_arch_list_builds_cubins_and_ptx(monkeypatch):
    """torch's own flag builder, given the default list, asks nvcc for the sm_80 and sm_90a cubins and for
    compute_80 PTX (code=compute_80), which the driver JIT-compiles for any later architecture."""
    setup, cmake = default_arch_lists()
    assert setup == cmake
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", setup)
    flags = cpp_extension._get_cuda_arch_flags()
    assert {"-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"} <= set(flags)
    assert [f for f in flags if re.fullmatch(r"-gencode=arch=compute_(\d+),code=compute_\1", f)], flags


@pytest.mark.skipif(shutil.which("cuobjdump") is None, reason="needs the CUDA toolkit's cuobjdump")
def test_the_built_extension_holds_the_ptx_its_arch_list_asks_for():
    info = diffkern.build_info()
    if not info["with_cuda"]:
        pytest.skip("a build without the CUDA kernels")
    library = next((pathlib.Path(diffkern.__file__).parent).glob("_C.*.so"))  # _C itself, not _C_cpu_*
    listed = subprocess.run(["cuobjdump", "--list-ptx", str(library)], capture_output=True, text=True).stdout
    wants_ptx = any(arch.endswith("+PTX") for arch in info["cuda_archs"].split(";"))
    assert ("compute_" in listed) == wants_ptx, (info["cuda_archs"], listed)

