"""diffkern.nn: the thin modules built on diffkern's ops."""
from .dar.router import DARHistory, DARRouter

__all__ = ["DARHistory", "DARRouter"]
