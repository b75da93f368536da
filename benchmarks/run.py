"""diffkern's benchmark: `python benchmarks/run.py --out results [--quick]` (what `make bench` runs).

For every registered workload (diffkern.bench.workload) and its shapes, in one run:
  1. CPU time: eager reference, torch.compile of it, diffkern's C++ kernel; forward and forward+backward;
  2. modeled GPU memory traffic (bf16): diffkern's Triton kernels counted in the interpreter (child
     processes), against the minimum and the eager reference's aten ops;
  3. compiled resources of the Triton launch configurations and CUDA C++ kernels for sm_90a;
  4. real GPU time where CUDA is available;
and whether each of the op's bars is met; then the sections that do not fit the one-op workload model
(`REPORT_MODULES`: whole-network memory and timing, forward-only ops, ops without a Triton backward).
Writes bench.json, bench.md and bench.png to --out (and each extra section's own files) and prints the
Markdown.
"""
from __future__ import annotations

import os
import sys

# This process times real kernels: no interpreter (the traffic child sets it for itself) and no NaN fill.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.pop("DIFFKERN_DEBUG_FILL", None)

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import importlib  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

from diffkern.bench import bars, chart, cpu, gpu, interpreted, report, resources, traffic  # noqa: E402
from diffkern.bench.report import section  # noqa: E402
from diffkern.bench.workload import REPORT_MODULES, registered  # noqa: E402

CPU_DTYPE, GPU_DTYPE = torch.float32, torch.bfloat16
CPU_NOTE = ("Median of {rounds} samples per candidate, taken round-robin. diffkern = the C++ kernel "
            "(backend 'cpu'); fwd under no_grad, fwd+bwd = forward + torch.autograd.grad of every input. "
            "Compile time = the compiled function's first call, with Inductor's on-disk caches as found "
            "(a warm cache shortens it); it is not in the compiled run time. Max abs err: diffkern's forward "
            "against the eager reference.")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _traffic_note(entries: list[dict]) -> str:
    counted = ", ".join(f"{e['case']} {e['interpreter_seconds']:.0f} s" for e in entries
                        if "error" not in e and "modeled" not in e)
    modeled = "".join(f" {e['case']} is modeled, not counted (rows marked (modeled)): {e['modeled']}"
                      for e in entries if "modeled" in e)
    return ("diffkern bytes = the Triton kernels' active-lane loads and stores (TritonMonitor; a lane that "
            "re-reads an address counts again, caches are not modelled) plus the aten ops the op runs around "
            "them; eager = every aten op's distinct input and output bytes (meta tensors, full shape). "
            f"Cases counted whole in the Triton interpreter: {counted or 'none'}.{modeled}"
            " CUDA C++ = the cuda backend's kernels run in the host-execution harness, counting each launch's "
            "distinct global bytes (a broadcast or re-read counts once), plus the same aten glue; glue inside "
            "the C++ op (the routing kernels' source tables and 16-bit gain cast) is not seen."
            + "".join(f" CUDA C++ not counted for {e['case']}: {e['cuda_skipped']}." for e in entries
                      if "cuda_skipped" in e))


def _timed(seconds: dict, key: str, fn, *args):
    start = time.perf_counter()
    try:
        return fn(*args)
    finally:
        seconds[key] = round(time.perf_counter() - start, 1)


def _resources(workloads, quick: bool, arch: int) -> dict:
    out = {}
    for w in workloads:
        try:
            out[w.name] = section(resources.rows(w, quick, GPU_DTYPE, arch, log))
        except Exception as error:  # noqa: BLE001 - the report shows why the section is missing
            out[w.name] = section(status="error", note=repr(error))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="diffkern benchmark harness")
    parser.add_argument("--out", default="results", help="folder for bench.json, bench.md, bench.png")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats: a smoke run")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (fixed)")
    parser.add_argument("--rounds", type=int, help="timed samples per candidate (default 7, quick 3)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability for the resource report")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 7)
    warmup, min_sample_s = (1, 0.002) if args.quick else (2, 0.05)
    workloads = registered()
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    # The interpreter children and the AOT compiles run side by side; the timings run after both, alone.
    log(f"[traffic] counting diffkern's Triton traffic in the interpreter ({os.cpu_count()} children at a time)")
    counting = interpreted.start(args.quick, str(GPU_DTYPE).removeprefix("torch."), os.cpu_count())
    res = _timed(seconds, "resources", _resources, workloads, args.quick, args.arch)
    counted = _timed(seconds, "traffic (after resources)", interpreted.collect, counting)

    results = {"meta": {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick, "cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "triton": triton.__version__,
        "gpu": gpu.device_name() if gpu.available() else None,
        "cpu_dtype": str(CPU_DTYPE).removeprefix("torch."), "traffic_dtype": str(GPU_DTYPE).removeprefix("torch."),
        "h100_bytes_per_s": traffic.H100_BYTES_PER_S, "resources_arch": f"sm_{args.arch}{'a' if args.arch >= 90 else ''}",
        "timing": {"rounds": rounds, "warmup": warmup, "min_sample_s": min_sample_s},
        "seconds": seconds}, "workloads": {}}
    for w in workloads:
        entries = counted[w.name]
        traffic_sec = section(traffic.rows(w, args.quick, entries, GPU_DTYPE), note=_traffic_note(entries))
        cpu_sec = section(_timed(seconds, f"cpu {w.name}", cpu.rows, w, args.quick, CPU_DTYPE, warmup, rounds,
                                 min_sample_s, log), note=CPU_NOTE.format(rounds=rounds))
        if gpu.available():
            gpu_sec = section(_timed(seconds, f"gpu {w.name}", gpu.rows, w, args.quick, GPU_DTYPE,
                                     traffic_sec["rows"], log))
        else:
            gpu_sec = section(status="skipped", note="no CUDA device on this machine (torch.cuda.is_available() is "
                                                     "False); the traffic section models the GPU instead.")
        sections = {"cpu": cpu_sec["rows"], "traffic": traffic_sec["rows"]}
        results["workloads"][w.name] = {
            "title": w.title, "cases": [{"name": c.name, "params": c.params, "tokens": c.tokens}
                                        for c in w.cases(args.quick)],
            "bars": bars.evaluate(w, args.quick, sections), "cpu": cpu_sec, "traffic": traffic_sec,
            "resources": res[w.name], "gpu": gpu_sec}
    extra = []
    for name in REPORT_MODULES:
        log(f"[{name}] report")
        module = importlib.import_module(f"diffkern.bench.{name}")
        try:
            extra.append(_timed(seconds, name, module.report, args.quick, args.out))
        except Exception as error:  # noqa: BLE001 - the report says which section failed and why
            extra.append(f"## {name}\n\nerror: {error!r}\n")
    seconds["total"] = round(time.perf_counter() - start, 1)

    md = "\n".join([report.markdown(results), *extra])
    report.write_json(results, os.path.join(args.out, "bench.json"))
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(md + "\n")
    chart.plot(results, os.path.join(args.out, "bench.png"))
    print(md)
    log(f"wrote {args.out}/bench.json, bench.md, bench.png in {seconds['total']:.0f} s")
    return results


if __name__ == "__main__":
    main()
