// Warp collectives: shuffles, votes and __syncwarp. Every lane named in the mask must arrive at the
// same collective with the same mask before any of them continues, and a shuffle returns the value
// its source lane supplied at that same call, as on a GPU with independent thread scheduling.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_types.h"

namespace diffkern::harness {

enum Op { kSyncwarp = 1, kShfl, kShflUp, kShflDown, kShflXor, kBallot, kAll, kAny };

// Blocks until every lane of `mask` has called the same op with the same mask; returns this lane's
// result (shuffles: the source lane's `value` bits; votes: the vote; syncwarp: 0).
uint64_t warp_collective(Op op, unsigned mask, uint64_t value, int arg, int width);

template <typename T>
T shuffle(Op op, unsigned mask, T var, int arg, int width) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_collective(op, mask, bits, arg, width);
  std::memcpy(&var, &bits, sizeof(T));
  return var;
}

}  // namespace diffkern::harness

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return ::diffkern::harness::shuffle(::diffkern::harness::kShfl, mask, var, src_lane, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return ::diffkern::harness::shuffle(::diffkern::harness::kShflUp, mask, var, int(delta), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return ::diffkern::harness::shuffle(::diffkern::harness::kShflDown, mask, var, int(delta), width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return ::diffkern::harness::shuffle(::diffkern::harness::kShflXor, mask, var, lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return unsigned(::diffkern::harness::warp_collective(::diffkern::harness::kBallot, mask, pred != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int pred) {
  return int(::diffkern::harness::warp_collective(::diffkern::harness::kAll, mask, pred != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int pred) {
  return int(::diffkern::harness::warp_collective(::diffkern::harness::kAny, mask, pred != 0, 0, 32));
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::diffkern::harness::warp_collective(::diffkern::harness::kSyncwarp, mask, 0, 0, 32);
}
