// A stable LSD radix sort of 64-bit keys by their upper 32 bits, for the 2OS ranks of csrc/cpu/ntrk.cpp.
//
// The ranks sort a tile (D entries) or a column (M entries) at a time, a few hundred to a few thousand keys:
// there std::sort's data-dependent branches mispredict about every other comparison, while a radix pass is
// branch-free. Four passes of 8-bit digits (one histogram pass counts all four); a pass whose digit is the
// same in every key is skipped (common in the top byte: the sign and exponent of similar values).
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

namespace diffkern::cpu {

// Sorts keys[0, n) by (keys[i] >> 32) as an unsigned number, keeping the input order among equal upper
// halves; tmp holds n keys of scratch. Keys whose lower half is the entry's position, given in position
// order, so come out in the order of the whole unsigned 64-bit keys.
inline void radix_sort_upper32(uint64_t* keys, uint64_t* tmp, int64_t n) {
  if (n < 2) return;
  constexpr int kDigits = 4, kBins = 256;
  uint32_t count[kDigits][kBins] = {};
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t h = static_cast<uint32_t>(keys[i] >> 32);
    for (int d = 0; d < kDigits; ++d) ++count[d][(h >> (8 * d)) & 0xFF];
  }
  uint64_t *src = keys, *dst = tmp;
  for (int d = 0; d < kDigits; ++d) {
    const int shift = 32 + 8 * d;
    if (count[d][(src[0] >> shift) & 0xFF] == static_cast<uint32_t>(n)) continue;
    uint32_t offset[kBins];
    uint32_t sum = 0;
    for (int b = 0; b < kBins; ++b) {
      offset[b] = sum;
      sum += count[d][b];
    }
    for (int64_t i = 0; i < n; ++i) dst[offset[(src[i] >> shift) & 0xFF]++] = src[i];
    std::swap(src, dst);
  }
  if (src != keys) std::memcpy(keys, src, static_cast<size_t>(n) * sizeof(uint64_t));
}

}  // namespace diffkern::cpu
