"""diffkern.nn: the thin modules built on diffkern's ops."""
from .grpo.nn import FlashGRPOLoss

__all__ = ["FlashGRPOLoss"]
