// CUDA kernels of Flow-GRPO (specs/grpo.md), torch-free: nvcc builds them for the GPU and the CPU
// tests run this very file in the host-execution harness (csrc/include/diffkern/cuda_compat.h).
//
// Layout (latent_tiles.cuh, grpo_tiles.cuh): a persistent grid walks (sample, tile) pairs; a reducing
// kernel leaves one float32 partial sum per tile, and finalize_kernel adds each sample's partials in
// tile order (no atomics: the same bits at every run) and does the per-sample math of grpo_math.h,
// which the C++ CPU kernel shares. All math is float32; offsets are 64-bit.
//
// Traffic, in elements of B*D: sde_step_kernel reads x, v, eps and writes x_next, y (5);
// log_prob_fwd_kernel reads v, target (+ x, + v_uncond, + v_ref) (2-5); log_prob_bwd_kernel reads the
// same and writes dv (+ dv_uncond) (3-7); the residual-target form (target = y, no x) is the lean one.
// The partial sums add 4 bytes per tile of 2048 elements and sum (tests/test_cuda_traffic.py).
#include "grpo.h"

#include "diffkern/cuda_compat.h"
#include "diffkern/grpo_math.h"
#include "grpo_tiles.cuh"

namespace diffkern::grpo::cuda {
namespace {

// Persistent blocks per SM: 8 x 256 threads fill an SM's 2048 threads when registers allow.
constexpr int kBlocksPerSm = 8;
// Resident blocks the register allocation must allow (64 registers a thread): half an SM's threads,
// each with a tile's loads in flight, cover the memory latency. The backward keeps 3 (80 registers):
// at 64 its bf16 instantiation spills on sm_80.
constexpr int kMinBlocksPerSm = 4;
constexpr int kMinBwdBlocksPerSm = 3;
// Threads adding one sample's partial sums (at most a few hundred per sample).
constexpr int kFinalThreads = 128;

template <typename T>
struct SdeArgs {
  Layout s;
  gptr<const T> x, v, eps;
  gptr<T> x_next, y;
  gptr<float> partial;
};

// Inputs in walk order; x, v_uncond and v_ref may be absent (their `present` bits clear).
enum Input : int { kV, kVUncond, kX, kTarget, kVRef, kInputs };

template <typename T>
struct LogProbArgs {
  Layout s;
  gptr<const T> in[kInputs];
  unsigned present;
  float cfg_scale;
};

template <typename T>
struct FwdArgs {
  LogProbArgs<T> a;
  gptr<float> partial;  // [2, B, n_tiles]
};

template <typename T>
struct BwdArgs {
  LogProbArgs<T> a;
  gptr<const float> dlog_prob, dkl;
  gptr<T> dv, dv_uncond;
};

struct FinalArgs {
  Layout s;
  gptr<const float> partial;  // [n_sums, B, n_tiles]
  gptr<float> log_prob, kl, inv_lambda;
  bool has_kl;
};

template <typename T>
DIFFKERN_DEVICE float stored(float x) {
  return to_float(from_float<T>(x));
}

// y = b v + noise_scale eps, x_next = a x + y (= mu + noise_scale eps); partial sums of (y - b v)^2 with
// y as stored, the value the loss reads back.
template <typename T, int W>
__global__ void __launch_bounds__(kTileThreads, kMinBlocksPerSm) sde_step_kernel(SdeArgs<T> p) {
  DIFFKERN_SHARED(float, scratch, kMaxWarps);
  const Layout& s = p.s;
  const gptr<const T> in[3] = {p.x, p.v, p.eps};
  for (int64_t tile = blockIdx.x; tile < s.B * s.n_tiles; tile += gridDim.x) {
    const int64_t i = tile / s.n_tiles;
    const StepCoef<float> k = s.coef(i);
    float ss[1] = {0.0f};
    walk_tile<W>(s.row<W>(i), tile % s.n_tiles, s.n_tiles, in, 7u, [&](auto width, int64_t at, const auto& x) {
      constexpr int N = decltype(width)::value;
      float y[N], x_next[N];
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const float bv = k.b * x[1][e];
        y[e] = bv + k.noise_scale * x[2][e];
        x_next[e] = k.a * x[0][e] + y[e];
        y[e] = stored<T>(y[e]);
        const float r = y[e] - bv;
        ss[0] += r * r;
      }
      store_unit<N>(p.y, at, y);
      store_unit<N>(p.x_next, at, x_next);
    });
    block_sum(ss, scratch);
    if (threadIdx.x == 0) p.partial[tile] = ss[0];
  }
}

// The velocity trained through: v, or v_uncond + w (v - v_uncond).
template <int M, int N>
DIFFKERN_DEVICE float velocity(const float (&x)[M][N], int e, bool cfg, float w) {
  return cfg ? x[kVUncond][e] + w * (x[kV][e] - x[kVUncond][e]) : x[kV][e];
}

// x_next - mu as the loss reads it: (target - b v) - a x, the a x term only with x (grpo_math.h order).
template <int M, int N>
DIFFKERN_DEVICE float residual(const float (&x)[M][N], int e, const StepCoef<float>& k, float v, bool has_x) {
  const float r = x[kTarget][e] - k.b * v;
  return has_x ? r - k.a * x[kX][e] : r;
}

// Partial sums of (x_next - mu)^2 and (v - v_ref)^2.
template <typename T, int W>
__global__ void __launch_bounds__(kTileThreads, kMinBlocksPerSm) log_prob_fwd_kernel(FwdArgs<T> p) {
  DIFFKERN_SHARED(float, scratch, 2 * kMaxWarps);
  const Layout& s = p.a.s;
  const bool cfg = p.a.present >> kVUncond & 1u, ref = p.a.present >> kVRef & 1u, has_x = p.a.present >> kX & 1u;
  const int64_t tiles = s.B * s.n_tiles;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t i = tile / s.n_tiles;
    const StepCoef<float> k = s.coef(i);
    float sums[2] = {0.0f, 0.0f};
    walk_tile<W>(s.row<W>(i), tile % s.n_tiles, s.n_tiles, p.a.in, p.a.present,
                 [&](auto width, int64_t, const auto& x) {
                   constexpr int N = decltype(width)::value;
#pragma unroll
                   for (int e = 0; e < N; ++e) {
                     const float v = velocity(x, e, cfg, p.a.cfg_scale);
                     const float r = residual(x, e, k, v, has_x), d = ref ? v - x[kVRef][e] : 0.0f;
                     sums[0] += r * r;
                     sums[1] += d * d;
                   }
                 });
    block_sum(sums, scratch);
    if (threadIdx.x == 0) {
      p.partial[tile] = sums[0];
      p.partial[tiles + tile] = sums[1];
    }
  }
}

// dv = w g, dv_uncond = (1 - w) g (w = 1 without CFG), with
// g = dlog_prob (x_next - mu) b / (std^2 Dt D) + dkl b^2 (v - v_ref) / (std^2 Dt D): each written once.
template <typename T, int W>
__global__ void __launch_bounds__(kTileThreads, kMinBwdBlocksPerSm) log_prob_bwd_kernel(BwdArgs<T> p) {
  const Layout& s = p.a.s;
  const bool cfg = p.a.present >> kVUncond & 1u, ref = p.a.present >> kVRef & 1u, has_x = p.a.present >> kX & 1u;
  const float w = cfg ? p.a.cfg_scale : 1.0f;
  for (int64_t tile = blockIdx.x; tile < s.B * s.n_tiles; tile += gridDim.x) {
    const int64_t i = tile / s.n_tiles;
    const StepCoef<float> k = s.coef(i);
    const float gain = k.b * 2.0f * k.inv_2var / float(s.D), k_lp = p.dlog_prob[i] * gain,
                k_kl = ref ? p.dkl[i] * gain * k.b : 0.0f;
    walk_tile<W>(s.row<W>(i), tile % s.n_tiles, s.n_tiles, p.a.in, p.a.present,
                 [&](auto width, int64_t at, const auto& x) {
                   constexpr int N = decltype(width)::value;
                   float g[N];
#pragma unroll
                   for (int e = 0; e < N; ++e) {
                     const float v = velocity(x, e, cfg, p.a.cfg_scale);
                     g[e] = k_lp * residual(x, e, k, v, has_x) + (ref ? k_kl * (v - x[kVRef][e]) : 0.0f);
                   }
                   store_unit<N>(p.dv, at, g, w);
                   if (cfg) store_unit<N>(p.dv_uncond, at, g, 1.0f - w);
                 });
  }
}

// Sample i = block: its partial sums in tile order, then log_prob, kl and 1/lambda (grpo_math.h).
__global__ void __launch_bounds__(kFinalThreads) finalize_kernel(FinalArgs p) {
  DIFFKERN_SHARED(float, scratch, 2 * kMaxWarps);
  const Layout& s = p.s;
  const int64_t i = blockIdx.x;
  float sums[2] = {0.0f, 0.0f};
  for (int64_t t = threadIdx.x; t < s.n_tiles; t += blockDim.x) {
    sums[0] += p.partial[i * s.n_tiles + t];
    if (p.has_kl) sums[1] += p.partial[(s.B + i) * s.n_tiles + t];
  }
  block_sum(sums, scratch);
  if (threadIdx.x != 0) return;
  const StepCoef<float> k = s.coef(i);
  p.log_prob[i] = -sums[0] / float(s.D) * k.inv_2var - k.log_norm;
  if (p.has_kl) p.kl[i] = k.b * k.b * sums[1] / float(s.D) * k.inv_2var;  // mu - mu_ref = b (v - v_ref)
  p.inv_lambda[i] = k.inv_lambda;
}

Layout layout(const Step& s) {
  return {sample_scalar(s.sigma, "sigma"), sample_scalar(s.sigma_next, "sigma_next"), s.std_rule, s.std_coef,
          s.lat.B, s.lat.D, tiles_per_sample(s), s.lat.lead};
}

template <typename T>
gptr<T> latent(T* p, const Step& s, const char* name) {
  return global_ptr(p, p == nullptr ? 0 : s.lat.B * s.lat.D, name);
}

unsigned grid_size(const Layout& s) {
  const int64_t tiles = s.B * s.n_tiles, cap = int64_t(kBlocksPerSm) * sm_count();
  return unsigned(tiles < cap ? tiles : cap);
}

const char* finalize(const Layout& s, const float* partial, float* log_prob, float* kl, float* inv_lambda,
                     void* stream) {
  const int n_sums = kl != nullptr ? 2 : 1;
  const FinalArgs args{s, global_ptr(static_cast<const float*>(partial), n_sums * s.B * s.n_tiles, "partial"),
                       global_ptr(log_prob, s.B, "log_prob"), global_ptr(kl, kl ? s.B : 0, "kl"),
                       global_ptr(inv_lambda, s.B, "inv_lambda"), kl != nullptr};
  return launch_kernel("finalize_kernel", finalize_kernel, dim3(unsigned(s.B)), dim3(kFinalThreads), 0, stream, args);
}

template <typename T>
LogProbArgs<T> log_prob_args(const LogProbInputs& in, const Layout& s) {
  const unsigned present = 1u << kV | 1u << kTarget | (in.x ? 1u << kX : 0u) | (in.v_uncond ? 1u << kVUncond : 0u) |
                           (in.v_ref ? 1u << kVRef : 0u);
  return {s,
          {latent(static_cast<const T*>(in.v), in.step, "v"), latent(static_cast<const T*>(in.v_uncond), in.step, "v_uncond"),
           latent(static_cast<const T*>(in.x), in.step, "x"), latent(static_cast<const T*>(in.target), in.step, "target"),
           latent(static_cast<const T*>(in.v_ref), in.step, "v_ref")},
          present, in.cfg_scale};
}

}  // namespace

int64_t tiles_per_sample(const Step& s) { return tiles_of(s.lat.D); }

const char* sde_step(const SdeStepParams& p) {
  const Layout s = layout(p.step);
  if (s.B == 0) return nullptr;
  const char* err = dispatch(p.step.lat, [&](auto t, auto width) {
    using T = decltype(t);
    const SdeArgs<T> args{s,
                          latent(static_cast<const T*>(p.x), p.step, "x"),
                          latent(static_cast<const T*>(p.v), p.step, "v"),
                          latent(static_cast<const T*>(p.eps), p.step, "eps"),
                          latent(static_cast<T*>(p.x_next), p.step, "x_next"),
                          latent(static_cast<T*>(p.y), p.step, "y"),
                          global_ptr(p.partial, s.B * s.n_tiles, "partial")};
    return launch_kernel("sde_step_kernel", sde_step_kernel<T, decltype(width)::value>, dim3(grid_size(s)),
                         dim3(kTileThreads), 0, p.stream, args);
  });
  return err ? err : finalize(s, p.partial, p.log_prob, nullptr, p.inv_lambda, p.stream);
}

const char* log_prob_fwd(const LogProbFwdParams& p) {
  const Layout s = layout(p.in.step);
  if (s.B == 0) return nullptr;
  const char* err = dispatch(p.in.step.lat, [&](auto t, auto width) {
    using T = decltype(t);
    const FwdArgs<T> args{log_prob_args<T>(p.in, s), global_ptr(p.partial, 2 * s.B * s.n_tiles, "partial")};
    return launch_kernel("log_prob_fwd_kernel", log_prob_fwd_kernel<T, decltype(width)::value>, dim3(grid_size(s)),
                         dim3(kTileThreads), 0, p.stream, args);
  });
  return err ? err : finalize(s, p.partial, p.log_prob, p.kl, p.inv_lambda, p.stream);
}

const char* log_prob_bwd(const LogProbBwdParams& p) {
  const Layout s = layout(p.in.step);
  if (s.B == 0) return nullptr;
  return dispatch(p.in.step.lat, [&](auto t, auto width) {
    using T = decltype(t);
    const BwdArgs<T> args{log_prob_args<T>(p.in, s), global_ptr(p.dlog_prob, s.B, "dlog_prob"),
                          global_ptr(p.dkl, s.B, "dkl"), latent(static_cast<T*>(p.dv), p.in.step, "dv"),
                          latent(static_cast<T*>(p.dv_uncond), p.in.step, "dv_uncond")};
    return launch_kernel("log_prob_bwd_kernel", log_prob_bwd_kernel<T, decltype(width)::value>, dim3(grid_size(s)),
                         dim3(kTileThreads), 0, p.stream, args);
  });
}

}  // namespace diffkern::grpo::cuda
