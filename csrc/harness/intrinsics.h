// The device math and atomics kernels call, for the host pass. On one OS thread an atomic's
// read-modify-write cannot be interleaved; on shared memory it is also what the race detector
// exempts from write/write hazards.
#pragma once

#include <cmath>

#include "shared.h"

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }

template <typename T>
T atomicAdd(T* address, T v) {
  ::diffkern::harness::maybe_yield();
  T old = *address;
  *address = old + v;
  return old;
}

template <typename T>
T atomicAdd(::diffkern::harness::SharedPtr<T> address, T v) {
  return (*address).atomic_update([](T a, T b) { return a + b; }, v);
}

template <typename T>
T atomicMax(T* address, T v) {
  ::diffkern::harness::maybe_yield();
  T old = *address;
  *address = old < v ? v : old;
  return old;
}
