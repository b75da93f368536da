// CUDA kernel of the NoiseTilt fused step (specs/ntrk.md), torch-free: nvcc builds it for the GPU and
// the CPU tests run this very file in the host-execution harness (csrc/include/diffkern/cuda_compat.h).
//
// x = mu + a_i w + b_i eps with (a_i, b_i) = ntrk_math.h `tilt`(sigma_i, rho_i), in one pass over a
// persistent grid of (sample, tile) pairs (latent_tiles.cuh); eps is read, or drawn in-kernel from the
// Philox stream every backend shares (philox.h). All math is float32; offsets are 64-bit.
// Traffic, in elements of B*D: reads mu, w (+ eps) and writes x: 3 (4 with eps given).
#include "ntrk_step.h"

#include "diffkern/cuda_compat.h"
#include "diffkern/ntrk_math.h"
#include "diffkern/philox.h"
#include "latent_tiles.cuh"

namespace diffkern::ntrk::cuda {
namespace {

using namespace diffkern::cuda;

// Persistent blocks per SM, as grpo.cu: 8 x 256 threads fill an SM when registers allow. 3 resident
// blocks (80 registers a thread): at 64 the bf16 instantiation spills on sm_80 (Philox rounds and
// Box-Muller over a 16-byte unit). No stack frame: philox::randn's cos_2pi is a polynomial, not cosf.
constexpr int kBlocksPerSm = 8;
constexpr int kMinBlocksPerSm = 3;

enum Input : int { kMu, kW, kEps, kInputs };

template <typename T>
struct StepArgs {
  SampleScalar sigma, rho;
  int64_t B, D, n_tiles;
  int lead;
  gptr<const T> in[kInputs];
  unsigned present;
  gptr<T> x;
  gptr<const int64_t> philox;  // (seed, offset), read by each block when eps is drawn
};

template <typename T, int W>
__global__ void __launch_bounds__(kTileThreads, kMinBlocksPerSm) ntrk_step_kernel(StepArgs<T> p) {
  const bool given = p.present >> kEps & 1u;
  const uint64_t seed = given ? 0 : uint64_t(p.philox[0]), offset = given ? 0 : uint64_t(p.philox[1]);
  for (int64_t tile = blockIdx.x; tile < p.B * p.n_tiles; tile += gridDim.x) {
    const int64_t i = tile / p.n_tiles;
    const Tilt<float> t = tilt<float>(p.sigma[i], p.rho[i]);
    walk_tile<W>(row_of<W>(i, p.D, p.lead), tile % p.n_tiles, p.n_tiles, p.in, p.present,
                 [&](auto width, int64_t at, const auto& v) {
                   constexpr int N = decltype(width)::value;
                   float x[N];
#pragma unroll
                   for (int e = 0; e < N; ++e) {
                     const float eps = given ? v[kEps][e] : philox::randn(seed, offset + uint64_t(at + e));
                     x[e] = v[kMu][e] + t.a * v[kW][e] + t.b * eps;
                   }
                   store_unit<N>(p.x, at, x);
                 });
  }
}

}  // namespace

const char* step(const StepParams& p) {
  const Latents& l = p.lat;
  if (l.B * l.D == 0) return nullptr;
  const int64_t n = l.B * l.D, tiles = l.B * tiles_of(l.D), cap = int64_t(kBlocksPerSm) * sm_count();
  return dispatch(l, [&](auto t, auto width) {
    using T = decltype(t);
    const StepArgs<T> args{sample_scalar(p.sigma, "sigma"), sample_scalar(p.rho, "rho"), l.B, l.D, tiles_of(l.D),
                           l.lead,
                           {global_ptr(static_cast<const T*>(p.mu), n, "mu"), global_ptr(static_cast<const T*>(p.w), n, "w"),
                            global_ptr(static_cast<const T*>(p.eps), p.eps ? n : 0, "eps")},
                           1u << kMu | 1u << kW | (p.eps ? 1u << kEps : 0u),
                           global_ptr(static_cast<T*>(p.x), n, "x"), global_ptr(p.philox, p.philox ? 2 : 0, "philox")};
    return launch_kernel("ntrk_step_kernel", ntrk_step_kernel<T, decltype(width)::value>,
                         dim3(unsigned(tiles < cap ? tiles : cap)), dim3(kTileThreads), 0, p.stream, args);
  });
}

}  // namespace diffkern::ntrk::cuda
