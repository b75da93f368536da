// How the routing kernels (dar_route.cu) hold and reduce a token row: the thread layout, the row's
// loads and stores (16-byte vectors where the row allows, scalars at a misaligned row or the tail
// of d) and the sum over a row's threads. Device code on top of cuda_compat.h, torch-free.
//
// A group of G = blockDim.x threads owns one row of d elements; thread x holds kElemsPerThread of
// them in registers, as vectors x, x + G, x + 2G, ... so that a warp's accesses are contiguous. G is
// a power of two up to 32 (blockDim.y = kPackedThreads / G rows share a block and reduce with
// sub-warp shuffles) or a multiple of 32 up to kMaxRowThreads (one row per block: shuffles, then
// shared memory).
#pragma once

#include "dar_route.h"
#include "diffkern/cuda_compat.h"

namespace diffkern::dar::cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int E = kElemsPerThread;
// Threads of a block whose rows have at most 32 threads: enough warps to hide a row's latency.
constexpr int kPackedThreads = 128;
constexpr int kMaxWarps = kMaxRowThreads / 32;
constexpr int kMaxSums = 3;  // values one row reduction sums at once (the backward's ss, p, <dh, v>)
struct RowLayout {
  int G, R;  // threads per row, rows per block
};

inline RowLayout row_layout(int64_t d) {
  const int64_t need = (d + E - 1) / E;
  if (need <= 32) {
    int G = 1;
    while (G < need) G *= 2;
    return {G, kPackedThreads / G};
  }
  return {int((need + 31) / 32 * 32), 1};
}

template <typename T>
constexpr int kVec = 16 / int(sizeof(T));

// Calls f(j, r, vec) for each access to this thread's elements of a row of d values of type X:
// element e of slot k is column (x + k*G) * V + e, so an access covers columns j..j+W-1 and registers
// r..r+W-1, and vec says whether it may be one vector access (an aligned row, no column past d). V is
// the row layout's vector width (the sources'), so a float32 q beside bf16 sources takes two 16-byte
// accesses per slot.
template <int V, int W, typename P, typename F>
DIFFKERN_DEVICE void for_each_access(P row, int64_t d, const F& f) {
  const bool aligned = vec_aligned<W>(row);
#pragma unroll
  for (int k = 0; k < E / V; ++k) {
#pragma unroll
    for (int w = 0; w < V; w += W) {
      const int64_t j = (int64_t(threadIdx.x) + int64_t(k) * blockDim.x) * V + w;
      f(j, k * V + w, aligned && j + W <= d);
    }
  }
}

// Elements per access of X in a row layout of vector width V: at most 16 bytes.
template <int V, typename X>
constexpr int kAccess = V < 16 / int(sizeof(X)) ? V : 16 / int(sizeof(X));

// This thread's elements of a row, converted to float; columns past d read as 0.
template <int V, typename X>
DIFFKERN_DEVICE void load_row(gptr<const X> row, int64_t d, float (&x)[E]) {
  constexpr int W = kAccess<V, X>;
  for_each_access<V, W>(row, d, [&](int64_t j, int r, bool vec) {
    if (vec) {
      const Vec<X, W> a = load_vec<W>(row, j);
#pragma unroll
      for (int e = 0; e < W; ++e) x[r + e] = to_float(a.v[e]);
    } else {
#pragma unroll
      for (int e = 0; e < W; ++e) x[r + e] = j + e < d ? to_float(row[j + e]) : 0.0f;
    }
  });
}

template <int V, typename X>
DIFFKERN_DEVICE void store_row(gptr<X> row, int64_t d, const float (&x)[E]) {
  constexpr int W = kAccess<V, X>;
  for_each_access<V, W>(row, d, [&](int64_t j, int r, bool vec) {
    if (vec) {
      Vec<X, W> a;
#pragma unroll
      for (int e = 0; e < W; ++e) a.v[e] = from_float<X>(x[r + e]);
      store_vec<W>(row, j, a);
    } else {
#pragma unroll
      for (int e = 0; e < W; ++e)
        if (j + e < d) row[j + e] = from_float<X>(x[r + e]);
    }
  });
}

// Sums each of x[0..N) over the row's threads; every thread gets the same totals (the xor butterfly
// and the fixed order over warps are symmetric), so all keep one softmax state. Rows wider than a
// warp meet in `scratch` (2 * kMaxSums * kMaxWarps floats): alternating halves by `parity` let one
// barrier per call suffice, since a half is rewritten only after the next call's barrier.
template <int N>
DIFFKERN_DEVICE void row_sum(float (&x)[N], sptr<float> scratch, int& parity) {
  const int G = blockDim.x;
  const int width = G < 32 ? G : 32;
  for (int offset = width / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int k = 0; k < N; ++k) x[k] += __shfl_xor_sync(kFullMask, x[k], offset, width);
  }
  if (G <= 32) return;
  const int warp = threadIdx.x / 32;
  const sptr<float> half = scratch + parity * kMaxSums * kMaxWarps;
  if (threadIdx.x % 32 == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) half[k * kMaxWarps + warp] = x[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    float s = 0.0f;
    for (int w = 0; w < G / 32; ++w) s += half[k * kMaxWarps + w];
    x[k] = s;
  }
  parity ^= 1;
}

}  // namespace diffkern::dar::cuda
