// Per-row statistics with the math intrinsics the op kernels use: an online (streaming) logsumexp,
// as DAR's softmax over sources runs, and rstd = (mean(x^2) + eps)^-1/2 two ways. One warp per row.
#include "diffkern/cuda_compat.h"

// Merges two (max, sum of exp(x - max)) pairs without overflow; exp2f of a log2e-scaled difference
// is the form the fast kernels use.
DIFFKERN_DEVICE void merge_lse(float& m, float& s, float m_other, float s_other) {
  constexpr float kLog2e = 1.4426950408889634f;
  const float m_new = fmaxf(m, m_other);
  s = s * exp2f((m - m_new) * kLog2e) + s_other * expf(m_other - m_new);
  m = m_new;
}

__global__ void row_stats_kernel(diffkern::gptr<const float> x, diffkern::gptr<float> out, int64_t d, float eps) {
  const int64_t row = blockIdx.x;
  float m = -INFINITY, s = 0.0f, sumsq = 0.0f, lo = INFINITY;
  for (int64_t i = threadIdx.x; i < d; i += 32) {
    const float v = x[row * d + i];
    merge_lse(m, s, v, 1.0f);
    sumsq += v * v;
    lo = fminf(lo, v);
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    const float m_other = __shfl_xor_sync(0xffffffffu, m, offset);
    const float s_other = __shfl_xor_sync(0xffffffffu, s, offset);
    if (s_other > 0.0f) merge_lse(m, s, m_other, s_other);
    sumsq += __shfl_xor_sync(0xffffffffu, sumsq, offset);
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, offset));
  }
  if (threadIdx.x == 0) {
    out[row * 4 + 0] = m + logf(s);
    out[row * 4 + 1] = rsqrtf(sumsq / float(d) + eps);
    out[row * 4 + 2] = __fdividef(1.0f, sqrtf(sumsq / float(d) + eps));
    out[row * 4 + 3] = lo;
  }
}
