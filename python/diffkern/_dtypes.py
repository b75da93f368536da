"""Dtype facts every op shares: the name errors print, and the type math accumulates in."""
import torch


def name(dtype: torch.dtype) -> str:
    """Python's spelling without the prefix ("bfloat16"), as the C++ checks print it too."""
    return str(dtype).removeprefix("torch.")


def acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation type for inputs of `dtype`: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32
