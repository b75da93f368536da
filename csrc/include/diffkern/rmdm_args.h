// Argument checks of the recursion ops, in the words of python/diffkern/rmdm/op.py `check_recurse`.
#pragma once

#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "diffkern/check.h"
#include "diffkern/rmdm_math.h"

namespace diffkern::rmdm {

constexpr const char* kOp = "recurse";
constexpr const char* kParamNames[kBlockParams] = {"ln1_w", "ln1_b", "w_qkv", "b_qkv", "w_o", "b_o",
                                                   "ln2_w", "ln2_b", "w_1",   "b_1",   "w_2", "b_2"};

struct Geometry {
  int64_t B, T, d, f, heads, K;
};

inline void check_like(const std::string& name, const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.sizes() == shape, kOp, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), kOp, ": ", name, " dtype ", dtype_name(t.scalar_type()),
                    " differs from x dtype ", dtype_name(x.scalar_type()));
  check_same_device(kOp, t, name, x, "x");
  TORCH_CHECK_VALUE(t.is_contiguous(), kOp, ": ", name, " must be contiguous; call .contiguous()");
}

inline Geometry check_recurse(const at::Tensor& x, at::TensorList weights, const std::optional<at::Tensor>& mod,
                              int64_t n_iter, int64_t heads, double eps) {
  TORCH_CHECK_VALUE(x.dim() == 3, kOp, ": x must be [B, T, d], got shape ", x.sizes());
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK_VALUE(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble, kOp,
                    ": x dtype must be float16, bfloat16, float32 or float64, got ", dtype_name(t));
  TORCH_CHECK_VALUE(x.is_contiguous(), kOp, ": x must be contiguous; call .contiguous()");
  const int64_t B = x.size(0), T = x.size(1), d = x.size(2), n = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(n > 0 && n % kBlockParams == 0, kOp, ": weights must hold K blocks of ", kBlockParams,
                    " tensors, got ", n, " tensors");
  TORCH_CHECK_VALUE(weights[kW1].dim() == 2, kOp, ": weights[8] (w_1 of block 0) must be [f, d], got shape ",
                    weights[kW1].sizes());
  const int64_t f = weights[kW1].size(0);
  const std::vector<std::vector<int64_t>> shapes = {{d}, {d}, {3 * d, d}, {3 * d}, {d, d}, {d},
                                                    {d}, {d}, {f, d},     {f},     {d, f}, {d}};
  for (int64_t i = 0; i < n; ++i) {
    check_like("weights[" + std::to_string(i) + "] (" + kParamNames[i % kBlockParams] + " of block " +
                   std::to_string(i / kBlockParams) + ")",
               weights[i], shapes[i % kBlockParams], x);
  }
  const int64_t K = n / kBlockParams;
  if (mod) check_like("mod", *mod, {B, K, kMod, d}, x);
  TORCH_CHECK_VALUE(n_iter >= 1, kOp, ": n_iter must be >= 1, got ", n_iter);
  TORCH_CHECK_VALUE(heads >= 1 && d % heads == 0, kOp, ": heads must be >= 1 and divide d = ", d, ", got ", heads);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, kOp, ": eps must be finite and > 0, got ", eps);
  return {B, T, d, f, heads, K};
}

// The checks of the backward ops' shared arguments (python/diffkern/rmdm/op.py `check_recurse_bwd`).
inline Geometry check_bwd(const at::Tensor& dstates, const at::Tensor& x, const at::Tensor& states, at::TensorList weights,
                      const std::optional<at::Tensor>& mod, int64_t heads, double eps) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"states", &states}, {"dstates", &dstates}}) {
    TORCH_CHECK_VALUE(t->dim() == 4 && t->size(0) >= 1, kOp, ": ", name,
                      " must be [n_iter, B, T, d] with n_iter >= 1, got shape ", t->sizes());
  }
  const Geometry g = check_recurse(x, weights, mod, states.size(0), heads, eps);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"states", &states}, {"dstates", &dstates}}) {
    check_like(name, *t, {states.size(0), x.size(0), x.size(1), x.size(2)}, x);
  }
  return g;
}

}  // namespace diffkern::rmdm
