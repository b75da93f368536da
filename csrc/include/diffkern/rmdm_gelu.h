// The exact (erf) gelu of R-MDM's MLP and its slope, for the CPU kernels (csrc/cpu/rmdm_recurse.cpp):
//
//     gelu(z) = z Phi(z),   gelu'(z) = Phi(z) + z phi(z),   Phi(z) = (1 + erf(z / sqrt 2)) / 2,
//     phi(z) = exp(-z^2 / 2) / sqrt(2 pi),
//
// both from one evaluation, so the training forward keeps the slope and its backward multiplies by it. float64
// uses libm's erf and exp (the reference's formulas). fp32 uses polynomials in fp32 arithmetic that the compiler
// vectorises (no libm call): with x = z / sqrt 2, erf(x) = x P(x^2) for |x| < 1 (degree 6, relative error 1.2e-9),
// else erfc(|x|) = exp(-x^2) Q(1 / (1 + |x| / 2)) (degree 8 for exp(x^2) erfc(x) on [1, 9], 4.4e-9), the
// coefficients fitted here to float64 erf / erfcx (least squares reweighted towards minimax); exp from
// diffkern/cpu_exp.h. Against float64 over z in [-16, 16] by 2^-12: gelu within 1.4e-7 max(|gelu|, 1), relative
// 7.7e-7 down to z = -13 (the tail past it is below 1e-37), the slope within 1.5e-7. z = -inf gives NaN (-inf
// times 0, as the reference), +inf gives +inf.
#pragma once

#include <cmath>
#include <cstdint>

#include "diffkern/cpu_exp.h"

namespace diffkern::rmdm {

constexpr double kInvSqrt2Pi = 0.398942280401432677939946059934;  // 1 / sqrt(2 pi)

// gelu(z) and gelu'(z) (header comment): libm for double.
template <typename T>
inline void gelu_slope(T z, T& gelu, T& slope) {
  const T cdf = T(0.5) * (T(1) + std::erf(z * T(M_SQRT1_2)));
  gelu = z * cdf;
  slope = cdf + z * std::exp(T(-0.5) * z * z) * T(kInvSqrt2Pi);
}

// The fp32 polynomials (header comment). Always inlined: a call per element would keep gelu_rows' loop scalar.
[[gnu::always_inline]] inline void gelu_slope(float z, float& gelu, float& slope) {
  const float x = z * float(M_SQRT1_2), a = std::fabs(x), zz = z * z, s = 0.5f * zz;  // s = x^2, from z exactly
  // exp(-x^2), times 1 - (z^2's rounding error) / 2
  const float e = s < 87.0f ? exp_nonpositive(-s) * (1.0f - 0.5f * std::fma(z, z, -zz)) : 0.0f;
  const float p = horner(s, 1.128379165732319f, -0.3761262583957773f, 0.11283585268702108f,  // erf(x) / x in x^2
                         -0.026853815973268937f, 0.005188334300697949f, -0.0008010245732838976f,
                         7.854019443389717e-05f);
  const float t = 1.0f / std::fma(0.5f, a, 1.0f);
  const float q = horner(t, -6.296574910925691e-06f, 0.2822496515736805f, 0.28050227433102437f,  // exp(a^2) erfc(a)
                         0.2556013158854336f, 0.14941848719986456f, 0.12291532434611428f, 0.0032586642029508337f,
                         -0.16996212303546873f, 0.07643307161647023f);
  const float half_erfc = 0.5f * e * q;  // erfc(|x|) / 2: Phi(-|z|)
  const float cdf = a < 1.0f ? std::fma(0.5f * x, p, 0.5f) : x > 0.0f ? 1.0f - half_erfc : half_erfc;
  gelu = z * cdf;
  slope = std::fma(z, e * float(kInvSqrt2Pi), cdf);
}

// g[i] = gelu(z[i]) and, with kSlope, slope[i] = gelu'(z[i]) for n values (g may be z, slope may be z).
template <bool kSlope, typename T>
void gelu_rows(const T* z, int64_t n, T* g, T* slope) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    T gi, si;
    gelu_slope(z[i], gi, si);
    g[i] = gi;
    if constexpr (kSlope) slope[i] = si;
  }
}

}  // namespace diffkern::rmdm
