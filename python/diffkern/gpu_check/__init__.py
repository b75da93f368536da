"""`python -m diffkern.gpu_check --out DIR [--cpu-dry-run]`: one command that proves and times every op on
a GPU (issue 14). Sections, in order: env, correctness, cooperative, capture, sanitizer, timing,
registers; each is a module with `run(ctx: Context) -> list[Row]` (see context.py). `--cpu-dry-run` runs
the same driver on CPU (Triton interpreter, tiny shapes, GPU-only work skipped with a note) in CI.
"""
