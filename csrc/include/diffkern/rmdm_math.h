// Per-row math of R-MDM's pre-norm block (specs/rmdm.md), shared by the CPU kernels.
// Torch-free: T is the accumulation type. python/diffkern/rmdm/reference.py `block` is the same math.
#pragma once

#include <math.h>
#include <stdint.h>

#include "diffkern/macros.h"

namespace diffkern::rmdm {

// Weights per block and modulation vectors per block (see csrc/diffkern/ops.cpp for the order).
constexpr int64_t kBlockParams = 12;
constexpr int64_t kMod = 6;
enum Param : int64_t { kLn1W, kLn1B, kWqkv, kBqkv, kWo, kBo, kLn2W, kLn2B, kW1, kB1, kW2, kB2 };
enum ModPart : int64_t { kShift1, kScale1, kGate1, kShift2, kScale2, kGate2 };

// The mean of one row of d and its reciprocal standard deviation 1 / sqrt(var + eps) (LayerNorm's statistics).
template <typename T>
DIFFKERN_HD inline void row_moments(const T* h, int64_t d, T eps, T& mean, T& rstd) {
  T sum = 0, var = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < d; ++c) sum += h[c];
  mean = sum / T(d);
#pragma omp simd reduction(+ : var)
  for (int64_t c = 0; c < d; ++c) var += (h[c] - mean) * (h[c] - mean);
  rstd = T(1) / sqrt(var / T(d) + eps);
}

// The row sums of LayerNorm's backward through u = xhat w + b: s1 = sum_c du_c w_c, s2 = sum_c du_c w_c xhat_c.
template <typename T>
DIFFKERN_HD inline void norm_grad_sums(const T* du, const T* w, const T* xhat, int64_t d, T& s1, T& s2) {
  T a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t c = 0; c < d; ++c) {
    const T g = du[c] * w[c];
    a += g;
    b += g * xhat[c];
  }
  s1 = a, s2 = b;
}

// u = ((h - mean) * rstd * w + b) * (1 + scale) + shift over one row of d; scale/shift may be null.
template <typename T>
DIFFKERN_HD inline void norm_row(const T* h, int64_t d, const T* w, const T* b, const T* shift, const T* scale,
                                 T eps, T* u) {
  T mean, rstd;
  row_moments(h, d, eps, mean, rstd);
  if (scale) {
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) u[c] = ((h[c] - mean) * rstd * w[c] + b[c]) * (T(1) + scale[c]) + shift[c];
  } else {
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) u[c] = (h[c] - mean) * rstd * w[c] + b[c];
  }
}

// The gated residual h += gate * y over one row of d (gate null: h += y).
template <typename T>
DIFFKERN_HD inline void gated_add(T* h, const T* y, const T* gate, int64_t d) {
  if (gate) {
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) h[c] += gate[c] * y[c];
  } else {
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) h[c] += y[c];
  }
}

}  // namespace diffkern::rmdm
