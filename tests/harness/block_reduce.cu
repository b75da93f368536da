// Block-wide sums through shared memory: the correct tree, the same tree with a planted missing
// __syncthreads(), and a dynamic-shared-memory variant. One block sums `n` floats per row.
#include "diffkern/cuda_compat.h"

constexpr int kBlock = 128;  // threads per block; the tree below assumes a power of two

// This thread's share of row blockIdx.x: every blockDim.x-th element.
DIFFKERN_DEVICE float thread_sum(diffkern::gptr<const float> x, int n) {
  const int64_t row = blockIdx.x;
  float acc = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc += x[row * n + i];
  return acc;
}

__global__ void block_sum_kernel(diffkern::gptr<const float> x, diffkern::gptr<float> out, int n) {
  DIFFKERN_SHARED(float, partial, kBlock);
  partial[threadIdx.x] = thread_sum(x, n);
  __syncthreads();
  for (int stride = kBlock / 2; stride > 0; stride /= 2) {
    if (int(threadIdx.x) < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// Planted bug: no barrier between a step's writes and the next step's reads.
__global__ void block_sum_missing_sync_kernel(diffkern::gptr<const float> x, diffkern::gptr<float> out, int n) {
  DIFFKERN_SHARED(float, partial, kBlock);
  partial[threadIdx.x] = thread_sum(x, n);
  __syncthreads();
  for (int stride = kBlock / 2; stride > 0; stride /= 2) {
    if (int(threadIdx.x) < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// Any power-of-two block size; the launch supplies blockDim.x floats of dynamic shared memory.
__global__ void block_sum_dynamic_kernel(diffkern::gptr<const float> x, diffkern::gptr<float> out, int n) {
  DIFFKERN_EXTERN_SHARED(float, partial);
  partial[threadIdx.x] = thread_sum(x, n);
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (int(threadIdx.x) < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// Planted bug: thread 0 leaves before the barrier the others wait in.
__global__ void early_exit_barrier_kernel(diffkern::gptr<float> out) {
  DIFFKERN_SHARED(float, value, 1);
  if (threadIdx.x == 0) return;
  if (threadIdx.x == 1) value[0] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = value[0];
}
