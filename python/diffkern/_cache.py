"""The CPU output cache's Python face (csrc/include/diffkern/cpu_cache.h).

Large CPU outputs of diffkern's training ops (ntrk_step and its fused backward; R-MDM's kept activations and
backward buffers) are allocated from a cache of blocks that earlier outputs released, so a training loop does not
fault in fresh pages every step. A block is reused only once nothing refers to it any more (no tensor, view,
numpy array or autograd-saved tensor); released blocks are held up to DIFFKERN_CPU_CACHE_BYTES bytes (default
2 GiB, 0 turns the cache off) and 64 blocks, the oldest going first.
"""
from __future__ import annotations

from . import _ops


def empty_cache() -> None:
    """Frees every released block the CPU output cache holds (as torch.cuda.empty_cache does for CUDA's caching
    allocator); outputs still alive are not affected, and return to the cache when released. Does nothing when
    the compiled extension did not load (nothing is cached then)."""
    if _ops.LOADED:
        _ops.ops.cpu_cache_clear()


def cached_bytes() -> int:
    """Bytes of released blocks the CPU output cache holds now, ready for reuse (0 without the extension).

    A host-side query of the process's state: call it outside torch.compile'd code (fullgraph=True refuses an
    op returning a Python int; its value would otherwise be frozen into the graph). empty_cache compiles."""
    return _ops.ops.cpu_cache_bytes() if _ops.LOADED else 0
