"""Section 7: registers and spills of the kernels as actually launched, against the ahead-of-time figures.

Triton: after the earlier sections ran every op on the GPU, each kernel's JIT cache
(`JITFunction.device_caches[device][0]`, key -> CompiledKernel, the same in triton 3.6 and 3.8) holds
every configuration that ran, with the driver's `n_regs` and `n_spills` and the options it was built
with (`metadata.num_warps`, `metadata.maxnreg`). Each is matched to the library's AOT spec of the same
kernel, num_warps and constexprs (`match_spec`), compiled for this GPU's arch as the compile tests compile
it (diffkern.testing.aot, unspecialised) and compared (`compare`): a spill, or a launch without
the maxnreg its no-spill AOT check used, fails; a configuration with no AOT spec is reported. The AOT
compiles (one per matched spec) stop when the run's time runs short: the launched figures need none.
CUDA C++: `cuobjdump --dump-resource-usage` of the built diffkern._C (`parse_resource_usage`): a kernel
with local memory (spills or a stack array) fails.
The dry run: the AOT figures of two kernels (seconds with a warm Triton cache), cuobjdump if present.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .context import Row

SECTION = "registers"
# Seconds left below which no more AOT compiles start (the launched figures need none).
RESERVE_S = 15.0
DRY_RUN_KERNELS = ("ntrk_step_kernel", "route_fwd_kernel")


@dataclass(frozen=True)
class Launched:
    """One configuration of a Triton kernel that ran: its function name, constexprs (the launch's
    specialisations included), num_warps, the maxnreg it was compiled with, the driver's figures, and its
    pointer arguments' types ("*bf16", ...: the dtype variant, which no constexpr names)."""
    kernel: str
    constexprs: dict
    num_warps: int
    maxnreg: int | None
    n_regs: int
    n_spills: int
    pointers: dict = field(default_factory=dict)


def _compiled_kernels(fn) -> list:
    caches = getattr(fn, "device_caches", {})
    return [ck for per_device in caches.values() for ck in per_device[0].values()]


def launched_kernels(fn) -> list[Launched]:
    """Every configuration of JITFunction `fn` in its JIT caches, on every device."""
    out = []
    for ck in _compiled_kernels(fn):
        if not hasattr(ck, "n_regs"):
            ck._init_handles()  # n_regs/n_spills are read when the binary is loaded
        names = fn.arg_names
        constants = getattr(ck.src, "constants", {})
        pointers = {k: v for k, v in getattr(ck.src, "signature", {}).items() if str(v).startswith("*")}
        out.append(Launched(fn.__name__, {names[k[0]]: v for k, v in constants.items() if len(k) == 1},
                            ck.metadata.num_warps, getattr(ck.metadata, "maxnreg", None), ck.n_regs, ck.n_spills,
                            pointers))
    return out


def _same(a, b) -> bool:
    return a == b or str(a) == str(b)


def match_spec(launched: Launched, specs) -> object | None:
    """The AOT spec of `launched`'s kernel, num_warps and pointer types whose constexprs the launch all has,
    the one naming the most constexprs; None when no spec describes this configuration."""
    from ..testing.aot import jit_function
    fits = [s for s in specs if jit_function(s.kernel).__name__ == launched.kernel and s.num_warps == launched.num_warps
            and all(k in launched.constexprs and _same(launched.constexprs[k], v) for k, v in s.constexprs.items())
            and all(s.signature.get(k, v) == v for k, v in launched.pointers.items())]
    return max(fits, key=lambda s: len(s.constexprs), default=None)


def _label(launched: Launched) -> str:
    shown = ",".join(f"{k}={v}" for k, v in sorted(launched.constexprs.items(), key=lambda kv: kv[0]))
    return f"{launched.kernel}[{shown}] warps={launched.num_warps}"


def compare(launched: Launched, spec, aot) -> Row:
    """The row for one launched configuration: `spec` its AOT spec (None: no spec describes it), `aot` that
    spec's compiled Resources (None: not compiled, for lack of time)."""
    metrics = {"n_regs": launched.n_regs, "n_spills": launched.n_spills, "maxnreg": launched.maxnreg}
    if spec is None:
        return Row(SECTION, _label(launched), "info", f"{launched.n_regs} registers, {launched.n_spills} spills; "
                   "no AOT spec describes this configuration (not covered by the compile tests)", metrics)
    metrics.update(aot_spec=spec.name, aot_maxnreg=spec.maxnreg)
    problems = []
    if launched.n_spills:
        problems.append(f"launched with {launched.n_spills} spills")
    if spec.maxnreg is not None and launched.maxnreg != spec.maxnreg:
        problems.append(f"launched with maxnreg {launched.maxnreg}, the AOT no-spill check used {spec.maxnreg}")
    if aot is None:
        detail = f"{launched.n_regs} registers launched; AOT figures not compiled (out of time) ({spec.name})"
    else:
        metrics.update(aot_registers=aot.registers, aot_spill_stores=aot.spill_stores)
        if aot.spill_stores:
            problems.append(f"the AOT compile spills {aot.spill_stores} bytes")
        detail = f"{launched.n_regs} registers launched, {aot.registers} AOT ({spec.name})"
    return Row(SECTION, _label(launched), "fail" if problems else "pass",
               "; ".join(problems + [detail]), metrics)


def parse_resource_usage(text: str) -> list[dict]:
    """cuobjdump --dump-resource-usage output -> one dict per (arch, function): REG, STACK, SHARED, LOCAL."""
    out, arch, function = [], None, None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (\S+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):\s*$", line):
            function = m.group(1)
        elif function and (m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)):
            reg, stack, shared, local = map(int, m.groups())
            out.append({"arch": arch, "function": function, "reg": reg, "stack": stack, "shared": shared,
                        "local": local})
            function = None
    return out


def _kernel_name(mangled: str) -> str:
    """The `..._kernel` identifier in an Itanium-mangled name (each identifier follows its length)."""
    for m in re.finditer(r"\d+", mangled):
        name = mangled[m.end():m.end() + int(m.group())]
        if name.endswith("_kernel"):
            return name
    return mangled[:60]


def cuda_rows() -> list[Row]:
    """One row per CUDA C++ kernel and arch in the built extension, from cuobjdump."""
    cuobjdump = shutil.which("cuobjdump") or next(
        (str(p) for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if root
         for p in [Path(root) / "bin" / "cuobjdump"] if p.is_file()), None)
    if cuobjdump is None:
        return [Row(SECTION, "CUDA C++ kernels (cuobjdump)", "skip", "cuobjdump not found")]
    import diffkern
    libs = glob.glob(os.path.join(os.path.dirname(diffkern.__file__), "_C*.so"))
    if not libs:
        return [Row(SECTION, "CUDA C++ kernels (cuobjdump)", "skip", "no built diffkern._C")]
    run = subprocess.run([cuobjdump, "--dump-resource-usage", libs[0]], capture_output=True, text=True, timeout=120)
    entries = parse_resource_usage(run.stdout)
    if not entries:
        return [Row(SECTION, "CUDA C++ kernels (cuobjdump)", "skip",
                    (run.stderr.strip().splitlines() or ["no kernels in the dump"])[-1])]
    return [Row(SECTION, f"{_kernel_name(e['function'])} {e['arch']} (CUDA C++)", "fail" if e["local"] else "pass",
                f"{e['reg']} registers, {e['local']} bytes local memory, {e['stack']} stack", e) for e in entries]


def _kernels(specs) -> list:
    from ..testing.aot import jit_function
    seen = {}
    for spec in specs:
        fn = jit_function(spec.kernel)
        seen.setdefault(id(fn), fn)
    return list(seen.values())


def _dry_rows(specs) -> list[Row]:
    from ..testing.aot import compile_spec, jit_function
    rows = []
    for name in DRY_RUN_KERNELS:
        spec = next((s for s in specs if jit_function(s.kernel).__name__ == name), None)
        if spec is None:
            continue
        aot = compile_spec(spec, 90)
        rows.append(Row(SECTION, f"{spec.name} sm_90a (AOT)", "info",
                        f"{aot.registers} registers, {aot.spill_stores} bytes spilled; launched figures need CUDA",
                        {"registers": aot.registers, "spill_stores": aot.spill_stores}))
    return rows


def run(ctx) -> list[Row]:
    from ..testing.aot import compile_spec, library_specs
    specs = library_specs()
    if ctx.dry_run or ctx.device.type != "cuda":
        return _dry_rows(specs) + cuda_rows()
    import torch
    major, minor = torch.cuda.get_device_capability(ctx.device)
    arch = 10 * major + minor
    rows, aot = [], {}
    for fn in _kernels(specs):
        for launched in launched_kernels(fn):
            spec = match_spec(launched, specs)
            if spec is not None and spec.name not in aot and ctx.time_left() > RESERVE_S:
                aot[spec.name] = compile_spec(spec, arch)
            rows.append(compare(launched, spec, aot.get(spec.name) if spec is not None else None))
    if not rows:
        rows.append(Row(SECTION, "Triton kernels", "skip", "no Triton kernel ran in this process"))
    return rows + cuda_rows()
