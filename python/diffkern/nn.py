"""diffkern.nn: the thin modules built on diffkern's ops."""
from .dar.router import DARHistory, DARRouter
from .grpo.nn import FlashGRPOLoss

__all__ = ["DARHistory", "DARRouter", "FlashGRPOLoss"]
