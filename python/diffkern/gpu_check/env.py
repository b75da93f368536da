"""Section 1: the environment, and the local peaks every later ratio is taken against.

Rows (all "info"): the device (name, compute capability, SMs, L2, memory), the versions (Python, torch,
its CUDA, Triton, the driver), diffkern's build_info, and on a GPU two measured peaks, stored in
ctx.peaks: the device-to-device copy bandwidth (a 1 GiB tensor copied into another, GB/s counting the
read and the write, median of CUDA-event timings) and the bf16 matmul throughput (8192^3, TFLOP/s,
median). In the dry run the peaks are None ("skip: no CUDA").
"""
from __future__ import annotations

import platform
import statistics

import torch

from .. import build_info
from .context import Context, Row

SECTION = "env"
COPY_BYTES = 1 << 30
MATMUL_N = 8192
WARMUP, REPS = 3, 10


def median_ms(fn, reps: int = REPS, warmup: int = WARMUP) -> float:
    """Median milliseconds of fn() on the current stream, each call timed by its own CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_gbps(device: torch.device) -> float:
    """Device copy bandwidth: 2 * COPY_BYTES (read + write) per copy_ of a 1 GiB tensor, in GB/s."""
    src = torch.empty(COPY_BYTES // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * COPY_BYTES / (ms * 1e-3) / 1e9


def bf16_tflops(device: torch.device) -> float:
    """bf16 matmul throughput at MATMUL_N^3: 2 N^3 FLOPs per call, in TFLOP/s."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(MATMUL_N, MATMUL_N, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(MATMUL_N, MATMUL_N, device=device, dtype=torch.bfloat16, generator=g)
    ms = median_ms(lambda: a @ b)
    return 2 * MATMUL_N ** 3 / (ms * 1e-3) / 1e12


def _triton_version() -> str:
    try:
        import triton
    except Exception as err:  # noqa: BLE001 - a broken install raises more than ImportError
        return f"not importable ({type(err).__name__})"
    return triton.__version__


def _driver_version() -> int | None:
    get = getattr(torch._C, "_cuda_getDriverVersion", None)
    return get() if get is not None and torch.cuda.is_available() else None


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "triton": _triton_version(), "cuda_driver": _driver_version()}


def device_info(device: torch.device) -> dict:
    p = torch.cuda.get_device_properties(device)
    return {"name": p.name, "capability": f"sm_{p.major}{p.minor}", "sms": p.multi_processor_count,
            "l2_bytes": getattr(p, "L2_cache_size", None), "memory_bytes": p.total_memory,
            "devices": torch.cuda.device_count()}


def _line(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


def run(ctx: Context) -> list[Row]:
    info = build_info()
    v = versions()
    rows = [Row(SECTION, "versions", "info", _line(v), v),
            Row(SECTION, "build_info", "info", _line({k: info[k] for k in ("torch", "with_cuda", "cuda_archs", "nvcc")
                                                      if k in info}), dict(info))]
    if ctx.device.type != "cuda":
        ctx.peaks.update(copy_gbps=None, bf16_tflops=None)
        return rows + [Row(SECTION, "device", "info", f"{ctx.device} (CPU dry run)", {"name": "cpu"}),
                       Row(SECTION, "copy bandwidth", "skip", "no CUDA"),
                       Row(SECTION, "bf16 matmul", "skip", "no CUDA")]
    d = device_info(ctx.device)
    rows.append(Row(SECTION, "device", "info", _line(d), d))
    ctx.peaks["copy_gbps"] = copy_gbps(ctx.device)
    rows.append(Row(SECTION, "copy bandwidth", "info", f"{ctx.peaks['copy_gbps']:.0f} GB/s (1 GiB device copy, "
                    "read + write, median)", {"copy_gbps": ctx.peaks["copy_gbps"]}))
    ctx.peaks["bf16_tflops"] = bf16_tflops(ctx.device)
    rows.append(Row(SECTION, "bf16 matmul", "info", f"{ctx.peaks['bf16_tflops']:.0f} TFLOP/s ({MATMUL_N}^3, median)",
                    {"bf16_tflops": ctx.peaks["bf16_tflops"]}))
    torch.cuda.empty_cache()
    return rows
