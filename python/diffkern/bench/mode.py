"""The harness's three runs: how many samples each takes and where its traffic figures come from.

  quick    the workloads' small smoke shapes, everything counted (the test suite's run)
  default  the headline shapes (`make bench`): CPU timings of the headline cases (`Workload.timed_in`)
           with fewer samples; each case's traffic counted in the interpreter where that is quick
           (`Workload.counted_in`), else from the workload's tested model, else left to the full run;
           no CUDA C++ harness counts (minutes per case); the report modules in their light form
  full     the headline shapes, every case timed and every case the interpreter can take counted whole,
           more samples (`make bench FULL=1`)
"""
from __future__ import annotations

from dataclasses import dataclass

from .workload import EVERY_RUN, FULL_RUN, Case, Workload


@dataclass(frozen=True)
class Mode:
    """One kind of run. `rounds` timed samples per candidate after `warmup` untimed calls, each sample
    lasting at least `min_sample_s`; `time_all`: every case is timed (else the headline cases only);
    `count_all`: the cases counted in the full run are counted too; `count_cuda`: the CUDA C++ kernels are
    counted in the host harness too."""
    name: str
    quick: bool
    rounds: int
    warmup: int
    min_sample_s: float
    time_all: bool
    count_all: bool
    count_cuda: bool

    def timed_cases(self, workload: Workload) -> tuple[Case, ...]:
        """The cases this run times on the CPU: all, or the headline ones."""
        return tuple(c for c in workload.cases(self.quick) if self.time_all or workload.timed_in(c) == EVERY_RUN)

    def counts(self, workload: Workload, case: Case) -> bool:
        """Whether this run counts `case` in the interpreter (if not: the workload's model, or no figures)."""
        runs = workload.counted_in(case)
        return runs == EVERY_RUN or (runs == FULL_RUN and self.count_all)


MODES = {m.name: m for m in (
    Mode("quick", quick=True, rounds=3, warmup=1, min_sample_s=0.002, time_all=True, count_all=True, count_cuda=True),
    Mode("default", quick=False, rounds=3, warmup=1, min_sample_s=0.02, time_all=False, count_all=False,
         count_cuda=False),
    Mode("full", quick=False, rounds=7, warmup=2, min_sample_s=0.05, time_all=True, count_all=True, count_cuda=True),
)}
