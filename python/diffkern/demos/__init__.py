"""Runnable demonstrations of diffkern's techniques on small data, on CPU (`python -m diffkern.demos.<name>`)."""
