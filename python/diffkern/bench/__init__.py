"""The benchmark harness behind `make bench` (entry point: benchmarks/run.py).

  workload.py      what the harness needs to know about one op (shapes, inputs, calls, bars); registry
  mode.py          the quick, default and full runs: what each times and counts
  progress.py      the stamped progress lines on stderr
  dar.py           DAR routing, described as a workload
  grpo.py          the Flow-GRPO one-step loss, described as a workload
  timer.py         interleaved median wall-clock timing
  cpu.py           CPU time: eager reference, torch.compile, diffkern's C++ kernel
  aten_traffic.py  bytes and kernels of plain PyTorch code, one kernel per aten op
  interpreted.py   diffkern's Triton traffic, counted in the interpreter in a child process
  *_model.py       traffic models tested equal to those counts (dar_route, grpo, ntrk), for the default run;
                   dar_model.py is the DiT-S/2 step timing (a report module, like dar_memory, rmdm, sinks)
  overhead.py      per-call overhead of the public ops with and without grad vs a trivial custom op (a report module)
  machine.py       this machine's limits: STREAM-like bandwidth at a working set, GEMM throughput at given shapes
  cpu_gap.py       issue 19's table: the CPU rows against eager and torch.compile at 2 and 1 threads, judged on
                   their bars or the machine's limit (a report module)
  traffic.py       modeled GPU traffic rows: minimum vs diffkern vs eager, modeled H100 time
  roofline.py      each call's FLOPs and minimal bytes, the H100 roofline time; the peaks per dot precision
  kernel_roofline.py  every kernel's launches, bytes, FLOPs and predicted H100 time, from the same counts
  resources.py     registers/spills/shared memory of the Triton configs and CUDA kernels, compiled for sm_90a
  gpu.py           real GPU time with triton.testing.do_bench, where CUDA exists
  bars.py          whether each of an op's bars is met by this run's numbers
  report.py        JSON and Markdown; chart.py the PNG
"""
