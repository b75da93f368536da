"""Device copies of small int64 tables (the pointer tables of Triton launchers), cached by content.

A kernel that takes a list of tensors reads their pointers and strides from a device table. Copying a
pageable host table per call is not capturable in a CUDA graph, and a pinned source handed back to the
allocator after capture would be reused while every replay still copies from it. So device tables come
from one cache, with the same rules as the CUDA C++ one (csrc/include/diffkern/table_cache.h; one trace
tests both, tests/test_tables.py):
  * the key is (device, stream, the rows): the rows are the table's whole content, so a hit is correct
    for any call that builds the same rows, and a table is only used on the stream it was made on (its
    memory goes back to the caching allocator on that stream);
  * a miss fills a pinned host tensor and copies it asynchronously on the current stream; the cache keeps
    the pinned source beside the device table;
  * an entry made or used while the current stream is capturing is never evicted: a graph re-reads the
    table, and re-runs the copy from the pinned source, at every replay;
  * the others form an LRU of at most CAPACITY entries.
Memory bound: CAPACITY x (largest table, n x cols x 8 bytes: ~1.5 KB for 64 sources of 3 columns) x 2
(device + pinned) in the LRU, plus one entry per distinct table captured in a graph, kept for the life of
the process. A hit costs hashing the rows (~1 us per 20 rows) and no copy.
"""
from __future__ import annotations

import collections
import threading
from typing import Callable, Hashable

import torch

CAPACITY = 256


class TableCache:
    """The cache's rules, apart from what a value is: `get(key, capturing, make)` returns the cached value
    of `key`, or `make()`'s, and keeps it by the rules of the module docstring."""

    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._lru: collections.OrderedDict = collections.OrderedDict()  # least recently used first
        self._kept: dict = {}

    def get(self, key: Hashable, capturing: bool, make: Callable[[], object]):
        with self._lock:
            if key in self._kept:
                return self._kept[key]
            value = self._lru.pop(key) if key in self._lru else make()
            if capturing:
                self._kept[key] = value
                return value
            self._lru[key] = value
            while len(self._lru) > self.capacity:
                self._lru.popitem(last=False)
            return value


_cache = TableCache()


def device_table(rows: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    """The int64 table `rows` on CUDA device `device`, from the cache (the current device must be `device`:
    the op entries' device guard makes it so)."""
    stream = torch.cuda.current_stream(device)
    key = (device, stream.cuda_stream, rows)

    def make():
        host = torch.tensor(rows, dtype=torch.int64).pin_memory()
        return host, host.to(device, non_blocking=True)
    return _cache.get(key, torch.cuda.is_current_stream_capturing(), make)[1]
