"""Runnable end-to-end demonstrations on small data, on CPU: `python -m diffkern.demos.<name> --out DIR`."""
