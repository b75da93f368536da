// Warp-level sums and votes: one warp per row of 32 floats. The planted bug narrows the shuffle
// width to 16 while still starting the tree at offset 16, so the upper half never reaches lane 0.
#include "diffkern/cuda_compat.h"

constexpr unsigned kFullMask = 0xffffffffu;

__global__ void warp_sum_xor_kernel(diffkern::gptr<const float> x, diffkern::gptr<float> out) {
  float v = x[int64_t(blockIdx.x) * 32 + threadIdx.x];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  out[int64_t(blockIdx.x) * 32 + threadIdx.x] = v;  // every lane holds the full sum
}

__global__ void warp_sum_down_kernel(diffkern::gptr<const float> x, diffkern::gptr<float> out) {
  float v = x[int64_t(blockIdx.x) * 32 + threadIdx.x];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(kFullMask, v, offset);
  if (threadIdx.x == 0) out[blockIdx.x] = v;
}

__global__ void warp_sum_wrong_width_kernel(diffkern::gptr<const float> x, diffkern::gptr<float> out) {
  float v = x[int64_t(blockIdx.x) * 32 + threadIdx.x];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(kFullMask, v, offset, 16);
  if (threadIdx.x == 0) out[blockIdx.x] = v;
}

// Lane 0 writes how many lanes hold a positive value, whether all do, whether any does, and the
// value lane 31 broadcasts.
__global__ void warp_vote_kernel(diffkern::gptr<const float> x, diffkern::gptr<float> out) {
  const float v = x[int64_t(blockIdx.x) * 32 + threadIdx.x];
  const unsigned positive = __ballot_sync(kFullMask, v > 0.0f);
  const int all = __all_sync(kFullMask, v > 0.0f);
  const int any = __any_sync(kFullMask, v > 0.0f);
  const float last = __shfl_sync(kFullMask, v, 31);
  __syncwarp();
  if (threadIdx.x == 0) {
    out[blockIdx.x * 4 + 0] = float(__popc(positive));
    out[blockIdx.x * 4 + 1] = float(all);
    out[blockIdx.x * 4 + 2] = float(any);
    out[blockIdx.x * 4 + 3] = last;
  }
}

// Reverses each row of 32 through shared memory. __syncwarp() orders the lanes' accesses, so no
// block barrier is needed; the planted twin drops it (lanes are not in lockstep since Volta).
__global__ void warp_reverse_kernel(diffkern::gptr<const float> x, diffkern::gptr<float> out) {
  DIFFKERN_SHARED(float, row, 32);
  row[threadIdx.x] = x[int64_t(blockIdx.x) * 32 + threadIdx.x];
  __syncwarp();
  out[int64_t(blockIdx.x) * 32 + threadIdx.x] = row[31 - threadIdx.x];
}

__global__ void warp_reverse_missing_syncwarp_kernel(diffkern::gptr<const float> x, diffkern::gptr<float> out) {
  DIFFKERN_SHARED(float, row, 32);
  row[threadIdx.x] = x[int64_t(blockIdx.x) * 32 + threadIdx.x];
  out[int64_t(blockIdx.x) * 32 + threadIdx.x] = row[31 - threadIdx.x];
}

// Planted bug: a tail reduction over 16 lanes names only those lanes in its mask but its first
// step reads 8 lanes down, so lanes 8..15 read lanes 16..23, which are not taking part.
__global__ void shfl_outside_mask_kernel(diffkern::gptr<const float> x, diffkern::gptr<float> out) {
  if (threadIdx.x >= 16) return;
  float v = x[int64_t(blockIdx.x) * 32 + threadIdx.x];
  for (int offset = 8; offset > 0; offset /= 2) v += __shfl_down_sync(0x0000ffffu, v, offset);
  if (threadIdx.x == 0) out[blockIdx.x] = v;
}

// Planted bug: a full-warp shuffle inside a branch only half the warp takes; the other half goes on
// to the block barrier, so neither collective can complete (on a GPU: a hang or garbage).
__global__ void shfl_divergent_kernel(diffkern::gptr<float> out) {
  float v = float(threadIdx.x);
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}
