"""Independent demo jobs (one per seed and model) spread over worker processes."""
from __future__ import annotations

import concurrent.futures
import multiprocessing
from typing import Callable, Sequence


def run_jobs(fn: Callable, jobs: Sequence[tuple], workers: int, done: Callable | None = None) -> list:
    """[fn(*job) for job in jobs], on `workers` spawned processes (in this process when workers == 1).

    Processes are spawned, not forked: forking a process whose ATen/OpenMP thread pools already ran can hang.
    fn and every job must pickle. done(result), if given, is called in this process as each job finishes (in
    completion order); the returned list is in the jobs' order.
    """
    if workers < 1:
        raise ValueError(f"run_jobs: workers must be >= 1, got {workers}")
    if workers == 1:
        results = []
        for job in jobs:
            results.append(fn(*job))
            if done is not None:
                done(results[-1])
        return results
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        for f in concurrent.futures.as_completed(futures):
            if done is not None:
                done(f.result())
        return [f.result() for f in futures]
