"""Compile Triton kernels for real NVIDIA GPUs on a machine without one, and read their resources.

`compile_spec(spec, 80)` / `compile_spec(spec, 90)` runs the full Triton pipeline for sm_80 / sm_90a
(Python AST -> TTIR -> TTGIR -> LLVM -> PTX -> cubin, the same code a GPU launch would build for that
configuration), then Triton's bundled `ptxas -v` on the PTX with the flags Triton itself uses, and
returns the registers per thread, spill stores/loads and stack frame that ptxas reports, and the
shared memory Triton allocates.

What this proves: the configuration compiles for the architecture, and how many registers and how
much shared memory and spilling it needs. What it cannot prove: that the kernel is correct or fast
on the GPU (the interpreter tests correctness on CPU; nothing here runs), nor that the shared memory
fits a particular card (compare `shared_bytes` with the card's limit yourself).

`launched(spec, arch, one=..., divisible=...)` is `spec` as Triton's launcher specialises it for one
call: an integer argument equal to 1 becomes the constexpr 1, and integers that are multiples of 16
and 16-byte-aligned pointers are marked `tt.divisibility` 16. The specs themselves never specialise,
so a kernel that compiles from its spec can still fail to compile when launched with, say, M == 1.

It works under TRITON_INTERPRET=1, where `@triton.jit` returns interpreter wrappers: the wrapped
Python functions, and the @triton.jit helpers they call, are rebuilt as JITFunctions for compiling.

`reduction_orders(spec, arch)` reads the layout of every floating-point reduction from the TTGIR: two
configurations with equal lists add in the same order on the GPU (the autotune candidates are held to it).

Compiles are cached by Triton (TRITON_CACHE_DIR, default ~/.triton/cache), and the ptxas report is
stored beside the cubin in the same cache entry, so a repeated call costs milliseconds.
"""
from __future__ import annotations

import contextlib
import io
import re
import subprocess
import tempfile
import types
from collections.abc import Collection
from dataclasses import dataclass, replace

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from triton.runtime.cache import get_cache_manager
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from diffkern._triton import KernelSpec


class AotCompileError(RuntimeError):
    """A kernel configuration failed to compile for a GPU architecture."""


@dataclass
class Resources:
    """What ptxas and Triton report for one compiled configuration (per thread unless stated)."""
    name: str
    arch: str
    num_warps: int
    registers: int
    spill_stores: int  # bytes, summed over the kernel and any noinline functions it calls
    spill_loads: int
    stack_bytes: int  # the kernel's stack frame
    shared_bytes: int  # per program (CTA), as Triton allocates it


def library_specs() -> list[KernelSpec]:
    """Every launch configuration the library's Triton kernels declare (each technique's aot_specs())."""
    from diffkern.dar import triton_kernels as dar
    from diffkern.grpo import triton_kernels as grpo
    from diffkern.ntrk import triton_kernels as ntrk
    from diffkern.rmdm import triton_kernels as rmdm
    from diffkern.sinks import triton_kernels as sinks
    return [spec for module in (dar, grpo, ntrk, rmdm, sinks) for spec in module.aot_specs()]


def sm_arch(arch: int) -> str:
    """ptxas's name for a compute capability: 80 -> sm_80; 90 and later use the 'a' (arch-specific) target."""
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def _compile(spec: KernelSpec, arch: int):
    fn = jit_function(spec.kernel)
    config = (f"{spec.name} (kernel {fn.__name__}, {sm_arch(arch)}, num_warps={spec.num_warps}, "
              f"num_stages={spec.num_stages}, {spec.constexprs})")
    attrs = {(fn.arg_names.index(name),): value for name, value in spec.attrs.items()}
    source = ASTSource(fn=fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    try:
        with _ptxas_log() as log:
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=_options(spec))
    except Exception as error:
        raise AotCompileError(f"{config} failed to compile: {error}") from error
    if log.getvalue():  # a cold compile: Triton's own `ptxas -v` run printed its report
        _store_report(compiled, log.getvalue())
    return compiled, config


@contextlib.contextmanager
def _ptxas_log():
    """Captures the `ptxas -v` report Triton prints while it builds a cubin (knobs.nvidia.dump_ptxas_log), so a
    cold compile runs ptxas once; where the knob is missing the report stays empty and _ptxas_report runs ptxas."""
    knobs = getattr(triton, "knobs", None)
    nvidia = getattr(knobs, "nvidia", None)
    log = io.StringIO()
    if nvidia is None or not hasattr(nvidia, "dump_ptxas_log"):
        yield log
        return
    previous = nvidia.dump_ptxas_log
    nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            yield log
    finally:
        nvidia.dump_ptxas_log = previous


def compiled_ptx(spec: KernelSpec, arch: int) -> str:
    """The PTX Triton generates for `spec` on compute capability `arch` (cached like compile_spec)."""
    return _compile(spec, arch)[0].asm["ptx"]


def compile_spec(spec: KernelSpec, arch: int) -> Resources:
    """Compile `spec` for compute capability `arch` (80, 90, ...) and report its resources."""
    compiled, config = _compile(spec, arch)
    report = _ptxas_report(compiled, arch, config)
    entry = compiled.name
    return Resources(
        name=spec.name,
        arch=sm_arch(arch),
        num_warps=spec.num_warps,
        registers=_field(report, rf"Compiling entry function '{entry}'.*?Used (\d+) registers", config),
        spill_stores=sum(map(int, re.findall(r"(\d+) bytes spill stores", report))),
        spill_loads=sum(map(int, re.findall(r"(\d+) bytes spill loads", report))),
        stack_bytes=_field(report, rf"Function properties for {entry}\s+(\d+) bytes stack frame", config),
        shared_bytes=compiled.metadata.shared,
    )


# Integer argument values: one the launcher leaves unspecialised, one a multiple of 16. Both are small, as
# sizes and strides are in practice, so the launcher types them i32 even where a spec declares i64 (that
# declared type is what compile_spec(spec) compiles).
_PLAIN, _DIVISIBLE = 3, 16
_TORCH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64,
                "i64": torch.int64, "i32": torch.int32, "i16": torch.int16, "i8": torch.int8, "u8": torch.uint8}


@dataclass
class _Tensor:
    """What Triton's launcher reads of a tensor argument to specialise on it."""
    dtype: torch.dtype
    address: int

    def data_ptr(self) -> int:
        return self.address


def integer_arguments(spec: KernelSpec) -> list[str]:
    """The arguments of `spec` that a launch passes as Python ints."""
    return [name for name, ty in spec.signature.items() if ty in ("i32", "i64")]


def launched(spec: KernelSpec, arch: int, one: str | None = None, divisible: bool | Collection[str] = False) \
        -> KernelSpec:
    """`spec` as a launch on compute capability `arch` compiles it: every pointer 16-byte aligned (as torch
    allocates), the integer argument `one` equal to 1, every other integer a small one that is a multiple
    of 16 if `divisible` is True or names it, else neither 1 nor a multiple of 16.

    Triton's own launcher code (the binder it builds per kernel, and its packing of the binder's result
    into signature, constexprs and attributes) does the specialising, so nothing here restates its rules.
    Those are Triton internals (checked on 3.8), imported here so that the rest of this module does not
    depend on them.
    """
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = jit_function(spec.kernel)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    bind = create_function_from_signature(fn.signature, fn.params, backend)
    integers = set(integer_arguments(spec))
    args = {}
    for name in fn.arg_names:
        ty = spec.signature.get(name, "constexpr")
        if ty == "constexpr":
            args[name] = spec.constexprs[name]
        elif ty.startswith("*"):
            args[name] = _Tensor(_TORCH_DTYPE[ty[1:]], address=1 << 20)  # 16-byte aligned
        elif name in integers:
            args[name] = 1 if name == one else _DIVISIBLE if divisible is True or (divisible and name in divisible) \
                else _PLAIN
        else:
            args[name] = 0.5  # a float: the launcher never specialises on its value
    bound, specialization, options = bind(**args)
    _, signature, constexprs, attrs = fn._pack_args(backend, {}, bound, specialization, options)
    wide = ["divisible" if divisible is True else "divisible=" + "+".join(divisible)] if divisible else []
    label = ",".join(([f"{one}=1"] if one else []) + wide + ["aligned"])
    return replace(spec, name=f"{spec.name}[{label}]", signature=signature,
                   constexprs={fn.arg_names[path[0]]: value for path, value in constexprs.items()},
                   attrs={fn.arg_names[path[0]]: value for path, value in attrs.items() if value})


def _options(spec: KernelSpec) -> dict:
    return {"num_warps": spec.num_warps, "num_stages": spec.num_stages,
            **({"maxnreg": spec.maxnreg} if spec.maxnreg else {})}


_LAYOUT = re.compile(r"^(#[\w.]+) = (.*)$", re.M)
_REDUCE = re.compile(r'"tt\.reduce"\(.*?\) <\{axis = (\d+) : i32\}> \((.*?)\) : \((tensor<[^)]*>)\)', re.S)
_FLOAT_TYPES = ("xf16,", "xbf16,", "xf32,", "xf64,")


def reduction_orders(spec: KernelSpec, arch: int) -> list[tuple]:
    """What fixes the order in which the GPU adds (or multiplies) the floats of every reduction in `spec`
    (tl.sum and friends), read from the TTGIR Triton builds for `arch`: per such `tt.reduce`, its axis, and
    the operand's extent, elements per thread, threads per warp and warps along that axis (a blocked layout,
    or a slice of one), sorted; an operand in any other layout contributes its layout text whole.

    A reduction adds each thread's elements in order, then across the lanes and then the warps along the
    axis, so two configurations of a kernel with equal lists sum every float in the same order and give the
    same bits; the interpreter (numpy sums) cannot show this. Max/min and integer reductions are exact in
    any order and are left out.
    """
    ttgir = _compile(spec, arch)[0].asm["ttgir"]
    layouts = dict(_LAYOUT.findall(ttgir))
    orders = []
    for axis, body, operands in _REDUCE.findall(ttgir):
        if not any(t in operands for t in _FLOAT_TYPES) or not re.search(r"arith\.(addf|mulf)", body):
            continue
        axis = int(axis)
        for operand in re.findall(r"tensor<([^,>]*), (#[\w.]+(?:<[^>]*>)?)>", operands):
            orders.append((axis, *_axis_layout(*operand, axis, layouts)))
    return sorted(orders, key=repr)


def _axis_layout(shape: str, layout: str, axis: int, layouts: dict) -> tuple:
    """(extent, elements per thread, threads per warp, warps) of a tensor<shape x type, layout> along axis."""
    extent = int(shape.split("x")[axis])
    slice_dim = re.match(r"#ttg\.slice<\{dim = (\d+), parent = (#[\w.]+)\}>", layout)
    if slice_dim:  # the parent's parameters with the sliced dim removed
        dim, layout = int(slice_dim.group(1)), slice_dim.group(2)
        axis += axis >= dim
    text = layouts.get(layout, layout)
    blocked = re.fullmatch(r"#ttg\.blocked<\{sizePerThread = \[([\d, ]+)\], threadsPerWarp = \[([\d, ]+)\], "
                           r"warpsPerCTA = \[([\d, ]+)\], order = \[[\d, ]+\]\}>", text)
    if not blocked:
        return extent, text
    return (extent, *(int(group.split(", ")[axis]) for group in blocked.groups()))


def _field(report: str, pattern: str, config: str) -> int:
    match = re.search(pattern, report, re.DOTALL)
    if match is None:
        raise AotCompileError(f"{config}: no match for {pattern!r} in the ptxas report:\n{report}")
    return int(match.group(1))


def _report_file(compiled) -> tuple:
    return get_cache_manager(compiled.hash), f"{compiled.name[:150]}.ptxas-v.txt"


def _store_report(compiled, report: str) -> None:
    cache, filename = _report_file(compiled)
    cache.put(report, filename, binary=False)


def _ptxas_report(compiled, arch: int, config: str) -> str:
    """`ptxas -v` output for the compiled PTX, computed once per Triton cache entry: the report Triton's cubin
    step printed on a cold compile (the same ptxas and flags as below), else a run of its ptxas here."""
    cache, filename = _report_file(compiled)
    cached = cache.get_file(filename)
    if cached is not None:
        with open(cached) as f:
            return f.read()
    ptxas = get_ptxas(arch).path  # Triton's bundled ptxas for the arch, unless TRITON_PTXAS_PATH overrides it
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = f"{tmp}/kernel.ptx"
        with open(ptx_path, "w") as f:
            f.write(compiled.asm["ptx"])
        # The flags Triton's own cubin step passes, so the numbers describe the cubin it builds.
        fmad = [] if compiled.metadata.enable_fp_fusion else ["--fmad=false"]
        cmd = [ptxas, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch(arch)}", ptx_path,
               "-o", f"{tmp}/kernel.cubin"]
        run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise AotCompileError(f"{config}: ptxas failed ({run.returncode}):\n{run.stderr}")
    report = run.stdout + run.stderr
    _store_report(compiled, report)
    return report


# -- rebuilding JITFunctions from interpreter wrappers --------------------------------------------
_rebuilt: dict[object, object] = {}


def jit_function(kernel) -> JITFunction:
    """The JITFunction to compile for `kernel`: a JITFunction, an interpreter wrapper, or an
    autotune/heuristics wrapper around either."""
    while not isinstance(kernel, (JITFunction, InterpretedFunction)) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    if isinstance(kernel, JITFunction):
        return kernel
    if isinstance(kernel, InterpretedFunction):
        return _compilable(kernel)
    raise TypeError(f"not a Triton kernel: {kernel!r}")


def _compilable(value):
    """`value` with every interpreter wrapper it reaches replaced by a JITFunction, memoised."""
    if isinstance(value, InterpretedFunction):
        if value not in _rebuilt:
            _rebuilt[value] = _rebuild(value)
        return _rebuilt[value]
    if isinstance(value, types.ModuleType) and any(isinstance(v, InterpretedFunction) for v in vars(value).values()):
        # Kernels may call helpers as `module.helper(...)`: give them a module whose helpers compile.
        if value not in _rebuilt:
            proxy = types.ModuleType(value.__name__)
            _rebuilt[value] = proxy
            vars(proxy).update({k: _compilable(v) if isinstance(v, InterpretedFunction) else v
                                for k, v in vars(value).items()})
        return _rebuilt[value]
    return value


def _rebuild(wrapper: InterpretedFunction) -> JITFunction:
    """A JITFunction over a copy of the wrapped function whose globals and closure cells see
    JITFunctions where the original sees interpreter wrappers."""
    fn = wrapper.fn
    scope: dict = {}
    cells = tuple(types.CellType() for _ in fn.__closure__ or ())
    clone = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, cells or None)
    for attr in ("__kwdefaults__", "__annotations__", "__qualname__", "__module__", "__doc__"):
        setattr(clone, attr, getattr(fn, attr))
    jit = JITFunction(clone, **wrapper.kwargs)
    _rebuilt[wrapper] = jit  # before filling the scope, so recursive references resolve to it
    scope.update({k: _compilable(v) for k, v in fn.__globals__.items()})
    for cell, original in zip(cells, fn.__closure__ or ()):
        cell.cell_contents = _compilable(original.cell_contents)
    return jit
