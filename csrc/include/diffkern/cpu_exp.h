// exp for the CPU kernels' fp32 loops, in arithmetic the compiler vectorises (a libm call per element keeps a loop
// scalar): Cody-Waite reduction y = n ln 2 + r, |r| <= ln 2 / 2, and a degree-7 Taylor polynomial in r (relative
// error 7.2e-8 against float64 over [-87, 0] by 2^-10). float64 calls libm.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

namespace diffkern {

// c0 + x (c1 + x (c2 + ...)) by fused multiply-adds (written out at compile time, so a loop over x vectorises).
template <typename... C>
inline float horner(float x, float c0, C... c) {
  if constexpr (sizeof...(c) == 0) {
    return c0;
  } else {
    return std::fma(horner(x, c...), x, c0);
  }
}

// exp(y) for -87 <= y <= 0 (0 below -87, where the result would leave fp32's normal range; NaN stays NaN).
[[gnu::always_inline]] inline float exp_nonpositive(float y) {
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the integer held in the low mantissa bits
  const float shifted = y * 1.44269504088896341f + kShift;
  const float n = shifted - kShift;  // round(y / ln 2)
  const int32_t n_int = std::bit_cast<int32_t>(shifted) - std::bit_cast<int32_t>(kShift);
  float r = std::fma(n, -0.693145751953125f, y);  // y - n ln 2, ln 2 in two parts (the first exact in n * it)
  r = std::fma(n, -1.428606765330187e-06f, r);
  const float p = horner(r, 1.0f, 1.0f, 0.5f, 1.0f / 6, 1.0f / 24, 1.0f / 120, 1.0f / 720, 1.0f / 5040);
  return y < -87.0f ? 0.0f : p * std::bit_cast<float>((n_int + 127) << 23);
}

inline double exp_nonpositive(double y) { return std::exp(y); }

}  // namespace diffkern
