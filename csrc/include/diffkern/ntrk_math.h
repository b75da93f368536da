// Element math of NoiseTilt (specs/ntrk.md), shared by the CPU and CUDA kernels. Torch-free.
// python/diffkern/ntrk/reference.py is the same math for the reference backend; the Triton kernels
// (python/diffkern/ntrk/triton_kernels.py) write it out in tl.* ops.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "diffkern/macros.h"

namespace diffkern::ntrk {

// x = mu + sigma (sqrt(rho) w + sqrt(1 - rho) eps) = mu + a w + b eps per sample.
template <typename T>
struct Tilt {
  T a, b;
};

// rho outside [0, 1] gives NaN (a square root of a negative number) for that sample.
template <typename T>
DIFFKERN_HD inline Tilt<T> tilt(T sigma, T rho) {
  return {sigma * sqrt(rho), sigma * sqrt(T(1) - rho)};
}

// 2OS ranks order entries by (value, position). As one int64: the order-preserving int32 of the float
// (sign-magnitude folded to two's complement) above the position, so the signed order of the keys is
// that lexicographic order (the Triton kernels pack the same keys). -0.0 is folded onto +0.0 first,
// as they compare equal; every NaN becomes the positive quiet NaN, which orders above +inf, so NaNs
// sort last whatever their sign bit (torch.sort's order, the reference's).
DIFFKERN_HD inline int64_t packed_key(float v, int32_t position) {
  v = v != v ? NAN : v + 0.0f;
  int32_t bits;
  memcpy(&bits, &v, sizeof(bits));
  const int32_t ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF);
  return static_cast<int64_t>(static_cast<uint64_t>(static_cast<int64_t>(ordered)) << 32 |
                              static_cast<uint32_t>(position));
}

DIFFKERN_HD inline float key_value(int64_t key) {
  const int32_t ordered = static_cast<int32_t>(key >> 32);
  const int32_t bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF);
  float v;
  memcpy(&v, &bits, sizeof(v));
  return v;
}

DIFFKERN_HD inline int32_t key_position(int64_t key) { return static_cast<int32_t>(key & 0xFFFFFFFF); }

}  // namespace diffkern::ntrk
