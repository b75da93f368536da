// Global-memory kernels: a guarded elementwise scale and its planted out-of-bounds twin, a row sum
// with 16-byte vector loads (the pattern of the memory-bound op kernels), an integer histogram with
// atomics, and float/bf16/fp16 round trips.
#include "diffkern/cuda_compat.h"

__global__ void scale_kernel(diffkern::gptr<const float> x, diffkern::gptr<float> y, float alpha, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] = alpha * x[i];
}

// Planted bug: the bounds guard is missing, so the tail block writes past the end of y.
__global__ void scale_oob_kernel(diffkern::gptr<const float> x, diffkern::gptr<float> y, float alpha, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  y[i] = alpha * (i < n ? x[i] : 0.0f);
}

// One block of 64 threads per row of d floats (d a multiple of 4): float4 loads, a warp-shuffle
// sum per warp, then the two warp sums through shared memory.
__global__ void row_sum_vec4_kernel(diffkern::gptr<const float> x, diffkern::gptr<float> out, int64_t d) {
  DIFFKERN_SHARED(float, warp_sums, 2);
  const int64_t row = blockIdx.x;
  float acc = 0.0f;
  for (int64_t i = int64_t(threadIdx.x) * 4; i < d; i += int64_t(blockDim.x) * 4) {
    const diffkern::Vec<float, 4> v = diffkern::load_vec<4>(x, row * d + i);
    acc += (v.v[0] + v.v[1]) + (v.v[2] + v.v[3]);
  }
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) out[row] = warp_sums[0] + warp_sums[1];
}

// Counts values per bucket (x[i] in [0, buckets)); the total is independent of the block order.
__global__ void histogram_kernel(diffkern::gptr<const int> x, diffkern::gptr<int> counts, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) atomicAdd(&counts[x[i]], 1);
}

// The same counts through per-block bins in shared memory: shared atomics, then one global atomic
// per bin and block. `buckets` must not exceed the block size.
__global__ void shared_histogram_kernel(diffkern::gptr<const int> x, diffkern::gptr<int> counts, int64_t n,
                                        int buckets) {
  DIFFKERN_SHARED(int, bins, 64);
  if (int(threadIdx.x) < buckets) bins[threadIdx.x] = 0;
  __syncthreads();
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) atomicAdd(&bins[x[i]], 1);
  __syncthreads();
  if (int(threadIdx.x) < buckets) atomicAdd(&counts[threadIdx.x], int(bins[threadIdx.x]));
}

__global__ void round_trip_kernel(diffkern::gptr<const float> x, diffkern::gptr<float> via_bf16,
                                  diffkern::gptr<float> via_fp16, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    via_bf16[i] = __bfloat162float(__float2bfloat16(x[i]));
    via_fp16[i] = __half2float(__float2half(x[i]));
  }
}
