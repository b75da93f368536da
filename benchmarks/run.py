"""diffkern's benchmark: `python benchmarks/run.py --out results [--quick | --full]` (what `make bench` runs;
`make bench FULL=1` adds --full). The three runs are described in diffkern.bench.mode.

For every registered workload (diffkern.bench.workload) and its shapes, in one run:
  1. CPU time: eager reference, torch.compile of it, diffkern's C++ kernel; forward and forward+backward;
  2. modeled GPU memory traffic (bf16): diffkern's Triton kernels counted in the interpreter (child
     processes) or taken from the workload's tested model (each row says which), against the minimum and
     the eager reference's aten ops; and from the same counts, every kernel's launches, bytes, FLOPs and
     roofline-predicted H100 time, with the op's total beside its op-level minimum (kernel_roofline);
  3. compiled resources of the Triton launch configurations and CUDA C++ kernels for sm_90a;
  4. real GPU time where CUDA is available;
and whether each of the op's bars is met; then the sections that do not fit the one-op workload model
(`REPORT_MODULES`: whole-network memory and timing, forward-only ops, ops without a Triton backward).
Writes bench.json, bench.md and bench.png to --out (and each extra section's own files) and prints the
Markdown. A line on stderr, stamped with the seconds elapsed, marks every step as it starts or ends.
"""
from __future__ import annotations

import os

# This process times real kernels: no interpreter (the traffic child sets it for itself) and no NaN fill.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.pop("DIFFKERN_DEBUG_FILL", None)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

from diffkern import _autotune  # noqa: E402
from diffkern.bench import bars, chart, cpu, gpu, interpreted, kernel_roofline, report, resources, traffic  # noqa: E402
from diffkern.bench.mode import MODES  # noqa: E402
from diffkern.bench.progress import Progress  # noqa: E402
from diffkern.bench.report import section  # noqa: E402
from diffkern.bench.roofline import H100_DOT_FLOPS, H100_HBM_BYTES_PER_S  # noqa: E402
from diffkern.bench.workload import REPORT_MODULES, registered  # noqa: E402

CPU_DTYPE, GPU_DTYPE = torch.float32, torch.bfloat16
CPU_NOTE = ("Median of {rounds} samples per candidate, taken round-robin. diffkern = the C++ kernel "
            "(backend 'cpu'); fwd under no_grad, fwd+bwd = forward + torch.autograd.grad of every input. "
            "Compile time = the compiled function's first call, with Inductor's on-disk caches as found "
            "(a warm cache shortens it); it is not in the compiled run time. Max abs err: diffkern's forward "
            "against the eager reference.")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _cpu_s(t: os.times_result) -> float:
    """CPU seconds so far of this process and of the child processes it has waited for (interpreter counts,
    sinks points): on a shared machine the figure that says what a step costs, where wall time says how long
    it took."""
    return t.user + t.system + t.children_user + t.children_system


def _timed(seconds: dict, key: str, fn, *args):
    """fn(*args), recording its wall and CPU seconds under `key` in seconds["wall"] and seconds["cpu"]."""
    start, start_cpu = time.perf_counter(), _cpu_s(os.times())
    try:
        return fn(*args)
    finally:
        seconds["wall"][key] = round(time.perf_counter() - start, 1)
        seconds["cpu"][key] = round(_cpu_s(os.times()) - start_cpu, 1)


def _resources(workloads, quick: bool, arch: int, log) -> dict:
    out = {}
    for w in workloads:
        try:
            out[w.name] = section(resources.rows(w, quick, GPU_DTYPE, arch, log))
        except Exception as error:  # noqa: BLE001 - the report shows why the section is missing
            out[w.name] = section(status="error", note=repr(error))
    return out


def _untimed(workload, mode) -> str:
    """The CPU note's last sentence: the cases this run does not time, if any."""
    left = [c.name for c in workload.cases(mode.quick) if c not in mode.timed_cases(workload)]
    return f" Timed in the full run only (make bench FULL=1): {'; '.join(left)}." if left else ""


def _args(argv):
    parser = argparse.ArgumentParser(description="diffkern benchmark harness")
    parser.add_argument("--out", default="results", help="folder for bench.json, bench.md, bench.png")
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--quick", action="store_true", help="small shapes, few repeats: a smoke run")
    runs.add_argument("--full", action="store_true", help="every case counted in the interpreter, more repeats "
                                                         "(make bench FULL=1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (fixed)")
    parser.add_argument("--rounds", type=int, help="timed samples per candidate (default: the mode's)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability for the resource report")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = _args(argv)
    mode = MODES["quick" if args.quick else "full" if args.full else "default"]
    if args.rounds:
        mode = dataclasses.replace(mode, rounds=args.rounds)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    log = Progress()
    workloads = registered()
    seconds: dict[str, dict[str, float]] = {"wall": {}, "cpu": {}}

    # The interpreter children and the AOT compiles run side by side; the timings run after both, alone.
    log(f"{mode.name} run: counting diffkern's Triton traffic in the interpreter ({os.cpu_count()} children at a "
        "time) while the Triton configurations compile")
    counting = interpreted.start(mode, str(GPU_DTYPE).removeprefix("torch."), os.cpu_count(), log)
    res = _timed(seconds, "resources", _resources, workloads, mode.quick, args.arch, log)
    log("resources compiled; waiting for the traffic counts")
    counted = _timed(seconds, "traffic (after resources)", interpreted.collect, counting)

    results = {"meta": {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": mode.name, "quick": mode.quick, "cpu": _cpu_model(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "triton": triton.__version__,
        "gpu": gpu.device_name() if gpu.available() else None,
        "cpu_dtype": str(CPU_DTYPE).removeprefix("torch."), "traffic_dtype": str(GPU_DTYPE).removeprefix("torch."),
        "h100_hbm_bytes_per_s": H100_HBM_BYTES_PER_S,
        "h100_dot_flops": H100_DOT_FLOPS, "resources_arch": f"sm_{args.arch}{'a' if args.arch >= 90 else ''}",
        "timing": {"rounds": mode.rounds, "warmup": mode.warmup, "min_sample_s": mode.min_sample_s},
        "seconds": seconds}, "workloads": {}}
    for i, w in enumerate(workloads, 1):
        log(f"{w.name}: workload {i}/{len(workloads)}")
        entries = counted[w.name]
        traffic_sec = section(traffic.rows(w, mode.quick, entries, GPU_DTYPE), note=traffic.note(entries))
        roofline_sec = section(kernel_roofline.rows(w, mode.quick, entries, GPU_DTYPE), note=kernel_roofline.NOTE)
        timed = mode.timed_cases(w)
        cpu_sec = section(_timed(seconds, f"cpu {w.name}", cpu.rows, w, timed, CPU_DTYPE, mode.warmup, mode.rounds,
                                 mode.min_sample_s, log), note=CPU_NOTE.format(rounds=mode.rounds) + _untimed(w, mode))
        if gpu.available():
            gpu_sec = section(_timed(seconds, f"gpu {w.name}", gpu.rows, w, mode.quick, GPU_DTYPE,
                                     traffic_sec["rows"], log))
        else:
            gpu_sec = section(status="skipped", note="no CUDA device on this machine (torch.cuda.is_available() is "
                                                     "False); the traffic section models the GPU instead.")
        sections = {"cpu": cpu_sec["rows"], "traffic": traffic_sec["rows"]}
        results["workloads"][w.name] = {
            "title": w.title, "cases": [{"name": c.name, "params": c.params, "tokens": c.tokens}
                                        for c in w.cases(mode.quick)],
            "bars": bars.evaluate(w, mode.quick, sections), "cpu": cpu_sec, "traffic": traffic_sec,
            "roofline": roofline_sec, "resources": res[w.name], "gpu": gpu_sec}
    extra = []
    for name in REPORT_MODULES:
        log(f"{name}: report")
        module = importlib.import_module(f"diffkern.bench.{name}")
        try:
            extra.append(_timed(seconds, name, lambda: module.report(mode.quick, args.out, mode=mode)))
        except Exception as error:  # noqa: BLE001 - the report says which section failed and why
            extra.append(f"## {name}\n\nerror: {error!r}\n")
    if gpu.available():  # the launch configurations the GPU timings ran with (diffkern._autotune)
        results["autotune"] = _autotune.chosen()
        extra.append("\n".join(["## Autotuning", "", *(f"- {line}" for line in _autotune.summary(results["autotune"])),
                                 ""]))
    seconds["wall"]["total"], seconds["cpu"]["total"] = round(log.elapsed(), 1), round(_cpu_s(os.times()), 1)

    md = "\n".join([report.markdown(results), *extra])
    report.write_json(results, os.path.join(args.out, "bench.json"))
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(md + "\n")
    chart.plot(results, os.path.join(args.out, "bench.png"))
    print(md)
    log(f"wrote {args.out}/bench.json, bench.md, bench.png")
    return results


if __name__ == "__main__":
    main()
