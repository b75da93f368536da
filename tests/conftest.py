"""Test-wide switches, set before triton or diffkern is imported.

* Without a CUDA device, Triton kernels run on CPU tensors in the interpreter (TRITON_INTERPRET=1).
* Every output a kernel allocates starts as NaN (DIFFKERN_DEBUG_FILL=nan), so unwritten elements fail.
* The CUDA C++ kernels run on CPU tensors in the host-execution harness (diffkern.testing.cuda_harness,
  built on first use), so the `cuda` backend joins the backends every shared test body runs.
"""
import os
import random
import sys

# `make test` runs one pytest-xdist worker per core, every one CPU-bound. Read before numpy and torch load their
# thread pools: an OpenMP thread waiting at a barrier sleeps instead of spinning on the core another worker needs
# (a DiT training step in one worker beside a busy one: 0.4-0.8 CPU-s spinning, 0.16-0.24 passive), and numpy's
# OpenBLAS (the interpreter's tl.dot) runs on its worker's own core. torch keeps its thread count, so the CPU
# kernels' parallel paths still run.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

assert "triton" not in sys.modules and "diffkern" not in sys.modules, "conftest must run before triton is imported"
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["DIFFKERN_DEBUG_FILL"] = "nan"

import diffkern  # noqa: E402,F401  (loads the extension with the switches above in effect)
from diffkern.testing import cuda_harness  # noqa: E402

if not (HAS_CUDA and diffkern.build_info()["with_cuda"]):
    # The cuda backend then runs its kernels in the host harness; load it before the test modules ask
    # diffkern.testing.backends which backends to run.
    cuda_harness.load()


@pytest.fixture(autouse=True)
def seeded_global_rng():
    """Every test starts from the same global RNG state, whichever tests ran before it in its process (test
    order and the split over xdist workers vary): inputs drawn without a generator of their own are seeded
    too."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test, the previous count restored after it (the tiny diffusers pipelines
    run several times faster than on the default count, and their bit-identity checks do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


# Files of many independent, expensive tests (the ahead-of-time GPU compiles): under `--dist loadfile` (make test)
# their tests are handed to the pytest-xdist workers one by one instead of as one file.
SPREAD_OVER_WORKERS = {"test_kernels_compile.py", "test_kernels_specialise.py", "test_autotune_candidates.py"}


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, except that the SPREAD_OVER_WORKERS files' tests are single work units: every other
    file still runs whole in one worker (its module fixtures set up once), and since the scheduler hands out
    the biggest units first, the single compiles come last and keep both workers busy to the end. (The
    xdist_group marks of `--dist loadgroup` cannot do this: pytest-xdist 3.8 renames node ids in a way pytest
    9.2 ignores.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FilesAndSpreadTests(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return nodeid if path.rsplit("/", 1)[-1] in SPREAD_OVER_WORKERS else path

    return FilesAndSpreadTests(config, log)
