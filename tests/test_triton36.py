"""The triton 3.6 path: the GPU machines run torch 2.11 with triton 3.6, CI pins triton 3.8.

A venv whose own site-packages hold triton 3.6.0 and a numpy below 2.4 (installed without dependencies from
the package index pip is configured with; triton 3.6's interpreter turns one-element arrays into ints, which
numpy 2.4 refuses and triton 3.8 no longer does) and that otherwise sees this interpreter's packages (a .pth
file after its own)
runs a subset that reaches the Triton internals diffkern depends on: the interpreter patches of
diffkern._triton and diffkern._cooperative (threaded programs, helper calls), the monitor's hooks and
launch records (its dot FLOPs included), testing.aot's compile path (ASTSource, launched()'s binder) with PTX
for sm_90a and the TTGIR that reduction_orders reads, and _autotune's use of do_bench and OutOfResources.
Skipped where triton 3.6.0 cannot be installed.
"""
import os
import pathlib
import shutil
import site
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
VERSION = "3.6.0"
SUBSET = ["tests/test_cooperative.py", "tests/test_launch_options.py", "tests/test_autotune.py",
          "tests/test_aligned_variants.py::test_aligned_dar_kernels_move_bf16_sources_16_bytes_at_a_time",
          "tests/test_autotune_candidates.py::test_reduction_orders_see_a_change_of_warps",
          "tests/test_triton_monitor.py::test_dots_count_2mnk_at_their_block_shape_in_every_program_that_runs_them"]


@pytest.fixture(scope="module")
def python36(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton36")
    venv = root / "venv"
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--quiet", f"triton=={VERSION}", "numpy<2.4"], capture_output=True, text=True)
    if install.returncode != 0:
        shutil.rmtree(root)
        pytest.skip(f"triton {VERSION} cannot be installed here: {install.stderr.strip()[-400:]}")
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    pathlib.Path(own, "zz_parent_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    yield python
    shutil.rmtree(root)  # ~640 MB


def test_a_subset_passes_under_triton_3_6(python36):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    version = subprocess.run([str(python36), "-c", "import triton; print(triton.__version__)"], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == VERSION
    run = subprocess.run([str(python36), "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUBSET], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
