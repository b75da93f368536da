// CPU kernels of NoiseTilt (specs/ntrk.md; schemas in csrc/diffkern/ops.cpp).
//
// ntrk_step: one pass in chunks of kChunk elements, parallel over (sample, chunk); reads mu, w (and
// eps when given) once, writes x once. Without eps the normals come from philox.h at the element's
// flat index, the same stream as the Triton kernel's tl.randn and the reference.
// ntrk_step_bwd (its backward on CPU): reads dx once, writes the requested of dw and deps once. Both ops' outputs
// come from the CPU output cache (diffkern/cpu_cache.h): a training step's fresh latent-sized outputs otherwise
// fault in every page, which cost most of the step.
// twoos_project: per pass, a row phase (sort each tile of D, parallel over blocks of tiles), a column phase
// (sort each rank j across the M tiles and clip it against its band; parallel over (sample, j)) and the unsort
// (parallel over blocks of tiles). Every sort orders by (value, position), so ranks and results are
// deterministic, whatever the thread count; float32 entries sort by radix (radix.h), float64 by std::sort.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "convert.h"
#include "radix.h"
#include "diffkern/check.h"
#include "diffkern/cpu_cache.h"
#include "diffkern/latent_args.h"
#include "diffkern/ntrk_math.h"
#include "diffkern/philox.h"

namespace diffkern::ntrk {
namespace {

using cpu::narrow;
using cpu::staging;
using cpu::widen;

constexpr int64_t kChunk = 16384;  // elements per parallel task of ntrk_step
constexpr int64_t kRow = 512;      // elements widened into L1-resident rows at a time
constexpr int64_t kTiles = 16;     // 2OS tiles per block of the row phase and the unsort: 64 bytes of float32 ranks
// Work below this many elements runs on the calling thread: waking the pool costs more than it saves
// (and, on a busy machine, a scheduler quantum).
constexpr int64_t kParallelMin = int64_t(1) << 16;

// The grain of at::parallel_for over tasks of `per_task` elements each.
int64_t grain(int64_t per_task) { return std::max<int64_t>(1, kParallelMin / std::max<int64_t>(1, per_task)); }
constexpr const char* kStepOp = "ntrk_step";
constexpr const char* kStepBwdOp = "ntrk_step_bwd";
constexpr const char* kProjectOp = "twoos_project";

void check_floating(const char* op, const at::Tensor& t, const char* name) {
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK_VALUE(s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble, op, ": ", name,
                    " dtype must be float16, bfloat16, float32 or float64, got ", dtype_name(s));
}

// The checks python/diffkern/ntrk/op.py makes, in the same order and words.
void check_step(const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& w, const at::Tensor& rho,
                const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& philox) {
  const NamedTensor lead{"mu", &mu};
  check_latents(kStepOp, lead, {{"w", &w}, {"eps", optional_ptr(eps)}}, /*empty_rows=*/true);
  check_per_sample(kStepOp, {"sigma", &sigma}, lead);
  check_per_sample(kStepOp, {"rho", &rho}, lead);
  check_philox_state(kStepOp, philox, eps.has_value(), lead);
}

// Entry i of a float32 or float64 [B] tensor (check_per_sample), any stride, rounded to acc_t as .to(acc_t) rounds
// it: read in place, without the four conversion ops (dispatcher round trips) per call that .to().contiguous() made.
template <typename acc_t>
acc_t per_sample(const at::Tensor& v, int64_t i) {
  const int64_t k = i * v.stride(0);
  return v.scalar_type() == at::kDouble ? static_cast<acc_t>(v.const_data_ptr<double>()[k])
                                        : static_cast<acc_t>(v.const_data_ptr<float>()[k]);
}

template <typename acc_t>
std::vector<Tilt<acc_t>> tilts(const at::Tensor& sigma, const at::Tensor& rho) {
  std::vector<Tilt<acc_t>> t;
  for (int64_t i = 0; i < sigma.size(0); ++i) t.push_back(tilt(per_sample<acc_t>(sigma, i), per_sample<acc_t>(rho, i)));
  return t;
}

// Runs f(i, off, n, buf) over the rows of at most kRow elements of every (sample, chunk of kChunk) task,
// tasks in parallel: i is the sample, off the row's first element in the [B, D] latents, buf `n_buf` rows
// of the thread's L1 scratch.
template <typename acc_t, typename F>
void for_rows(int64_t B, int64_t D, int n_buf, const F& f) {
  const int64_t n_chunks = (D + kChunk - 1) / kChunk;
  at::parallel_for(0, B * n_chunks, grain(std::min(D, kChunk)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(n_buf * kRow);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / n_chunks, e0 = task % n_chunks * kChunk, e_end = std::min(D, e0 + kChunk);
      for (int64_t e = e0; e < e_end; e += kRow) f(i, i * D + e, std::min(kRow, e_end - e), buf.data());
    }
  });
}

template <typename scalar_t>
void step_kernel(const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& w, const at::Tensor& rho,
                 const std::optional<at::Tensor>& eps, uint64_t seed, uint64_t offset, at::Tensor& x) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = mu.size(0), D = B > 0 ? mu.numel() / B : 0;
  const auto coef = tilts<acc_t>(sigma, rho);
  const scalar_t *pmu = mu.const_data_ptr<scalar_t>(), *pw = w.const_data_ptr<scalar_t>(),
                 *pe = eps ? eps->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* px = x.mutable_data_ptr<scalar_t>();
  for_rows<acc_t>(B, D, 4, [&](int64_t i, int64_t off, int64_t n, acc_t* buf) {
    acc_t *bmu = buf, *bw = bmu + kRow, *be = bw + kRow, *bx = be + kRow;
    const Tilt<acc_t> c = coef[i];
    const acc_t *__restrict mr = widen(pmu + off, bmu, n), *__restrict wr = widen(pw + off, bw, n);
    const acc_t* __restrict er = be;
    if (pe != nullptr) {
      er = widen(pe + off, be, n);
    } else {
      for (int64_t j = 0; j < n; ++j) be[j] = philox::randn(seed, offset + static_cast<uint64_t>(off + j));
    }
    acc_t* __restrict xr = staging(px + off, bx);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) xr[j] = mr[j] + c.a * wr[j] + c.b * er[j];
    narrow(xr, px + off, n);
  });
}

at::Tensor ntrk_step_cpu(const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& w, const at::Tensor& rho,
                         const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& philox) {
  check_step(mu, sigma, w, rho, eps, philox);
  at::Tensor x = cache::empty(mu.sizes(), mu.options());
  // (seed, offset) as the kernel reads them: uint64, so an offset past 2^63 wraps like the counter.
  const int64_t* state = eps ? nullptr : philox->const_data_ptr<int64_t>();
  const uint64_t seed = state ? static_cast<uint64_t>(state[0]) : 0, offset = state ? static_cast<uint64_t>(state[1]) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), kStepOp, [&] {
    step_kernel<scalar_t>(mu, sigma, w, rho, eps, seed, offset, x);
  });
  return x;
}

// dw = a dx and deps = b dx (a = sigma sqrt(rho), b = sigma sqrt(1 - rho) per sample, each rounded to dx's
// dtype first: the rounding of the ATen form in csrc/diffkern/autograd_ntrk.cpp) from one read of dx; a null
// output is not computed.
template <typename scalar_t>
void step_bwd_kernel(const at::Tensor& dx, const at::Tensor& sigma, const at::Tensor& rho, at::Tensor* dw,
                     at::Tensor* deps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = dx.size(0), D = B > 0 ? dx.numel() / B : 0;
  const auto coef = tilts<acc_t>(sigma, rho);
  const scalar_t* pdx = dx.const_data_ptr<scalar_t>();
  scalar_t* pdw = dw ? dw->mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* pde = deps ? deps->mutable_data_ptr<scalar_t>() : nullptr;
  for_rows<acc_t>(B, D, 2, [&](int64_t i, int64_t off, int64_t n, acc_t* buf) {
    const acc_t* __restrict g = widen(pdx + off, buf, n);
    for (const auto& [out, factor] : {std::pair{pdw, coef[i].a}, std::pair{pde, coef[i].b}}) {
      if (out == nullptr) continue;
      const acc_t f = static_cast<scalar_t>(factor);
      acc_t* __restrict r = staging(out + off, buf + kRow);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) r[j] = f * g[j];
      narrow(r, out + off, n);
    }
  });
}

std::vector<at::Tensor> ntrk_step_bwd_cpu(const at::Tensor& dx, const at::Tensor& sigma, const at::Tensor& rho,
                                          bool w_grad, bool eps_grad) {
  const NamedTensor lead{"dx", &dx};
  check_latents(kStepBwdOp, lead, {}, /*empty_rows=*/true);
  check_per_sample(kStepBwdOp, {"sigma", &sigma}, lead);
  check_per_sample(kStepBwdOp, {"rho", &rho}, lead);
  at::Tensor dw = w_grad ? cache::empty(dx.sizes(), dx.options()) : at::Tensor();
  at::Tensor deps = eps_grad ? cache::empty(dx.sizes(), dx.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dx.scalar_type(), kStepBwdOp, [&] {
    step_bwd_kernel<scalar_t>(dx, sigma, rho, w_grad ? &dw : nullptr, eps_grad ? &deps : nullptr);
  });
  std::vector<at::Tensor> grads;
  for (const at::Tensor& t : {dw, deps})
    if (t.defined()) grads.push_back(t);
  return grads;
}

// An entry and where it came from; ordered by (value, position), NaN above every number (double; float
// entries sort as packed keys, where every NaN is canonical and above every number too).
template <typename acc_t>
struct Ranked {
  acc_t v;
  int32_t pos;
  bool operator<(const Ranked& o) const {
    if (v < o.v) return true;
    if (o.v < v) return false;
    const bool nan = v != v, o_nan = o.v != o.v;
    return nan != o_nan ? o_nan : pos < o.pos;
  }
};

// e[0, n): the n values v[0, n) with their positions, in (value, position) order. float values sort as packed
// keys (ntrk_math.h, sign bit flipped to unsigned order) by a radix sort of their value halves (radix.h: stable,
// so equal values keep their position order); double entries use std::sort on the comparison.
template <typename acc_t>
void rank(const acc_t* v, int64_t n, Ranked<acc_t>* e, std::vector<uint64_t>& keys) {
  if constexpr (std::is_same_v<acc_t, float>) {
    constexpr uint64_t kSign = uint64_t(1) << 63;
    keys.resize(2 * n);
    for (int64_t i = 0; i < n; ++i) keys[i] = static_cast<uint64_t>(packed_key(v[i], static_cast<int32_t>(i))) ^ kSign;
    cpu::radix_sort_upper32(keys.data(), keys.data() + n, n);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t key = static_cast<int64_t>(keys[i] ^ kSign);
      e[i] = {key_value(key), key_position(key)};
    }
  } else {
    for (int64_t i = 0; i < n; ++i) e[i] = {v[i], static_cast<int32_t>(i)};
    std::sort(e, e + n);
  }
}

struct Bands {
  int64_t B, M, D;
};

Bands check_project(const at::Tensor& x, const at::Tensor& lower, const at::Tensor& upper, int64_t max_passes) {
  TORCH_CHECK_VALUE(x.dim() >= 1, kProjectOp, ": x must be [B, ...], got a 0-dim tensor");
  check_floating(kProjectOp, x, "x");
  TORCH_CHECK_VALUE(x.is_contiguous(), kProjectOp, ": x must be contiguous; call .contiguous()");
  TORCH_CHECK_VALUE(lower.dim() == 2 && upper.sizes() == lower.sizes(), kProjectOp,
                    ": lower and upper must be [M, D] tables of one shape, got ", lower.sizes(), " and ",
                    upper.sizes());
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"lower", &lower}, {"upper", &upper}}) {
    check_same_device(kProjectOp, *t, name, x, "x");
    TORCH_CHECK_VALUE(t->scalar_type() == acc && t->is_contiguous(), kProjectOp, ": ", name,
                      " must be a contiguous tensor of dtype ", dtype_name(acc), " (x's accumulation dtype), got ",
                      dtype_name(t->scalar_type()));
  }
  const int64_t B = x.size(0), M = lower.size(0), D = lower.size(1);
  TORCH_CHECK_VALUE(M >= 1 && D >= 1 && D <= 32768 && M < (int64_t(1) << 31), kProjectOp,
                    ": the band table must be [M, D] with M >= 1 and 1 <= D <= 32768, got ", lower.sizes());
  TORCH_CHECK_VALUE(B == 0 || x.numel() / B == M * D, kProjectOp, ": each sample of x has ",
                    B ? x.numel() / B : 0, " entries but the band table is [M, D] = ", lower.sizes(),
                    " (M * D entries)");
  TORCH_CHECK_VALUE(max_passes >= 0, kProjectOp, ": max_passes must be >= 0, got ", max_passes);
  return {B, M, D};
}

// A thread's scratch for ranking: entries and radix keys, allocated on first use.
template <typename acc_t>
struct RankScratch {
  std::vector<Ranked<acc_t>> entries;
  std::vector<uint64_t> keys;
};

// Runs f(b, m0, nt, scratch) for each block of nt <= kTiles consecutive tiles m0.. of sample b, blocks in
// parallel.
template <typename acc_t, typename F>
void for_tile_blocks(const Bands& g, const F& f) {
  const int64_t n_blocks = (g.M + kTiles - 1) / kTiles;
  at::parallel_for(0, g.B * n_blocks, grain(kTiles * g.D), [&](int64_t begin, int64_t end) {
    RankScratch<acc_t> scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_blocks, m0 = task % n_blocks * kTiles;
      f(b, m0, std::min(kTiles, g.M - m0), scratch);
    }
  });
}

// One pass over y [B, M * D] (in place): ranks, in-band counts per sample, and the clip when `clip`.
// sorted_t [B, D, M] holds rank j of every tile as a row, so the column phase reads and writes it in place;
// the row phase and the unsort go through it a block of kTiles tiles at a time, so that its column-order
// accesses fill whole cache lines (one tile at a time they were strided by M entries, mostly cache misses).
template <typename acc_t>
std::vector<int64_t> project_pass(const Bands& g, acc_t* y, const acc_t* lo, const acc_t* hi, bool clip,
                                  std::vector<acc_t>& sorted_t, std::vector<int16_t>& perm) {
  const int64_t M = g.M, D = g.D;
  // row phase: tile (b, m) sorted; sorted_t[b, j, m] its j-th smallest, perm[b, m, j] that entry's column
  for_tile_blocks<acc_t>(g, [&](int64_t b, int64_t m0, int64_t nt, RankScratch<acc_t>& scratch) {
    std::vector<Ranked<acc_t>>& rows = scratch.entries;
    rows.resize(kTiles * D);
    for (int64_t k = 0; k < nt; ++k) {
      const int64_t t = b * M + m0 + k;
      rank(y + t * D, D, rows.data() + k * D, scratch.keys);
      for (int64_t j = 0; j < D; ++j) perm[t * D + j] = static_cast<int16_t>(rows[k * D + j].pos);
    }
    for (int64_t j = 0; j < D; ++j) {
      acc_t* dst = sorted_t.data() + (b * D + j) * M + m0;
      for (int64_t k = 0; k < nt; ++k) dst[k] = rows[k * D + j].v;
    }
  });
  // column phase: rank j of sample b sorted across tiles and clipped to its band, in place
  std::vector<int64_t> inside(g.B * D);
  at::parallel_for(0, g.B * D, grain(M), [&](int64_t begin, int64_t end) {
    RankScratch<acc_t> scratch;
    std::vector<Ranked<acc_t>>& col = scratch.entries;
    col.resize(M);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j = t % D;
      acc_t* z = sorted_t.data() + t * M;
      rank(z, M, col.data(), scratch.keys);
      int64_t n_in = 0;
      for (int64_t r = 0; r < M; ++r) {
        const acc_t v = col[r].v, l = lo[r * D + j], u = hi[r * D + j];
        n_in += (v >= l && v <= u);
        z[col[r].pos] = clip ? std::min(std::max(v, l), u) : v;
      }
      inside[t] = n_in;
    }
  });
  // unsort: entry (b, m, j) of sorted_t back to tile m's column perm[b, m, j]
  for_tile_blocks<acc_t>(g, [&](int64_t b, int64_t m0, int64_t nt, RankScratch<acc_t>&) {
    for (int64_t j = 0; j < D; ++j) {
      const acc_t* src = sorted_t.data() + (b * D + j) * M + m0;
      for (int64_t k = 0; k < nt; ++k) {
        const int64_t t = b * M + m0 + k;
        y[t * D + perm[t * D + j]] = src[k];
      }
    }
  });
  std::vector<int64_t> per_sample(g.B, 0);
  for (int64_t t = 0; t < g.B * D; ++t) per_sample[t / D] += inside[t];
  return per_sample;
}

std::tuple<at::Tensor, at::Tensor> twoos_project_cpu(const at::Tensor& x, const at::Tensor& lower,
                                                     const at::Tensor& upper, int64_t max_passes) {
  const Bands g = check_project(x, lower, upper, max_passes);
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  at::Tensor y = x.to(acc, /*non_blocking=*/false, /*copy=*/true);
  at::Tensor in_set = empty_output({g.B}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, kProjectOp, [&] {
    const int64_t N = g.M * g.D;
    std::vector<scalar_t> sorted_t(g.B * N);
    std::vector<int16_t> perm(g.B * N);
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    for (int64_t pass = 0; pass <= max_passes; ++pass) {
      // the last iteration only measures: max_passes clips at most
      const std::vector<int64_t> inside = project_pass<scalar_t>(
          g, py, lower.const_data_ptr<scalar_t>(), upper.const_data_ptr<scalar_t>(), pass < max_passes, sorted_t, perm);
      const bool all_in = std::all_of(inside.begin(), inside.end(), [&](int64_t n) { return n == N; });
      if (all_in || pass == max_passes) {
        for (int64_t b = 0; b < g.B; ++b)
          in_set.mutable_data_ptr<scalar_t>()[b] = static_cast<scalar_t>(inside[b]) / static_cast<scalar_t>(N);
        break;
      }
    }
  });
  return {y.to(x.scalar_type()), in_set};
}

}  // namespace
}  // namespace diffkern::ntrk

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("ntrk_step", TORCH_FN(diffkern::ntrk::ntrk_step_cpu));
  m.impl("ntrk_step_bwd", TORCH_FN(diffkern::ntrk::ntrk_step_bwd_cpu));
  m.impl("twoos_project", TORCH_FN(diffkern::ntrk::twoos_project_cpu));
}
