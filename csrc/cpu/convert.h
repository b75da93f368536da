// Row conversions between a kernel's storage dtype and its accumulation type, written so that they
// vectorise: GCC does not vectorise the per-element c10::Half/c10::BFloat16 conversions (struct
// copies around a scalar F16C instruction or a NaN branch).
//
//   const acc_t* x = widen(src, buf, d);   // src itself for float/double, else buf filled from src
//   acc_t* y = staging(dst, buf);          // dst itself for float/double, else buf ...
//   narrow(y, dst, d);                     // ... rounded into dst once the row is computed
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#ifdef __F16C__
#include <immintrin.h>
#endif

namespace diffkern::cpu {

inline void widen_row(const c10::Half* __restrict src, float* __restrict dst, int64_t n) {
  int64_t j = 0;
#ifdef __F16C__
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  }
#endif
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

inline void narrow_row(const float* __restrict src, c10::Half* __restrict dst, int64_t n) {
  int64_t j = 0;
#ifdef __F16C__
  for (; j + 8 <= n; j += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  for (; j < n; ++j) dst[j] = static_cast<c10::Half>(src[j]);
}

// bfloat16 is the top half of a float: widening is a shift.
inline void widen_row(const c10::BFloat16* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t bits = static_cast<uint32_t>(src[j].x) << 16;
    std::memcpy(dst + j, &bits, sizeof(float));
  }
}

// Round to nearest even, NaN to the canonical quiet NaN: bit for bit what c10::BFloat16(float) does.
inline void narrow_row(const float* __restrict src, c10::BFloat16* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    uint32_t bits;
    std::memcpy(&bits, src + j, sizeof(float));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    dst[j].x = src[j] != src[j] ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
  }
}

// Any other pair (a float32 row widened to double, a double row narrowed to float32 or 16 bits): one
// rounding per element, for the kernels' rare double-precision fallbacks.
template <typename T, typename A>
inline void widen_row(const T* __restrict src, A* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<A>(static_cast<float>(src[j]));
}

template <typename A, typename T>
inline void narrow_row(const A* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

template <typename acc_t, typename T>
inline const acc_t* widen(const T* src, acc_t* buf, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return src;
  } else {
    widen_row(src, buf, n);
    return buf;
  }
}

template <typename acc_t, typename T>
inline acc_t* staging(T* dst, acc_t* buf) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return dst;
  } else {
    return buf;
  }
}

template <typename acc_t, typename T>
inline void narrow(const acc_t* staged, T* dst, int64_t n) {
  if constexpr (!std::is_same_v<T, acc_t>) narrow_row(staged, dst, n);
}

}  // namespace diffkern::cpu
