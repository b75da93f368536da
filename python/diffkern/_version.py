"""The package version: read by setup.py at build time and exported as diffkern.__version__."""
__version__ = "0.1.0"
