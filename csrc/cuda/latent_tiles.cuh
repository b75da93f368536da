// How the CUDA kernels over [B, D] latents (grpo.cu, ntrk_step.cu) walk a sample's D elements and
// reduce them: the tile layout, the per-thread accesses (16-byte vectors where the latents allow,
// scalars for a row's misaligned head and odd tail) and the fixed-order block sum. Device code on top
// of cuda_compat.h, torch-free.
//
// Sample i's row starts at element i * D. It is read as `head` scalars up to the first 16-byte
// boundary, then `units` vectors of W elements (W = 1 when the latents allow no vector access), then
// `tail` < W scalars. Tile c of a sample covers elements [c, c + 1) * kTileElems past the head; its
// first tile also takes the head, its last the tail.
#pragma once

#include <type_traits>

#include "diffkern/cuda_compat.h"
#include "latents.h"

namespace diffkern::cuda {

constexpr unsigned kFullMask = 0xffffffffu;
// 256 threads and 8 elements each per tile: two 16-byte loads of every float32 input, one of every
// 16-bit input (either way 8 floats a thread and input once widened). Each thread issues all its loads
// of a tile before using any; the [B, tiles] partial sums are 1/2048 of the latents.
constexpr int kTileThreads = 256;
constexpr int64_t kTileElems = 2048;
constexpr int kMaxWarps = kTileThreads / 32;
template <int W>
constexpr int kUnitsPerThread = int(kTileElems / kTileThreads) / W;
template <int W>
constexpr int64_t kTileUnits = kTileElems / W;
// Units a thread loads before using them: all of a tile's, but at most 4 scalars (the scalar path's
// 8 per input would spill at 64 registers).
template <int W>
constexpr int kBatch = kUnitsPerThread<W> < 4 ? kUnitsPerThread<W> : 4;

template <typename T>
constexpr int kVec = 16 / int(sizeof(T));

template <int N>
using Width = std::integral_constant<int, N>;

struct Row {
  int64_t base, units;  // first element of the row; whole vectors after the head
  int head, tail;
};

// Sample i's row of D elements, where `lead` is the latents' first element offset modulo W.
template <int W>
DIFFKERN_DEVICE Row row_of(int64_t i, int64_t D, int lead) {
  const int64_t base = i * D;
  const int64_t to_boundary = (W - (lead + base) % W) % W;
  const int head = int(to_boundary < D ? to_boundary : D);
  const int64_t units = (D - head) / W;
  return {base, units, head, int(D - head - units * W)};
}

inline int64_t tiles_of(int64_t D) { return D <= kTileElems ? 1 : (D + kTileElems - 1) / kTileElems; }

// A [B] float32/float64 per-sample scalar read in place, as float32 (the CPU kernel's rounding).
struct SampleScalar {
  gptr<const float> f32;
  gptr<const double> f64;
  int64_t stride;
  bool is_double;
  DIFFKERN_DEVICE float operator[](int64_t i) const { return is_double ? float(f64[i * stride]) : f32[i * stride]; }
};

// Stores scale * x[0..N) at p + at as one access.
template <int N, typename T>
DIFFKERN_DEVICE void store_unit(gptr<T> p, int64_t at, const float (&x)[N], float scale = 1.0f) {
  Vec<T, N> a;
#pragma unroll
  for (int e = 0; e < N; ++e) a.v[e] = from_float<T>(scale * x[e]);
  store_vec<N>(p, at, a);
}

template <int N, int M, typename T>
DIFFKERN_DEVICE void widen(const Vec<T, N> (&raw)[M], unsigned present, float (&x)[M][N]) {
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int e = 0; e < N; ++e) x[m][e] = (present >> m & 1u) ? to_float(raw[m].v[e]) : 0.0f;
  }
}

// Calls f(Width<N>{}, at, x) for each of this thread's accesses in tile c of row r, where x[m][e] is
// element at + e of in[m] as float (0 for an input whose bit in `present` is clear): first the
// units, kBatch at a time with all their loads issued before the first f, then the head/tail scalars.
template <int W, int M, typename T, typename F>
DIFFKERN_DEVICE void walk_tile(const Row& r, int64_t c, int64_t n_tiles, const gptr<const T> (&in)[M], unsigned present,
                               const F& f) {
  const int64_t u0 = c * kTileUnits<W> + threadIdx.x;
#pragma unroll
  for (int k0 = 0; k0 < kUnitsPerThread<W>; k0 += kBatch<W>) {
    Vec<T, W> raw[kBatch<W>][M];
#pragma unroll
    for (int k = 0; k < kBatch<W>; ++k) {
      const int64_t u = u0 + int64_t(k0 + k) * kTileThreads;
      if (u >= r.units) continue;
#pragma unroll
      for (int m = 0; m < M; ++m)
        if (present >> m & 1u) raw[k][m] = load_vec<W>(in[m], r.base + r.head + u * W);
    }
#pragma unroll
    for (int k = 0; k < kBatch<W>; ++k) {
      const int64_t u = u0 + int64_t(k0 + k) * kTileThreads;
      if (u >= r.units) continue;
      float x[M][W];
      widen(raw[k], present, x);
      f(Width<W>{}, r.base + r.head + u * W, x);
    }
  }
  // At most W - 1 head and W - 1 tail elements, one per thread.
  const bool head = c == 0 && int(threadIdx.x) < r.head;
  const bool tail = c == n_tiles - 1 && int(threadIdx.x) < r.tail;
  if (!head && !tail) return;
  const int64_t at = head ? r.base + threadIdx.x : r.base + r.head + r.units * W + threadIdx.x;
  Vec<T, 1> one[M];
#pragma unroll
  for (int m = 0; m < M; ++m)
    if (present >> m & 1u) one[m] = load_vec<1>(in[m], at);
  float x[M][1];
  widen(one, present, x);
  f(Width<1>{}, at, x);
  if (head && tail) {  // a row shorter than one vector past its head: the same thread takes both
    const int64_t at2 = r.base + r.head + r.units * W + threadIdx.x;
    for (int m = 0; m < M; ++m)
      if (present >> m & 1u) one[m] = load_vec<1>(in[m], at2);
    widen(one, present, x);
    f(Width<1>{}, at2, x);
  }
}

// Sums each of x[0..N) over the block into thread 0's x, in a fixed order (an xor butterfly per warp,
// then the warps in order): the same bits at every run. scratch holds N * kMaxWarps floats.
template <int N>
DIFFKERN_DEVICE void block_sum(float (&x)[N], sptr<float> scratch) {
  for (int offset = 16; offset > 0; offset /= 2) {
#pragma unroll
    for (int k = 0; k < N; ++k) x[k] += __shfl_xor_sync(kFullMask, x[k], offset, 32);
  }
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (threadIdx.x % 32 == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) scratch[k * kMaxWarps + warp] = x[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float s = 0.0f;
      for (int w = 0; w < warps; ++w) s += scratch[k * kMaxWarps + w];
      x[k] = s;
    }
  }
  __syncthreads();  // scratch is free again for the block's next tile
}

inline SampleScalar sample_scalar(const PerSample& x, const char* name) {
  return {global_ptr(static_cast<const float*>(x.is_double ? nullptr : x.data), x.is_double ? 0 : x.extent, name),
          global_ptr(static_cast<const double*>(x.is_double ? x.data : nullptr), x.is_double ? x.extent : 0, name),
          x.stride, x.is_double};
}

// Calls f(T{}, Width<W>{}) for the latents' storage type and access width (16-byte vectors if the
// layout allows, else scalars).
template <typename F>
const char* dispatch(const Latents& l, const F& f) {
  auto with_width = [&](auto t) {
    using T = decltype(t);
    return l.congruent ? f(t, Width<kVec<T>>{}) : f(t, Width<1>{});
  };
  switch (l.dtype) {
    case DType::kFloat16: return with_width(__half{});
    case DType::kBFloat16: return with_width(__nv_bfloat16{});
    default: return with_width(float{});
  }
}

}  // namespace diffkern::cuda
