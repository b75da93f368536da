"""Runnable end-to-end examples: `python -m diffkern.demos.<name> --out DIR`."""
