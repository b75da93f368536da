"""Runnable demos: `python -m diffkern.demos.<technique> --out DIR`."""
