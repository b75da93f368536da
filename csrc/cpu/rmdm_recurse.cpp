// CPU forward of R-MDM's shared-block recursion (specs/rmdm.md; schema in csrc/diffkern/ops.cpp).
//
// Weights are widened to the accumulation type and packed into GEMM panels once per call
// (diffkern/rmdm_gemm.h), then reused by all n_iter * K block evaluations; the state h stays in the
// accumulation type between iterations and is rounded to x's dtype only when written to `states`.
// Per block, M = B*T rows: LN1 (+adaLN), packed QKV GEMM, softmax attention per (sample, head), packed
// output GEMM with the gated residual, LN2 (+adaLN), packed W_1 GEMM + gelu, packed W_2 GEMM + gated
// residual. Traffic per call: x and the weights read once, the n_iter states written once; the
// activations (M * (7d + f) values and B * heads * T^2 scores) live in per-call buffers that stay in
// cache at the Sudoku shapes. The training forward (rmdm_recurse_keep) is the same loop writing every
// block evaluation's intermediates into the activations its backward reads (diffkern/rmdm_acts.h).
#include <cmath>
#include <tuple>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "convert.h"
#include "diffkern/check.h"
#include "diffkern/cpu_cache.h"
#include "diffkern/cpu_exp.h"
#include "diffkern/rmdm_acts.h"
#include "diffkern/rmdm_args.h"
#include "diffkern/rmdm_gelu.h"
#include "diffkern/rmdm_gemm.h"
#include "diffkern/rmdm_math.h"

namespace diffkern::rmdm {
namespace {

// Rows per task of the row-wise passes (norms, gelu, residuals): ~16K element-ops at d = 256.
constexpr int64_t kRowGrain = 64;

template <typename acc_t>
struct Block {
  std::vector<acc_t> ln1_w, ln1_b, ln2_w, ln2_b;
  PackedWeight<acc_t> qkv, o, fc1, fc2;
};

template <typename acc_t>
struct Buffers {
  std::vector<acc_t> h, u, qkv, probs, ctx, a, z;
  void resize(int64_t B, int64_t T, int64_t d, int64_t f, int64_t heads) {
    h.resize(B * T * d), u.resize(B * T * d), qkv.resize(B * T * 3 * d), probs.resize(B * heads * T * T);
    ctx.resize(B * T * d), a.resize(B * T * d), z.resize(B * T * f);
  }
};

// Where one block evaluation writes its intermediates: the per-call buffers (inference: xhat1 null), or
// slices of the kept activations (diffkern/rmdm_acts.h), which also get the LayerNorms' normalised rows
// xhat and reciprocal deviations rstd, and (with adaLN) the ungated branch outputs a and y.
template <typename acc_t>
struct BlockOut {
  acc_t *xhat1, *rstd1, *u1, *qkv, *probs, *ctx, *a, *xhat2, *rstd2, *u2, *z, *g, *y;

  static BlockOut scratch(Buffers<acc_t>& b) {
    return {nullptr, nullptr, b.u.data(), b.qkv.data(), b.probs.data(), b.ctx.data(), b.a.data(),
            nullptr, nullptr, b.u.data(), b.z.data(), b.z.data(), b.a.data()};
  }

  static BlockOut kept(const ActsLayout& l, acc_t* acts, int64_t k, int64_t it, bool with_mod, Buffers<acc_t>& b) {
    const auto at = [&](ActField f) { return l.at(acts, k, f, it); };
    return {at(kXhat1), at(kRstd1), at(kU1), at(kQkv), at(kProbs), at(kCtx), with_mod ? at(kAttnOut) : b.a.data(),
            at(kXhat2), at(kRstd2), at(kU2), at(kSlope), at(kG), with_mod ? at(kMlpOut) : b.a.data()};
  }
};

// norm_row, also writing xhat = (h - mean) rstd and rstd when xhat is not null (the same arithmetic).
template <typename acc_t>
void norm_row_keeping(const acc_t* h, int64_t d, const acc_t* w, const acc_t* b, const acc_t* shift,
                      const acc_t* scale, acc_t eps, acc_t* u, acc_t* xhat, acc_t* rstd) {
  if (!xhat) return norm_row(h, d, w, b, shift, scale, eps, u);
  acc_t mean;
  row_moments(h, d, eps, mean, *rstd);
  const acc_t r = *rstd;
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) {
    xhat[c] = (h[c] - mean) * r;
    u[c] = scale ? (xhat[c] * w[c] + b[c]) * (acc_t(1) + scale[c]) + shift[c] : xhat[c] * w[c] + b[c];
  }
}

template <typename scalar_t, typename acc_t>
void widen_into(const scalar_t* src, acc_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::copy(src, src + n, dst);
  } else {
    cpu::widen_row(src, dst, n);
  }
}

template <typename scalar_t, typename acc_t>
std::vector<acc_t> widened(const at::Tensor& t) {
  std::vector<acc_t> out(t.numel());
  widen_into<scalar_t, acc_t>(t.const_data_ptr<scalar_t>(), out.data(), t.numel());
  return out;
}

template <typename scalar_t, typename acc_t>
void pack_blocks(at::TensorList weights, std::vector<Block<acc_t>>& blocks) {
  const auto widen = [](const scalar_t* s, acc_t* d, int64_t n) { widen_into<scalar_t, acc_t>(s, d, n); };
  blocks.resize(weights.size() / kBlockParams);
  for (size_t k = 0; k < blocks.size(); ++k) {
    const at::Tensor* w = weights.data() + k * kBlockParams;
    Block<acc_t>& blk = blocks[k];
    blk.ln1_w = widened<scalar_t, acc_t>(w[kLn1W]), blk.ln1_b = widened<scalar_t, acc_t>(w[kLn1B]);
    blk.ln2_w = widened<scalar_t, acc_t>(w[kLn2W]), blk.ln2_b = widened<scalar_t, acc_t>(w[kLn2B]);
    const auto pack = [&](PackedWeight<acc_t>& p, Param wi, Param bi) {
      p.pack(w[wi].const_data_ptr<scalar_t>(), w[bi].const_data_ptr<scalar_t>(), w[wi].size(0), w[wi].size(1), widen);
    };
    pack(blk.qkv, kWqkv, kBqkv), pack(blk.o, kWo, kBo), pack(blk.fc1, kW1, kB1), pack(blk.fc2, kW2, kB2);
  }
}

// The calling thread's packed weights and activation buffers. They are refilled by every call (the
// weights are packed once per call) but their storage is kept between calls: allocating the ~6 MB of
// packed panels afresh costs a page fault per 4 KB, a tenth of a B=1 Sudoku step.
template <typename acc_t>
struct Workspace {
  std::vector<Block<acc_t>> blocks;
  Buffers<acc_t> buf;
};

template <typename acc_t>
Workspace<acc_t>& workspace() {
  static thread_local Workspace<acc_t> ws;
  return ws;
}

// p <- softmax(p) over one row of n: exp(p - max p) (every exponent <= 0, diffkern/cpu_exp.h), then times 1 / sum.
template <typename acc_t>
void softmax_row(acc_t* p, int64_t n) {
  acc_t m = p[0], sum = 0;
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < n; ++c) m = p[c] > m ? p[c] : m;  // vectorises (std::max's NaN order would not)
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) {
    p[c] = exp_nonpositive(p[c] - m);
    sum += p[c];
  }
  const acc_t r = acc_t(1) / sum;
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) p[c] *= r;
}

// ctx = softmax(q k^T / sqrt(dh)) v for every (sample, head), q/k/v read from the [M, 3d] qkv buffer, one task per
// head: k^T (scaled) packed into panels, the scores written to the head's `probs` [T, T] by the packed micro-kernel
// and turned into probabilities row by row there, then the product with v (read in place where a head's width is
// whole panels: diffkern/rmdm_gemm.h's rows_operand; else packed) while they are in L1.
template <typename acc_t>
void attention(const acc_t* qkv, int64_t B, int64_t T, int64_t d, int64_t heads, acc_t* probs, acc_t* ctx) {
  const int64_t dh = d / heads;
  const acc_t scale = acc_t(1) / std::sqrt(acc_t(dh));
  at::parallel_for(0, B * heads, 1, [&](int64_t begin, int64_t end) {
    PackedWeight<acc_t> kt, v;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, hd = bh % heads;
      const acc_t* q = qkv + b * T * 3 * d + hd * dh;
      acc_t* p = probs + bh * T * T;
      kt.pack_strided(q + d, T, dh, 3 * d, 1, scale);
      packed_linear(q, T, 3 * d, kt, p, T);
      for (int64_t i = 0; i < T; ++i) softmax_row(p + i * T, T);
      packed_linear(p, T, T, rows_operand(q + 2 * d, T, dh, 3 * d, v), ctx + b * T * d + hd * dh, d);
    }
  });
}

// Calls f(b, row) for every row of M = B*T in parallel.
template <typename F>
void for_rows(int64_t B, int64_t T, const F& f) {
  at::parallel_for(0, B * T, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r / T, r);
  });
}

// One pre-norm block on buf.h in place, its intermediates written to `o`; mod (nullable) points at this
// block's [6, d] of sample 0, sample b's at mod + b * mod_stride.
template <typename acc_t>
void block_forward(const Block<acc_t>& w, const acc_t* mod, int64_t mod_stride, const Geometry& g, acc_t eps,
                   Buffers<acc_t>& buf, const BlockOut<acc_t>& o) {
  const int64_t d = g.d, f = g.f, M = g.B * g.T;
  const auto part = [&](int64_t b, ModPart p) { return mod ? mod + b * mod_stride + p * d : nullptr; };
  const auto keep = [&](acc_t* p, int64_t r, int64_t width) { return p ? p + r * width : nullptr; };
  for_rows(g.B, g.T, [&](int64_t b, int64_t r) {
    norm_row_keeping(buf.h.data() + r * d, d, w.ln1_w.data(), w.ln1_b.data(), part(b, kShift1), part(b, kScale1),
                     eps, o.u1 + r * d, keep(o.xhat1, r, d), keep(o.rstd1, r, 1));
  });
  packed_linear(o.u1, M, d, w.qkv, o.qkv, 3 * d);
  attention(o.qkv, g.B, g.T, d, g.heads, o.probs, o.ctx);
  packed_linear(o.ctx, M, d, w.o, o.a, d);
  for_rows(g.B, g.T, [&](int64_t b, int64_t r) {
    acc_t* h = buf.h.data() + r * d;
    gated_add(h, o.a + r * d, part(b, kGate1), d);
    norm_row_keeping(h, d, w.ln2_w.data(), w.ln2_b.data(), part(b, kShift2), part(b, kScale2), eps, o.u2 + r * d,
                     keep(o.xhat2, r, d), keep(o.rstd2, r, 1));
  });
  packed_linear(o.u2, M, d, w.fc1, o.z, f);
  // g = gelu(z), the exact (erf) gelu reference.block applies (diffkern/rmdm_gelu.h): inference writes it over z;
  // training writes it to its own field and overwrites z with the slope gelu'(z) that the backward reads
  const bool keep_slope = o.g != o.z;
  at::parallel_for(0, M, kRowGrain, [&](int64_t begin, int64_t end) {
    acc_t *z = o.z + begin * f, *gz = o.g + begin * f;
    const int64_t n = (end - begin) * f;
    keep_slope ? gelu_rows<true>(z, n, gz, z) : gelu_rows<false>(z, n, gz, z);
  });
  packed_linear(o.g, M, f, w.fc2, o.y, d);
  for_rows(g.B, g.T, [&](int64_t b, int64_t r) {
    gated_add(buf.h.data() + r * d, o.y + r * d, part(b, kGate2), d);
  });
}

// acts (nullable): where the training forward keeps the activations, laid out by `layout`.
template <typename scalar_t>
void recurse_kernel(const Geometry& g, const at::Tensor& x, at::TensorList weights, const at::Tensor* mod,
                    int64_t n_iter, double eps, at::Tensor& states, at::opmath_type<scalar_t>* acts,
                    const ActsLayout& layout) {
  using acc_t = at::opmath_type<scalar_t>;
  Workspace<acc_t>& ws = workspace<acc_t>();
  pack_blocks<scalar_t, acc_t>(weights, ws.blocks);
  const std::vector<Block<acc_t>>& blocks = ws.blocks;
  const std::vector<acc_t> m = mod ? widened<scalar_t, acc_t>(*mod) : std::vector<acc_t>();
  const int64_t M = g.B * g.T, K = static_cast<int64_t>(blocks.size()), mod_stride = K * kMod * g.d;
  Buffers<acc_t>& buf = ws.buf;
  buf.resize(g.B, g.T, g.d, g.f, g.heads);
  widen_into<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), buf.h.data(), M * g.d);
  scalar_t* out = states.mutable_data_ptr<scalar_t>();
  for (int64_t it = 0; it < n_iter; ++it) {
    for (int64_t k = 0; k < K; ++k) {
      const BlockOut<acc_t> o = acts ? BlockOut<acc_t>::kept(layout, acts, k, it, mod != nullptr, buf)
                                     : BlockOut<acc_t>::scratch(buf);
      block_forward(blocks[k], mod ? m.data() + k * kMod * g.d : nullptr, mod_stride, g, acc_t(eps), buf, o);
    }
    scalar_t* dst = out + it * M * g.d;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      std::copy(buf.h.begin(), buf.h.end(), dst);
    } else {
      cpu::narrow_row(buf.h.data(), dst, M * g.d);
    }
  }
}

at::Tensor rmdm_recurse_cpu(const at::Tensor& x, at::TensorList weights, const std::optional<at::Tensor>& mod,
                            int64_t n_iter, int64_t heads, double eps) {
  const Geometry g = check_recurse(x, weights, mod, n_iter, heads, eps);
  at::Tensor states = empty_output({n_iter, g.B, g.T, g.d}, x.options());
  if (g.B * g.T == 0) return states;
  const ActsLayout none(0, 0, 0, 0, 0, 0, false);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rmdm_recurse", [&] {
    recurse_kernel<scalar_t>(g, x, weights, mod ? &*mod : nullptr, n_iter, eps, states, nullptr, none);
  });
  return states;
}

// The training forward: the states and the activations rmdm_recurse_keep_bwd reads (diffkern/rmdm_acts.h), in
// the accumulation type (float32, float64 for float64 x).
std::tuple<at::Tensor, at::Tensor> rmdm_recurse_keep_cpu(const at::Tensor& x, at::TensorList weights,
                                                         const std::optional<at::Tensor>& mod, int64_t n_iter,
                                                         int64_t heads, double eps) {
  const Geometry g = check_recurse(x, weights, mod, n_iter, heads, eps);
  at::Tensor states = empty_output({n_iter, g.B, g.T, g.d}, x.options());
  const ActsLayout layout(g.B, g.T, g.d, g.f, g.heads, n_iter, mod.has_value());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // from the CPU output cache (diffkern/cpu_cache.h): a fresh block of tens of MB faulted in every page each
  // step, a third of a B=1 Sudoku training step; the last step's block is reused once autograd released it
  at::Tensor acts = cache::empty({layout.numel(g.K)}, x.options().dtype(acc));
  if (g.B * g.T == 0) return {states, acts};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rmdm_recurse_keep", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    recurse_kernel<scalar_t>(g, x, weights, mod ? &*mod : nullptr, n_iter, eps, states,
                             acts.mutable_data_ptr<acc_t>(), layout);
  });
  return {states, acts};
}

}  // namespace
}  // namespace diffkern::rmdm

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("rmdm_recurse", TORCH_FN(diffkern::rmdm::rmdm_recurse_cpu));
  m.impl("rmdm_recurse_keep", TORCH_FN(diffkern::rmdm::rmdm_recurse_keep_cpu));
}
