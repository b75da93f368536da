"""R-MDM demo (issue 18): a (K x L) recursive masked diffusion model against its (K*L x 1) iso-FLOP and
(K x 1) iso-parameter baselines on hard Sudoku (25 clues, unique solutions) and on Countdown-4, over seeds.

    python -m diffkern.demos.rmdm --out DIR [--smoke] [--workers 2] [--backend cpu|reference]

The paper's comparison (specs/rmdm.md): at equal training steps the recursive and iso-FLOP models do
the same block evaluations per step; the iso-parameter model has the recursive model's weights but one
iteration. Each (task, model, seed) is trained for a fixed number of steps (the configuration FULL, fixed
before the full run and pre-registered in the issue's notes) and scored on held-out problems with
top-k unmasking: against T (denoising steps) at L_s = L_t, and against L_s (inference recursion depth)
at T = t_fixed for the two K-block models. Across seeds: mean and Student-t 95% interval
(diffkern.demos.seeds), and for the paper's claims the interval of the per-seed paired differences.
Writes DIR/rmdm.md (tables), DIR/rmdm.json (config, per-seed runs, summaries) and DIR/rmdm.png.
Jobs run in `--workers` processes of one thread each. Numbers are whatever this run measures.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from dataclasses import asdict, dataclass, replace

import torch

from . import rmdm_report
from .jobs import run_jobs
from .rmdm_train import countdown_data, run_job, sudoku_data


@dataclass(frozen=True)
class Config:
    """Everything a run depends on (model sizes, data, optimiser, seeds, evaluation grids)."""
    d: int = 64
    heads: int = 4
    K: int = 2
    L: int = 4
    clues: int = 25
    n_train: int = 20_000
    n_test: int = 200
    steps: dict = None  # per task
    batch: int = 32
    lr: float = 2e-3
    t_min: float = 0.1
    seeds: tuple = (0, 1, 2)
    t_grid: tuple = (1, 2, 5, 10, 20)
    ls_grid: tuple = (1, 2, 4, 8, 16)
    t_fixed: int = 5

    def models(self) -> dict:
        """name -> (K, L): the recursive model and its two baselines."""
        return {"recursive": (self.K, self.L), "iso-FLOP": (self.K * self.L, 1), "iso-param": (self.K, 1)}


FULL = Config(steps={"sudoku": 800, "countdown": 500})
SMOKE = replace(FULL, d=32, heads=2, n_train=256, n_test=16, steps={"sudoku": 4, "countdown": 4}, seeds=(0, 1),
                t_grid=(1, 5), ls_grid=(1, 4, 8))


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children (the job workers)."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def run(cfg: Config, out: str, workers: int, backend: str) -> dict:
    """Generate the data, run every (task, model, seed) job, write the report; returns the JSON written."""
    os.makedirs(out, exist_ok=True)
    start, cpu = time.time(), _cpu_seconds()
    tasks = {"sudoku": sudoku_data(cfg.n_train, cfg.n_test, cfg.clues), "countdown": countdown_data(cfg.n_train,
                                                                                                     cfg.n_test)}
    print(f"generated {cfg.n_train:,} + {cfg.n_test} problems per task ({cfg.clues}-clue Sudoku, Countdown-4) "
          f"in {time.time() - start:.1f} s", flush=True)
    # longest jobs first so the pool's tail is short
    jobs = [(tasks[t], name, K, L, seed, cfg, backend) for t in tasks for name, (K, L) in cfg.models().items()
            for seed in cfg.seeds]
    jobs.sort(key=lambda j: -cfg.steps[j[0].name] * j[0].seq_len * j[2] * j[3])
    runs = run_jobs(run_job, jobs, workers)
    timing = {"wall_s": time.time() - start, "workers": workers, "cpu_s": _cpu_seconds() - cpu}
    result = {"config": asdict(cfg), "timing": timing, "runs": runs, "summary": rmdm_report.summarize(runs, cfg)}
    with open(os.path.join(out, "rmdm.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = rmdm_report.markdown(result, cfg)
    with open(os.path.join(out, "rmdm.md"), "w") as f:
        f.write(text)
    rmdm_report.plot(result, cfg, os.path.join(out, "rmdm.png"))
    print(text, flush=True)
    print(f"wrote {out}/rmdm.md, rmdm.json, rmdm.png", flush=True)
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny models, data and step counts (CI: outputs' structure)")
    ap.add_argument("--workers", type=int, default=2, help="processes running jobs, one thread each (1: in-process)")
    ap.add_argument("--backend", default="cpu", choices=("cpu", "reference"),
                    help="diffkern backend of the recursion op (cpu: the C++ kernels)")
    args = ap.parse_args(argv)
    if args.workers < 1:
        raise ValueError(f"rmdm demo: --workers must be >= 1, got {args.workers}")
    torch.set_num_threads(max(1, args.workers))  # data generation runs in parallel over puzzles
    return run(SMOKE if args.smoke else FULL, args.out, args.workers, args.backend)


if __name__ == "__main__":
    main()
