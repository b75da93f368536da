// CPU backward of R-MDM's shared-block recursion from the activations its training forward kept
// (rmdm_recurse_keep_bwd; schema in csrc/diffkern/ops.cpp, layout in diffkern/rmdm_acts.h).
//
// Nothing is recomputed. Iterations and blocks are walked backwards; each block's input gradient is formed
// from the kept activations: the input-gradient GEMMs dx = dy W on ATen's GEMM (W as stored, [n_out, n_in]),
// attention's backward on the forward kernel's packed micro-kernel (diffkern/rmdm_gemm.h), gelu's backward a
// product with the slope gelu'(z) the forward kept, the softmax and LayerNorm backward per row. The gradients
// reaching each matrix's output (dy) are kept for all iterations, so each weight gradient is one GEMM over the
// n_iter * B * T rows of all iterations (dW = dy^T x on ATen's GEMM) after the walk, instead of one per iteration
// over B * T rows; the bias gradients (db = the column sums of dy) are summed during the walk, in the pass that
// writes each dy (attention's dqkv, written per head, in a pass of its own), in an order that does not depend on the
// thread count (summed_rows). ATen's GEMM (MKL's here) beat the packed micro-kernel on these products at the Sudoku
// shapes: dW's reduction runs over rows the micro-kernel reads by columns, and dy W needed W packed transposed every
// call.
// Everything runs in the accumulation type; the outputs are rounded to x's dtype once.
#include <cmath>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "diffkern/check.h"
#include "diffkern/cpu_cache.h"
#include "diffkern/rmdm_adaln_grad.h"
#include "diffkern/rmdm_acts.h"
#include "diffkern/rmdm_args.h"
#include "diffkern/rmdm_gemm.h"
#include "diffkern/rmdm_math.h"

namespace diffkern::rmdm {
namespace {

constexpr int64_t kRowGrain = 16;  // rows per task of the per-row passes (B*T = 81 rows: 6 tasks to balance)

// The output gradients kept per block for the weight gradients, [n_iter * M, width] each, in this order.
enum DyField : int { kDqkv, kDattn, kDz, kDmlp, kDyFields };

// A block's tensors in the accumulation type (the caller's own where they already are).
template <typename acc_t>
struct BlockWeights {
  at::Tensor p[kBlockParams];

  void load(const at::Tensor* w, at::ScalarType acc) {
    for (int i = 0; i < kBlockParams; ++i) p[i] = w[i].to(acc).contiguous();
  }

  const acc_t* operator[](Param i) const { return p[i].const_data_ptr<acc_t>(); }
};

template <typename acc_t>
at::Tensor view(const acc_t* p, at::IntArrayRef sizes) {
  return at::from_blob(const_cast<acc_t*>(p), sizes, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// One call's state: geometry, kept activations and output gradients, and the accumulated gradients.
template <typename acc_t>
struct Backward {
  Geometry g;
  int64_t M, n_iter;
  ActsLayout layout;
  const acc_t* acts;
  const acc_t* mod;                        // [B, K, 6, d] in acc_t, or null
  at::Tensor dm;                           // [B, K, 6, d] or undefined
  const BlockWeights<acc_t>* w;             // [K]
  std::vector<std::vector<at::Tensor>> dw;  // per block, by Param: the LayerNorm and bias gradients (summed in the walk)
  at::Tensor dy;                           // [K, kDyFields blocks of n_iter * M * width]
  at::Tensor scratch_d, scratch_d2, scratch_f;
  std::vector<acc_t> partials;              // summed_rows' [tasks, width] partial sums

  int64_t dy_width(int f) const { return f == kDqkv ? 3 * g.d : f == kDz ? g.f : g.d; }
  int64_t dy_block() const { return n_iter * M * (5 * g.d + g.f); }
  acc_t* dy_at(int64_t k, DyField f, int64_t it = 0) {
    int64_t off = k * dy_block();
    for (int i = 0; i < f; ++i) off += n_iter * M * dy_width(i);
    return dy.mutable_data_ptr<acc_t>() + off + it * M * dy_width(f);
  }
  const acc_t* act(int64_t k, ActField f, int64_t it) const { return layout.at(acts, k, f, it); }
  const acc_t* mod_part(int64_t b, int64_t k, ModPart p) const {
    return mod + ((b * g.K + k) * kMod + p) * g.d;
  }

  // Calls row(r, part) for the M rows in tasks of kRowGrain rows, `part` the task's own zeroed [width] partial
  // sums, then adds the tasks' partials in task order and returns the result (partials' first row): sums in an
  // order that does not depend on the thread count.
  template <typename F>
  const acc_t* summed_rows(int64_t width, const F& row) {
    const int64_t tasks = (M + kRowGrain - 1) / kRowGrain;
    partials.assign(tasks * width, acc_t(0));
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t r = t * kRowGrain; r < std::min(M, (t + 1) * kRowGrain); ++r) row(r, partials.data() + t * width);
    });
    acc_t* total = partials.data();
    for (int64_t t = 1; t < tasks; ++t) {
      const acc_t* part = total + t * width;
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) total[c] += part[c];
    }
    return total;
  }

  // grad[c] += sums[c] for the n values of one of dw's gradients.
  void accumulate(int64_t k, Param i, const acc_t* sums, int64_t n) {
    acc_t* grad = dw[k][i].mutable_data_ptr<acc_t>();
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) grad[c] += sums[c];
  }

  // out[r] = gate_b * in[r] (gate null: a copy) for the M rows, and its column sums added to bias `b`'s gradient in
  // the same pass; with adaLN, dm's gate += sum_t in * branch.
  void gate(int64_t k, ModPart p, const acc_t* in, const acc_t* branch, acc_t* out, Param b) {
    const int64_t d = g.d;
    if (mod) {
      at::Tensor dm_k = dm.select(1, k);
      gate_backward(view(in, {g.B, g.T, d}), view(branch, {g.B, g.T, d}), p, dm_k);
    }
    accumulate(k, b, summed_rows(d, [&](int64_t r, acc_t* part) {
      const acc_t* gt = mod ? mod_part(r / g.T, k, p) : nullptr;
      const acc_t* src = in + r * d;
      acc_t* dst = out + r * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) dst[c] = gt ? gt[c] * src[c] : src[c], part[c] += dst[c];
    }), d);
  }

  // The gradient through u = (xhat w + b)(1 + scale) + shift, xhat = (h - mean) rstd, added to dh; du is
  // overwritten. Accumulates the LayerNorm weight and bias gradients and (adaLN) the shift and scale ones.
  void norm_backward(int64_t k, int64_t it, ActField xhat_f, ActField rstd_f, Param lw, Param lb, ModPart shift,
                     acc_t* du, acc_t* dh) {
    const int64_t d = g.d;
    const acc_t *xhat = act(k, xhat_f, it), *rstd = act(k, rstd_f, it), *wt = w[k][lw];
    if (mod) {
      at::Tensor du_t = view(du, {g.B, g.T, d}), dm_k = dm.select(1, k);
      modulation_backward(du_t, view(xhat, {g.B, g.T, d}) * w[k].p[lw] + w[k].p[lb],
                          view(mod, {g.B, g.K, kMod, d}).select(1, k), shift, dm_k);
    }
    // the weight and bias gradients: the column sums of du * xhat and of du, in the same pass
    const acc_t* sums = summed_rows(2 * d, [&](int64_t r, acc_t* part) {
      const acc_t *dl = du + r * d, *xh = xhat + r * d;
      acc_t s1, s2;
      norm_grad_sums(dl, wt, xh, d, s1, s2);
      const acc_t m1 = s1 / acc_t(d), m2 = s2 / acc_t(d), rs = rstd[r];
      acc_t *o = dh + r * d, *gw = part, *gb = part + d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) {
        o[c] += rs * (dl[c] * wt[c] - m1 - xh[c] * m2);
        gw[c] += dl[c] * xh[c], gb[c] += dl[c];
      }
    });
    accumulate(k, lw, sums, d);
    accumulate(k, lb, sums + d, d);
  }

  // dctx [M, d] -> dqkv [M, 3d] through ctx = softmax(q k^T / sqrt(dh)) v, per (sample, head) on the packed
  // micro-kernel as in the forward: dP = dctx V^T, dS = P (dP - rowsum(dP P)) / sqrt(dh), dQ = dS K,
  // dK = dS^T Q, dV = P^T dctx (the transposed left operands read in place by columns; the right ones read in place
  // where a head's rows are whole panels, diffkern/rmdm_gemm.h's rows_operand, V^T packed).
  void attention_backward(int64_t k, int64_t it, const acc_t* dctx, acc_t* dqkv) {
    const int64_t T = g.T, H = g.heads, d = g.d, dh = d / H;
    const acc_t scale = acc_t(1) / std::sqrt(acc_t(dh));
    const acc_t *qkv = act(k, kQkv, it), *probs = act(k, kProbs, it);
    at::parallel_for(0, g.B * H, 1, [&](int64_t begin, int64_t end) {
      PackedWeight<acc_t> w;
      std::vector<acc_t> ds(T * T);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        const acc_t* q = qkv + b * T * 3 * d + h * dh;  // row stride 3d; k at q + d, v at q + 2d
        const acc_t* p = probs + bh * T * T;
        const acc_t* dc = dctx + b * T * d + h * dh;
        acc_t* out = dqkv + b * T * 3 * d + h * dh;
        w.pack_strided(q + 2 * d, T, dh, 3 * d, 1, acc_t(1));
        packed_linear(dc, T, d, w, ds.data(), T);
        for (int64_t i = 0; i < T; ++i) {
          acc_t* r = ds.data() + i * T;
          const acc_t* pr = p + i * T;
          acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t j = 0; j < T; ++j) dot += r[j] * pr[j];
#pragma omp simd
          for (int64_t j = 0; j < T; ++j) r[j] = pr[j] * (r[j] - dot) * scale;
        }
        packed_linear(ds.data(), T, T, rows_operand(q + d, T, dh, 3 * d, w), out, 3 * d);
        packed_linear<Layout::kCols>(ds.data(), T, T, rows_operand(q, T, dh, 3 * d, w), out + d, 3 * d);
        packed_linear<Layout::kCols>(p, T, T, rows_operand(dc, T, dh, d, w), out + 2 * d, 3 * d);
      }
    });
  }

  // dx [M, n_in] = dy [M, n_out] W for W [n_out, n_in] in the accumulation type.
  void input_grad(const acc_t* dy_rows, const at::Tensor& W, acc_t* dx) {
    at::Tensor out = view(dx, {M, W.size(1)});
    at::mm_out(out, view(dy_rows, {M, W.size(0)}), W);
  }

  // One block evaluation's backward: dh [M, d] holds the gradient of its output and receives its input's.
  void block(int64_t k, int64_t it, acc_t* dh) {
    const int64_t f = g.f;
    const BlockWeights<acc_t>& wk = w[k];
    acc_t *du = scratch_d.mutable_data_ptr<acc_t>(), *dctx = scratch_d2.mutable_data_ptr<acc_t>();
    acc_t *dmlp = dy_at(k, kDmlp, it), *dz = dy_at(k, kDz, it), *dattn = dy_at(k, kDattn, it);
    acc_t* dqkv = dy_at(k, kDqkv, it);
    acc_t* dg = scratch_f.mutable_data_ptr<acc_t>();
    const acc_t* slope = act(k, kSlope, it);
    gate(k, kGate2, dh, mod ? act(k, kMlpOut, it) : nullptr, dmlp, kB2);
    input_grad(dmlp, wk.p[kW2], dg);
    // dz = dg gelu'(z) (the slope the forward kept), summed into b_1's gradient in the same pass
    accumulate(k, kB1, summed_rows(f, [&](int64_t r, acc_t* part) {
      const acc_t *dg_r = dg + r * f, *slope_r = slope + r * f;
      acc_t* dz_r = dz + r * f;
#pragma omp simd
      for (int64_t c = 0; c < f; ++c) dz_r[c] = dg_r[c] * slope_r[c], part[c] += dz_r[c];
    }), f);
    input_grad(dz, wk.p[kW1], du);
    norm_backward(k, it, kXhat2, kRstd2, kLn2W, kLn2B, kShift2, du, dh);
    gate(k, kGate1, dh, mod ? act(k, kAttnOut, it) : nullptr, dattn, kBo);
    input_grad(dattn, wk.p[kWo], dctx);
    attention_backward(k, it, dctx, dqkv);
    accumulate(k, kBqkv, summed_rows(3 * g.d, [&](int64_t r, acc_t* part) {
      const acc_t* row = dqkv + r * 3 * g.d;
#pragma omp simd
      for (int64_t c = 0; c < 3 * g.d; ++c) part[c] += row[c];
    }), 3 * g.d);
    input_grad(dqkv, wk.p[kWqkv], du);
    norm_backward(k, it, kXhat1, kRstd1, kLn1W, kLn1B, kShift1, du, dh);
  }

  // dW = dy^T x over all iterations' rows: dy field f, input x of block k.
  at::Tensor weight_grad(int64_t k, DyField f, ActField x) {
    const int64_t rows = n_iter * M, n = dy_width(f), n_in = layout.width[x];
    const at::Tensor dy_all = view(dy_at(k, f), {rows, n});
    // from the CPU output cache: a fresh [n, n_in] output (up to 1 MB here) faulted in its pages on every call, 5% of a
    // B=1 Sudoku training step
    at::Tensor dw = cache::empty({n, n_in}, dy_all.options());
    return at::mm_out(dw, dy_all.t(), view(act(k, x, 0), {rows, n_in}));
  }
};

template <typename scalar_t>
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> keep_bwd_kernel(
    const Geometry& geo, const at::Tensor& dstates, const at::Tensor& x, const at::Tensor& acts,
    at::TensorList weights, const std::optional<at::Tensor>& mod, int64_t n_iter) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const auto opts = x.options().dtype(acc);
  Backward<acc_t> bw{geo, geo.B * geo.T, n_iter, ActsLayout(geo.B, geo.T, geo.d, geo.f, geo.heads, n_iter, mod.has_value()),
                     acts.const_data_ptr<acc_t>(), nullptr};
  const at::Tensor m = mod ? mod->to(acc).contiguous() : at::Tensor();
  if (mod) bw.mod = m.const_data_ptr<acc_t>(), bw.dm = at::zeros(m.sizes(), opts);
  std::vector<BlockWeights<acc_t>> ws(geo.K);
  bw.w = ws.data();
  for (int64_t k = 0; k < geo.K; ++k) {
    ws[k].load(weights.data() + k * kBlockParams, acc);
    bw.dw.emplace_back(kBlockParams);
    for (Param i : {kLn1W, kLn1B, kLn2W, kLn2B, kBo, kB2}) bw.dw[k][i] = at::zeros({geo.d}, opts);
    bw.dw[k][kBqkv] = at::zeros({3 * geo.d}, opts), bw.dw[k][kB1] = at::zeros({geo.f}, opts);
  }
  bw.dy = cache::empty({geo.K * bw.dy_block()}, opts);  // both reused across calls: diffkern/cpu_cache.h
  const at::Tensor scratch = cache::empty({bw.M * (2 * geo.d + geo.f)}, opts);
  bw.scratch_d = scratch.narrow(0, 0, bw.M * geo.d).view({bw.M, geo.d});
  bw.scratch_d2 = scratch.narrow(0, bw.M * geo.d, bw.M * geo.d).view({bw.M, geo.d});
  bw.scratch_f = scratch.narrow(0, 2 * bw.M * geo.d, bw.M * geo.f).view({bw.M, geo.f});
  at::Tensor dh = at::zeros({bw.M, geo.d}, opts);
  for (int64_t it = n_iter - 1; it >= 0; --it) {
    dh.add_(dstates[it].reshape({bw.M, geo.d}));
    for (int64_t k = geo.K - 1; k >= 0; --k) bw.block(k, it, dh.mutable_data_ptr<acc_t>());
  }
  std::vector<at::Tensor> dweights;
  for (int64_t k = 0; k < geo.K; ++k) {
    std::vector<at::Tensor>& dw = bw.dw[k];
    dw[kWqkv] = bw.weight_grad(k, kDqkv, kU1), dw[kWo] = bw.weight_grad(k, kDattn, kCtx);
    dw[kW1] = bw.weight_grad(k, kDz, kU2), dw[kW2] = bw.weight_grad(k, kDmlp, kG);
    for (int i = 0; i < kBlockParams; ++i) dweights.push_back(dw[i].to(x.scalar_type()));
  }
  return {dh.view(x.sizes()).to(x.scalar_type()), dweights,
          mod ? bw.dm.to(x.scalar_type()) : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> rmdm_recurse_keep_bwd_cpu(
    const at::Tensor& dstates, const at::Tensor& x, const at::Tensor& states, const at::Tensor& acts,
    at::TensorList weights, const std::optional<at::Tensor>& mod, int64_t heads, double eps) {
  // Nothing here is recorded: the op runs under grad mode when its caller asked for create_graph (refused as a
  // double backward on its outputs), where ATen's out= GEMMs would reject the weights that require grad.
  at::AutoDispatchBelowADInplaceOrView guard;
  const Geometry g = check_bwd(dstates, x, states, weights, mod, heads, eps);
  const int64_t n_iter = states.size(0);
  const ActsLayout layout(g.B, g.T, g.d, g.f, g.heads, n_iter, mod.has_value());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(acts.dim() == 1 && acts.size(0) == layout.numel(g.K) && acts.scalar_type() == acc &&
                        acts.is_contiguous() && acts.device() == x.device(),
                    kOp, ": acts must be the contiguous ", dtype_name(acc), " [", layout.numel(g.K),
                    "] tensor rmdm_recurse_keep returned for these arguments, got ", dtype_name(acts.scalar_type()),
                    " of shape ", acts.sizes());
  if (g.B * g.T == 0) {
    std::vector<at::Tensor> dweights;
    for (const auto& w : weights) dweights.push_back(at::zeros_like(w));
    return {at::zeros_like(x), dweights, mod ? at::zeros_like(*mod) : at::empty({0}, x.options())};
  }
  std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rmdm_recurse_keep_bwd", [&] {
    out = keep_bwd_kernel<scalar_t>(g, dstates, x, acts, weights, mod, n_iter);
  });
  return out;
}

}  // namespace
}  // namespace diffkern::rmdm

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("rmdm_recurse_keep_bwd", TORCH_FN(diffkern::rmdm::rmdm_recurse_keep_bwd_cpu));
}
