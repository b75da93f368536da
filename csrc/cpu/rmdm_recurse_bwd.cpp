// Backward of R-MDM's shared-block recursion (specs/rmdm.md; schema in csrc/diffkern/ops.cpp), for CPU and
// CUDA tensors alike: it is written in ATen ops only, so it is both the CPU kernel of rmdm_recurse_bwd and
// the GPU backend rmdm_recurse_bwd_cuda (cuBLAS GEMMs, ATen's softmax / gelu / layer-norm backward kernels).
//
// Iterations are walked backwards. Iteration k is re-run from its saved input (x or states[k-2]) with
// its intermediates kept for its K blocks only, then differentiated block by block with hand-written
// formulas, so memory is one iteration's activations plus the saved states. Everything is computed in
// the accumulation type (float32 for half/bfloat16 inputs) with ATen's kernels for the device; the
// weight gradients accumulate over all iterations and are rounded to the weights' dtype once.
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "diffkern/check.h"
#include "diffkern/rmdm_adaln_grad.h"
#include "diffkern/rmdm_args.h"
#include "diffkern/rmdm_gemm.h"
#include "diffkern/rmdm_math.h"

namespace diffkern::rmdm {
namespace {

// A weight W [n, k] and bias b applied at every iteration: y = x W^T + b for the recomputation and dx = dy W
// for the input gradient. On CPU both orientations are packed once per backward call into the forward
// kernel's GEMM panels (diffkern/rmdm_gemm.h) and reused by all n_iter iterations; elsewhere ATen's GEMMs.
class Linear {
 public:
  Linear(at::Tensor w, at::Tensor b) : w_(std::move(w)), b_(std::move(b)) {
    if (!w_.is_cpu()) return;
    AT_DISPATCH_FLOATING_TYPES(w_.scalar_type(), "rmdm_recurse_bwd_pack", [&] {
      auto& [y, dx] = packed<scalar_t>();
      const scalar_t* w = w_.const_data_ptr<scalar_t>();
      const int64_t n = w_.size(0), k = w_.size(1);
      y.pack_strided(w, n, k, k, 1, scalar_t(1));
      const scalar_t* bias = b_.const_data_ptr<scalar_t>();
      y.bias.assign(bias, bias + n);
      dx.pack_strided(w, k, n, 1, k, scalar_t(1));
    });
  }

  at::Tensor operator()(const at::Tensor& x) const {  // x W^T + b
    return w_.is_cpu() ? apply(x, 0, w_.size(0)) : at::linear(x, w_, b_);
  }

  at::Tensor input_grad(const at::Tensor& dy) const {  // dy W
    return w_.is_cpu() ? apply(dy, 1, w_.size(1)) : at::matmul(dy, w_);
  }

 private:
  template <typename acc_t>
  std::pair<PackedWeight<acc_t>, PackedWeight<acc_t>>& packed() const {
    if constexpr (std::is_same_v<acc_t, double>) {
      return f64_;
    } else {
      return f32_;
    }
  }

  at::Tensor apply(const at::Tensor& x, int which, int64_t n_out) const {
    const at::Tensor a = x.contiguous();
    std::vector<int64_t> shape(a.sizes().begin(), a.sizes().end());
    const int64_t n_in = shape.back(), M = a.numel() / n_in;
    shape.back() = n_out;
    at::Tensor y = at::empty(shape, a.options());
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "rmdm_recurse_bwd_linear", [&] {
      const auto& pair = packed<scalar_t>();
      packed_linear(a.const_data_ptr<scalar_t>(), M, n_in, which ? pair.second : pair.first,
                    y.mutable_data_ptr<scalar_t>(), n_out);
    });
    return y;
  }

  at::Tensor w_, b_;
  mutable std::pair<PackedWeight<float>, PackedWeight<float>> f32_;
  mutable std::pair<PackedWeight<double>, PackedWeight<double>> f64_;
};

// The four matrices of one block, in the accumulation type.
struct Linears {
  Linear qkv, o, fc1, fc2;
  explicit Linears(const std::vector<at::Tensor>& w)
      : qkv(w[kWqkv], w[kBqkv]), o(w[kWo], w[kBo]), fc1(w[kW1], w[kB1]), fc2(w[kW2], w[kB2]) {}
};

// One block's intermediates, [B, T, .] in the accumulation type.
struct Saved {
  at::Tensor h, mean1, rstd1, ln1, u1, q, k, v, p, ctx, a, h_mid, mean2, rstd2, ln2, u2, z, g, y;
};

// ln (1 + scale) + shift with this block's modulation m [B, 6, d] (undefined: no adaLN).
at::Tensor modulate(const at::Tensor& ln, const at::Tensor& m, ModPart shift) {
  return m.defined() ? ln * (m.select(1, shift + 1).unsqueeze(1) + 1) + m.select(1, shift).unsqueeze(1) : ln;
}

at::Tensor gated(const at::Tensor& y, const at::Tensor& m, ModPart gate) {
  return m.defined() ? y * m.select(1, gate).unsqueeze(1) : y;
}

// One block re-run with its intermediates kept; w: its 12 weights in the accumulation type, lin its matrices.
Saved block_forward(const at::Tensor& h, const std::vector<at::Tensor>& w, const Linears& lin, const at::Tensor& m,
                    int64_t heads, double eps) {
  const int64_t B = h.size(0), T = h.size(1), d = h.size(2);
  Saved s;
  s.h = h;
  std::tie(s.ln1, s.mean1, s.rstd1) = at::native_layer_norm(h, {d}, w[kLn1W], w[kLn1B], eps);
  s.u1 = modulate(s.ln1, m, kShift1);
  const auto qkv = lin.qkv(s.u1).view({B, T, 3, heads, d / heads}).permute({2, 0, 3, 1, 4});
  s.q = qkv[0], s.k = qkv[1], s.v = qkv[2];
  s.p = at::_softmax(at::matmul(s.q, s.k.transpose(-1, -2)) / std::sqrt(double(d / heads)), -1, false);
  s.ctx = at::matmul(s.p, s.v).transpose(1, 2).reshape({B, T, d});
  s.a = lin.o(s.ctx);
  s.h_mid = h + gated(s.a, m, kGate1);
  std::tie(s.ln2, s.mean2, s.rstd2) = at::native_layer_norm(s.h_mid, {d}, w[kLn2W], w[kLn2B], eps);
  s.u2 = modulate(s.ln2, m, kShift2);
  s.z = lin.fc1(s.u2);
  s.g = at::gelu(s.z);
  s.y = lin.fc2(s.g);
  return s;
}

// dy [B, T, n] of y = x W^T + b: accumulates dW, db and returns dx.
at::Tensor linear_backward(const at::Tensor& dy, const at::Tensor& x, const Linear& W, at::Tensor& dW,
                           at::Tensor& db) {
  const auto dy2 = dy.reshape({-1, dy.size(-1)}), x2 = x.reshape({-1, x.size(-1)});
  dW.addmm_(dy2.t(), x2);
  db.add_(dy2.sum(0));
  return W.input_grad(dy);
}

// Gradient through u = LN(h)(1 + scale) + shift: accumulates the LN weight/bias and mod grads, returns dh.
// du is a temporary of the caller's: the modulation's backward overwrites it.
at::Tensor norm_backward(at::Tensor du, const at::Tensor& h, const at::Tensor& ln, const at::Tensor& mean,
                         const at::Tensor& rstd, const at::Tensor& lw, const at::Tensor& lb, const at::Tensor& m,
                         ModPart shift, at::Tensor& dlw, at::Tensor& dlb, at::Tensor& dm) {
  if (m.defined()) modulation_backward(du, ln, m, shift, dm);
  auto [dh, dw, db] = at::native_layer_norm_backward(du, h, {h.size(-1)}, mean, rstd, lw, lb, {true, true, true});
  dlw.add_(dw), dlb.add_(db);
  return dh;
}

// dout -> dh of one block; accumulates into dw (12 tensors) and dm ([B, 6, d] or undefined).
at::Tensor block_backward(const at::Tensor& dout, const Saved& s, const std::vector<at::Tensor>& w, const Linears& lin,
                          const at::Tensor& m,
                          std::vector<at::Tensor>& dw, at::Tensor& dm) {
  const int64_t B = s.h.size(0), T = s.h.size(1), d = s.h.size(2), dh_size = s.q.size(-1);
  if (m.defined()) gate_backward(dout, s.y, kGate2, dm);
  const auto dg = linear_backward(gated(dout, m, kGate2), s.g, lin.fc2, dw[kW2], dw[kB2]);
  const auto dz = at::gelu_backward(dg, s.z);
  const auto du2 = linear_backward(dz, s.u2, lin.fc1, dw[kW1], dw[kB1]);
  const auto dh_mid = dout + norm_backward(du2, s.h_mid, s.ln2, s.mean2, s.rstd2, w[kLn2W], w[kLn2B], m, kShift2,
                                           dw[kLn2W], dw[kLn2B], dm);
  if (m.defined()) gate_backward(dh_mid, s.a, kGate1, dm);
  const auto dctx = linear_backward(gated(dh_mid, m, kGate1), s.ctx, lin.o, dw[kWo], dw[kBo]);
  const auto dctx_h = dctx.view({B, T, -1, dh_size}).transpose(1, 2);  // [B, H, T, dh]
  const auto dp = at::matmul(dctx_h, s.v.transpose(-1, -2));
  const auto dv = at::matmul(s.p.transpose(-1, -2), dctx_h);
  const auto ds = at::_softmax_backward_data(dp, s.p, -1, s.p.scalar_type()) / std::sqrt(double(dh_size));
  const auto dq = at::matmul(ds, s.k), dk = at::matmul(ds.transpose(-1, -2), s.q);
  const auto dqkv = at::stack({dq, dk, dv}).permute({1, 3, 0, 2, 4}).reshape({B, T, 3 * d});
  const auto du1 = linear_backward(dqkv, s.u1, lin.qkv, dw[kWqkv], dw[kBqkv]);
  return dh_mid + norm_backward(du1, s.h, s.ln1, s.mean1, s.rstd1, w[kLn1W], w[kLn1B], m, kShift1, dw[kLn1W],
                                dw[kLn1B], dm);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> rmdm_recurse_bwd_aten(
    const at::Tensor& dstates, const at::Tensor& x, const at::Tensor& states, at::TensorList weights,
    const std::optional<at::Tensor>& mod, int64_t heads, double eps) {
  check_bwd(dstates, x, states, weights, mod, heads, eps);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t K = static_cast<int64_t>(weights.size()) / kBlockParams, n_iter = states.size(0);
  std::vector<std::vector<at::Tensor>> w(K), dw(K);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t i = 0; i < kBlockParams; ++i) {
      w[k].push_back(weights[k * kBlockParams + i].to(acc));
      dw[k].push_back(at::zeros_like(w[k].back()));
    }
  }
  std::vector<Linears> lin;
  for (int64_t k = 0; k < K; ++k) lin.emplace_back(w[k]);
  const at::Tensor m = mod ? mod->to(acc) : at::Tensor();
  at::Tensor dm = mod ? at::zeros_like(m) : at::Tensor();
  std::vector<at::Tensor> m_k(K), dm_k(K);
  for (int64_t k = 0; k < K; ++k) {
    if (mod) m_k[k] = m.select(1, k), dm_k[k] = dm.select(1, k);
  }
  at::Tensor g = at::zeros(x.sizes(), x.options().dtype(acc));
  for (int64_t it = n_iter - 1; it >= 0; --it) {
    g = g + dstates[it].to(acc);
    std::vector<Saved> saved;
    at::Tensor h = (it == 0 ? x : states[it - 1]).to(acc);
    for (int64_t k = 0; k < K; ++k) {
      saved.push_back(block_forward(h, w[k], lin[k], m_k[k], heads, eps));
      h = saved.back().h_mid + gated(saved.back().y, m_k[k], kGate2);
    }
    for (int64_t k = K - 1; k >= 0; --k) g = block_backward(g, saved[k], w[k], lin[k], m_k[k], dw[k], dm_k[k]);
  }
  std::vector<at::Tensor> dweights;
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t i = 0; i < kBlockParams; ++i) dweights.push_back(dw[k][i].to(x.scalar_type()));
  }
  return {g.to(x.scalar_type()), dweights, mod ? dm.to(x.scalar_type()) : at::empty({0}, x.options())};
}

}  // namespace
}  // namespace diffkern::rmdm

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("rmdm_recurse_bwd", TORCH_FN(diffkern::rmdm::rmdm_recurse_bwd_aten));
  m.impl("rmdm_recurse_bwd_cuda", TORCH_FN(diffkern::rmdm::rmdm_recurse_bwd_aten));
}

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) {
  m.impl("rmdm_recurse_bwd_cuda", TORCH_FN(diffkern::rmdm::rmdm_recurse_bwd_aten));
}
