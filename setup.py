"""Builds diffkern._C: the op schemas, the C++ CPU kernels, and the CUDA sources when a toolkit is found.

Environment variables (all documented in README.md):
  DIFFKERN_CUDA=0|1        force the CUDA sources off/on (default: on when nvcc is found and torch is a CUDA build)
  TORCH_CUDA_ARCH_LIST     GPU archs (default CUDA_ARCHS: sm_80 and sm_90a cubins, and compute_80 PTX that newer
                           GPUs, Blackwell on, JIT-compile at load)
  DIFFKERN_CPU_ARCH        -march of the CPU kernels, a ';'-separated list, baseline first (default on x86-64:
                           "x86-64-v2;x86-64-v3;x86-64-v4", the widest the CPU runs chosen at load; elsewhere the
                           compiler's default target); one name ("native" for a build that only runs here) builds
                           that variant alone
  MAX_JOBS                 parallel compile jobs (default: sized to cores and free memory)
  DIFFKERN_DEBUG=1         -O0 -g builds (otherwise the libraries are linked without debug info)

The runtime requirement on torch is the exact release this build compiled against: diffkern._C loads
with no other (diffkern/_ops.py checks it at import).
"""
import glob
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE_DIR = os.path.join(ROOT, "csrc", "include")


def find_cuda_home():
    """The toolkit root as nvcc itself reports it (a wrapper script on PATH makes torch guess wrong)."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.realpath(home)
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if not nvcc:
        return None
    dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True)
    top = re.search(r"^#\$ TOP=(.*)$", dry.stderr + dry.stdout, re.MULTILINE)
    return os.path.realpath(top.group(1).strip()) if top else None


def default_jobs():
    """Parallel compile jobs sized to free memory (~2 GB per torch translation unit)."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        free_gb = int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        free_gb = 4.0
    return max(1, min(os.cpu_count() or 1, int(free_gb // 2)))


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME  # must precede the cpp_extension import, which reads it once
os.environ.setdefault("MAX_JOBS", str(default_jobs()))
# ccache, when installed, through its masquerade directory: torch's ABI check runs `$CXX -v`, so CXX must
# stay a plain compiler name, and the compilers found first on PATH are ccache's wrappers instead.
for _masquerade in ("/usr/lib/ccache", "/usr/lib64/ccache", "/usr/local/opt/ccache/libexec"):
    if os.path.exists(os.path.join(_masquerade, "c++")):
        os.environ["PATH"] = _masquerade + os.pathsep + os.environ["PATH"]
        break

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def version():
    with open(os.path.join(ROOT, "python", "diffkern", "_version.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"$', f.read(), re.MULTILINE).group(1)


def install_requires():
    """torch at the release built against (a local label such as +cu130 dropped), and the band tables' math."""
    return [f"torch=={torch.__version__.split('+')[0]}", "numpy>=1.26", "scipy>=1.11"]


# "+PTX" (torch's syntax) embeds compute_80 PTX beside the sm_80 cubin, from the same front-end pass: no
# measurable build time (an sm_90 cubin with compute_90 PTX instead adds ~50% to each CUDA file's compile).
# CMakeLists.txt has the same default.
CUDA_ARCHS = "8.0+PTX;9.0a"


def want_cuda():
    flag = os.environ.get("DIFFKERN_CUDA")
    if flag is not None and flag not in ("0", "1"):
        sys.exit(f"DIFFKERN_CUDA must be 0 or 1, got {flag!r}")
    if flag == "1" and not (CUDA_HOME and torch.version.cuda):
        sys.exit("DIFFKERN_CUDA=1 but no CUDA toolkit (nvcc) was found or torch is a CPU-only build "
                 f"(torch {torch.__version__}, CUDA_HOME={CUDA_HOME})")
    if flag is not None:
        return flag == "1"
    return bool(CUDA_HOME and torch.version.cuda)


# The x86-64 levels the loader can test the CPU for (csrc/diffkern/cpu_dispatch.cpp): the variants
# added to a baseline, v3 for AVX2 + FMA, v4 for AVX-512 (R-MDM's GEMM micro-kernel).
X86_LEVELS = ("x86-64-v2", "x86-64-v3", "x86-64-v4")


def cpu_variants():
    """The CPU kernels' ISA variants as -march names, the portable baseline first ("default": no -march)."""
    env = os.environ.get("DIFFKERN_CPU_ARCH")
    if env is None:
        return list(X86_LEVELS) if platform.machine().lower() in ("x86_64", "amd64") else ["default"]
    names = [name.strip() for name in env.split(";") if name.strip()]
    wide = [name for name in names[1:] if name not in X86_LEVELS]
    if not names or wide:
        sys.exit(f"DIFFKERN_CPU_ARCH={env!r}: give a baseline -march, then only x86-64 levels {X86_LEVELS} "
                 "(the ones chosen at run time)")
    return names


def march(variant):
    return [] if variant == "default" else [f"-march={variant}"]


def nvcc_version():
    out = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"],
                         capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] if out else "unknown"


def write_build_info(with_cuda, archs, variants):
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "with_cuda": with_cuda,
        "nvcc": nvcc_version() if with_cuda else None,
        "cuda_archs": archs if with_cuda else None,
        "cpu_arch": variants[0],
        "cpu_variants": variants,
        "python": sys.version.split()[0],
    }
    path = os.path.join(ROOT, "python", "diffkern", "_build_info.py")
    text = "# Written by setup.py at build time; read before diffkern._C is loaded.\nBUILD_INFO = " + repr(info) + "\n"
    old = open(path).read() if os.path.exists(path) else None
    if old != text:
        with open(path, "w") as f:
            f.write(text)


def cpu_kernels(variant, cxx, link):
    """The CPU kernels (csrc/cpu) for one ISA variant: a library of their own, loaded by _C (not imported).

    Hidden visibility binds the variant's inline and template code within its own library.
    """
    tag = re.sub(r"[^A-Za-z0-9]", "_", variant)
    flags = cxx + march(variant) + ["-fopenmp", "-fvisibility=hidden", "-fvisibility-inlines-hidden"]
    return CppExtension(f"diffkern._C_cpu_{tag}", sorted(glob.glob("csrc/cpu/*.cpp")),
                        include_dirs=[INCLUDE_DIR],
                        extra_compile_args={"cxx": flags}, extra_link_args=["-fopenmp", *link])


def extensions():
    """diffkern._C (schemas, CPU kernel loader, CUDA kernels; baseline ISA) and one CPU kernel library per variant."""
    with_cuda = want_cuda()
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CUDA_ARCHS)
    variants = cpu_variants()
    write_build_info(with_cuda, archs, variants)
    debug = os.environ.get("DIFFKERN_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # Python's flags add -g: a release compiles without debug info (-g0: a third to half of each C++ file's compile
    # time) and links without it (the default CUDA build: 67 MB -> 5.1 MB).
    link = ["-Wl,--strip-debug"] if not debug and sys.platform.startswith("linux") else []
    cxx = opt + ([] if debug else ["-g0"]) + ["-std=c++20", "-Wall", "-Wno-unknown-pragmas"]
    kernels = [cpu_kernels(variant, cxx, link) for variant in variants]
    # The variant list reaches the loader as a C++ flag only: nvcc would split a -D value at its commas.
    cxx = cxx + march(variants[0]) + [f"-DDIFFKERN_CPU_VARIANTS={','.join(variants)}"]
    sources = sorted(glob.glob("csrc/diffkern/*.cpp"))
    include_dirs = [INCLUDE_DIR]
    if not with_cuda:
        return [CppExtension("diffkern._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                             extra_link_args=link), *kernels]
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    # torch's CUDA headers include cuBLAS/cuSPARSE headers that ship in the nvidia wheels, not the toolkit
    wheel_include = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "include")
    if os.path.isdir(wheel_include):
        include_dirs.append(wheel_include)
    lib_dirs = [d for d in (os.path.join(CUDA_HOME, "lib64"), os.path.join(CUDA_HOME, "lib"))
                if os.path.exists(os.path.join(d, "libcudart.so"))]
    # A spill shows as a ptxas warning in the build log; the tests (sm_80/sm_90a) fail on one. It does not
    # fail a user's build: other archs and nvcc versions may allocate registers differently.
    nvcc = opt + ["-std=c++20", "-Xptxas=-warn-spills", "--expt-relaxed-constexpr"]
    return [CUDAExtension("diffkern._C", sources, include_dirs=include_dirs, library_dirs=lib_dirs,
                          define_macros=[("DIFFKERN_WITH_CUDA", "1")],
                          extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link), *kernels]


class BuildExtensions(BuildExtension.with_options(use_ninja=True)):
    """torch's ninja build, each extension in a build directory of its own: the CPU kernel variants
    compile the same sources, whose objects would otherwise share one path."""

    def build_extension(self, ext):
        base = self.build_temp
        self.build_temp = os.path.join(base, ext.name)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


setup(
    name="diffkern",
    version=version(),
    install_requires=install_requires(),
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtensions},
)
