// The CPU output cache: memory for large CPU outputs, reused once released (csrc/cpu/cpu_cache.cpp).
//
// Why: glibc hands a large freed block back to the kernel, so a fresh latent-sized output faults in every page of
// its memory on every call (and the kernel zeroes each page): for NoiseTilt's training step that is most of its time
// (a 4 MB output: ~1000 faults). `cache::empty` hands out a block that an earlier output of the same byte size
// released, else a new one.
//
// When a block is reused: only after the storage made on it died, i.e. no tensor, view, numpy array or autograd
// saved tensor refers to it any more (the storage's deleter puts the block back). Each call builds a fresh storage
// and tensor around it (no autograd state, version counter or requires_grad carries over); the storage is
// resizable (through the cache: the old block is released like a free). Contents of a reused block are stale: every caller
// writes every element (DIFFKERN_DEBUG_FILL=nan fills them first, as for at::empty).
//
// Bounds: only blocks of at least kMinBytes go through the cache; it holds at most kMaxBlocks released blocks
// and DIFFKERN_CPU_CACHE_BYTES bytes of them (read once; default 2 GiB; 0 turns the cache off), the oldest
// released going first. `clear` frees every held block (diffkern.empty_cache()); blocks in use are not affected.
// Thread-safe: one cache per process, under one mutex.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace diffkern::cache {

constexpr int64_t kMinBytes = int64_t(64) << 10;
constexpr int64_t kMaxBlocks = 64;

// A contiguous CPU tensor of `sizes` and `options` (uninitialised, or NaN under DIFFKERN_DEBUG_FILL=nan).
at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Bytes of released blocks the cache holds now.
int64_t held_bytes();

// Frees every released block the cache holds.
void clear();

}  // namespace diffkern::cache
