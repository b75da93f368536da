"""R-MDM: recursive masked diffusion with shared-block recursion (specs/rmdm.md)."""
from . import countdown, sudoku
from .model import RecursiveMDM
from .op import recurse
from .sampling import sample

__all__ = ["RecursiveMDM", "countdown", "recurse", "sample", "sudoku"]
