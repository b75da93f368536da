// Counter-based normal draws on the integer stream of Triton's tl.randint4x (triton/language/random.py,
// 10 rounds of Philox4x32): every backend (C++ CPU, CUDA, Triton, the PyTorch reference) draws the
// same eps for the same (seed, offset). The words and uniforms are bit-identical everywhere; the
// normal agrees to the last ulp (logf/sqrtf and FMA contraction differ between compilers; the tests
// hold every backend to the float64 Box-Muller of the same uniforms under their error model).
//
//   key     = (seed mod 2^32, seed >> 32)
//   counter = (offset mod 2^32, offset >> 32, 0, 0)
//   u1, u2  = uniform(r0), uniform(r1)   with uniform(r) = (r as int32, ~r if negative) * 4.6566127342e-10
//   eps     = sqrt(-2 log max(u1, 1e-7)) * cos(2 pi u2)                  (Box-Muller, first output only)
// cos(2 pi u) is cos_2pi below, not the platform's cosf: a quadrant reduction that is exact in float
// and a short polynomial. The same formula runs in every backend, and the GPU code needs no stack
// (libdevice's cosf keeps a local array for its large-argument path, which u in [0, 1) never takes).
#pragma once

#include <math.h>
#include <stdint.h>

#include "diffkern/macros.h"

namespace diffkern::philox {

constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
constexpr int kRounds = 10;

struct Counter {
  uint32_t c0, c1, c2, c3;
};

DIFFKERN_HD inline uint32_t mulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

DIFFKERN_HD inline Counter philox4x32(Counter c, uint32_t k0, uint32_t k1) {
  for (int i = 0; i < kRounds; ++i) {
    const uint32_t c0 = c.c0, c2 = c.c2;
    c.c0 = mulhi(kRoundB, c2) ^ c.c1 ^ k0;
    c.c2 = mulhi(kRoundA, c0) ^ c.c3 ^ k1;
    c.c1 = kRoundB * c2;
    c.c3 = kRoundA * c0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return c;
}

// The four 32-bit words of (seed, offset).
DIFFKERN_HD inline Counter randint4x(uint64_t seed, uint64_t offset) {
  return philox4x32({static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), 0u, 0u},
                    static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Uniform in [0, 1): the int32 reading of r folded onto [0, 2^31) and scaled just below 1.
DIFFKERN_HD inline float uniform(uint32_t r) {
  int32_t i = static_cast<int32_t>(r);
  if (i < 0) i = ~i;
  return static_cast<float>(i) * 4.6566127342e-10f;
}

// cos(2 pi u) for u in [0, 1): 2 pi u = k pi/2 + f with k = round(4u) (4u - k is exact), |f| <= pi/4,
// then cos f or sin f by Taylor polynomials (truncation below 3e-8).
DIFFKERN_HD inline float cos_2pi(float u) {
  const float q = 4.0f * u, k = floorf(q + 0.5f), f = (q - k) * 1.5707963267948966f, f2 = f * f;
  const float c = 1.0f + f2 * (-0.5f + f2 * (4.1666666666666664e-2f + f2 * (-1.3888888888888889e-3f +
                  f2 * 2.4801587301587302e-5f)));
  const float s = f * (1.0f + f2 * (-0.16666666666666666f + f2 * (8.3333333333333332e-3f + f2 *
                  (-1.9841269841269841e-4f + f2 * 2.7557319223985893e-6f))));
  const int quadrant = static_cast<int>(k) & 3;
  return quadrant == 0 ? c : quadrant == 1 ? -s : quadrant == 2 ? -c : s;
}

// One N(0, 1) draw for element `offset` of stream `seed`.
DIFFKERN_HD inline float randn(uint64_t seed, uint64_t offset) {
  const Counter r = randint4x(seed, offset);
  const float u1 = fmaxf(1.0e-7f, uniform(r.c0)), u2 = uniform(r.c1);
  return sqrtf(-2.0f * logf(u1)) * cos_2pi(u2);
}

}  // namespace diffkern::philox
