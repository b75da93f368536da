"""Small self-contained experiments, runnable as `python -m diffkern.demos.<name>`."""
