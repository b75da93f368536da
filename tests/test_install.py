"""What a user gets from `pip install`: a wheel built from this checkout, installed into a fresh venv with
only its declared dependencies, imported and run from outside the source tree; then the same install
with the compiled libraries deleted, where the references still import and run.

The wheel reuses this checkout's build (build/ objects, the configuration _build_info.py records), so
only the link and packaging run. The declared lower bounds of numpy and scipy are what the venv gets
(the rest of the suite runs the pinned, newer ones). Packages come from wherever pip is configured to
look (`pip config list`); when one is missing there the test fails and says so: it is never skipped.
"""
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

import diffkern
from diffkern import _optional
from diffkern._build_info import BUILD_INFO

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One op per technique on tiny CPU inputs (float64: every CPU kernel takes it), from outside the tree.
RUN_OPS = """
import sys, torch, diffkern
from importlib.metadata import version
assert diffkern.__version__ == version("diffkern"), (diffkern.__version__, version("diffkern"))
assert diffkern.__file__.startswith(sys.prefix), diffkern.__file__
assert "triton" not in sys.modules and "scipy" not in sys.modules, "imported eagerly"
g = torch.Generator().manual_seed(0)
f64 = dict(dtype=torch.float64)
outs = {
    "dar": diffkern.dar_route([torch.randn(2, 3, 8, generator=g, **f64) for _ in range(3)],
                              torch.randn(8, generator=g, **f64), torch.ones(8, **f64)),
    "grpo": diffkern.flow_sde_step(torch.randn(2, 16, generator=g, **f64), torch.randn(2, 16, generator=g, **f64),
                                   torch.full((2,), 0.8, **f64), torch.full((2,), 0.7, **f64),
                                   eps=torch.randn(2, 16, generator=g, **f64))[0],
    "ntrk": diffkern.whiten(torch.randn(2, 4, 64, generator=g, **f64)),
    "rmdm": diffkern.recurse([[torch.randn(s, generator=g, **f64) * 0.1 for s in
                               diffkern.rmdm.reference.param_shapes(8, 16)]],
                             torch.randn(2, 5, 8, generator=g, **f64), 2, heads=2),
    "sinks": diffkern.sink_attention(*(torch.randn(1, 2, 6, 8, generator=g, **f64) for _ in range(3))),
}
for name, out in outs.items():
    assert torch.isfinite(out).all(), name
print("ok", diffkern.__version__, diffkern.build_info()["cpu_isa"])
"""

# The same install without diffkern._C: references, models and modules import and run; compiled ops and
# build_info raise ExtensionError with the fix.
WITHOUT_C = """
import torch, diffkern
from diffkern.dar.reference import dar_route_reference
from diffkern.grpo.reference import flow_sigmas
from diffkern.nn import DARRouter, FlashGRPOLoss
from diffkern.rmdm import RecursiveMDM
from diffkern.sampling import NTRKSampler
from diffkern.sinks.reference import attention_fwd
g = torch.Generator().manual_seed(0)
sources = [torch.randn(2, 3, 8, generator=g) for _ in range(2)]
assert dar_route_reference(sources, torch.zeros(8), torch.ones(8)).shape == (2, 3, 8)
assert diffkern.twoos_bands(4, 8)[0].shape == (4, 8)
assert flow_sigmas(10).shape[0] >= 10
for call in (lambda: diffkern.dar_route(sources, torch.zeros(8), torch.ones(8)), diffkern.build_info):
    try:
        call()
    except diffkern.ExtensionError as err:
        assert "not built" in str(err) and "pip install" in str(err), err
    else:
        raise AssertionError("no ExtensionError")
print("ok without _C")
"""


def run(cmd, what, cwd, timeout):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")})
    if out.returncode:
        pytest.fail(f"{what} failed (exit {out.returncode}): {' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return out.stdout


def build_env() -> dict:
    """The configuration the in-tree build used, so the wheel reuses its objects and _build_info.py stays as is."""
    env = dict(os.environ, DIFFKERN_CUDA="1" if BUILD_INFO["with_cuda"] else "0",
               DIFFKERN_CPU_ARCH=";".join(BUILD_INFO["cpu_variants"]))
    if BUILD_INFO["with_cuda"]:
        env["TORCH_CUDA_ARCH_LIST"] = BUILD_INFO["cuda_archs"]
    return env


def metadata(wheel: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        return z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()


def lowest_allowed(wheel: str) -> list[str]:
    """`numpy==1.26.*` for each `numpy>=1.26` the wheel declares: its dependencies at their lower bounds."""
    requires = re.findall(r"^Requires-Dist: ([\w-]+)\s*\(?>=([\d.]+)\)?\s*$", metadata(wheel), re.MULTILINE)
    return [f"{name}=={low}.*" for name, low in requires]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_outside_the_tree(tmp_path):
    dist, venv, elsewhere = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                          "-w", str(dist), ROOT], cwd=ROOT, env=build_env(), capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, f"pip wheel failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    wheel, = (str(p) for p in dist.glob("diffkern-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert any(re.fullmatch(r"diffkern/_C\..*(so|pyd)", n) for n in names), names
    assert not any(n.startswith(("tests/", "csrc/")) for n in names)
    torch_release = BUILD_INFO["torch"].split("+")[0]
    assert re.search(rf"^Requires-Dist: torch\s*\(?=={re.escape(torch_release)}\)?$", metadata(wheel), re.MULTILINE)

    try:
        install_and_run(wheel, venv, elsewhere)
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # ~5 GB (torch and its CUDA libraries)


def install_and_run(wheel, venv, elsewhere):
    run([sys.executable, "-m", "venv", str(venv)], "creating the venv", elsewhere, 120)
    py = str(venv / "bin" / "python")
    pins = lowest_allowed(wheel)
    assert {p.split("==")[0] for p in pins} == {"numpy", "scipy"}, pins
    run([py, "-m", "pip", "install", "-q", "--no-compile", wheel, *pins], "pip install of the wheel and its declared "
        "dependencies (torch, numpy, scipy) from the package index pip is configured with (`pip config list`); "
        "offline, those wheels must be there", elsewhere, 900)
    run([py, "-m", "pip", "check"], "pip check", elsewhere, 120)
    assert run([py, "-c", RUN_OPS], "one op per technique from the installed wheel", elsewhere, 300).startswith("ok")

    site = run([py, "-c", "import os, diffkern; print(os.path.dirname(diffkern.__file__))"], "locating diffkern",
               elsewhere, 120).strip()
    for name in os.listdir(site):
        if name.startswith("_C") and name.endswith((".so", ".pyd")):
            os.remove(os.path.join(site, name))
    assert run([py, "-c", WITHOUT_C], "importing the references without _C", elsewhere, 300).startswith("ok")



def test_import_leaves_triton_and_scipy_for_first_use():
    """`import diffkern` imports neither (about 1 s between them); the dev tree, not the wheel, outside TRITON_INTERPRET."""
    code = "import sys, diffkern; print(sorted({'triton', 'scipy'} & set(sys.modules)))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(diffkern.__file__))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_missing_optional_dependency_names_its_extra():
    with pytest.raises(ImportError, match=re.escape("pip install 'diffkern[plots]'")):
        _optional.require("diffkern_no_such_module", "plots")
