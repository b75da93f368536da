// Torch side of the CUDA Flow-GRPO kernels, shared by the CUDA build (grpo_api.cpp, CUDA tensors) and
// the CPU harness build of the tests (CPU tensors): the checks the kernels' memory safety rests on,
// allocation, and the launch through grpo.h. Device-agnostic: the caller supplies the stream.
//
// The public ops check their arguments fully before calling these (python/diffkern/grpo/op.py); the
// internal ops check again what an out-of-bounds access would follow from, so a direct call is safe.
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "diffkern/check.h"
#include "grpo.h"

namespace diffkern::grpo::cuda {

constexpr const char* kStepOp = "flow_sde_step";
constexpr const char* kLossOp = "grpo_iso_loss";

using NamedTensor = std::pair<const char*, const at::Tensor*>;

inline PerSample per_sample(const char* op, const char* name, const at::Tensor& s, const at::Tensor& x,
                            const char* x_name) {
  check_same_device(op, s, name, x, x_name);
  TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == x.size(0), op, ": ", name, " must be [B] = [", x.size(0),
                    "], got shape ", s.sizes());
  TORCH_CHECK_VALUE(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble, op, ": ", name,
                    " dtype must be float32 or float64, got ", dtype_name(s.scalar_type()));
  const int64_t extent = s.numel() == 0 ? 0 : 1 + (s.numel() - 1) * s.stride(0);
  return {s.const_data_ptr(), extent, s.stride(0), s.scalar_type() == at::kDouble};
}

// The kernels' view of the lead latent (x for the step, v for the loss) and the latents beside it
// (`others`, absent ones nullptr).
inline Step step_of(const char* op, NamedTensor lead, std::initializer_list<NamedTensor> others,
                    const at::Tensor& sigma, const at::Tensor& sigma_next, int64_t std_rule, double std_coef) {
  const auto [x_name, x_ptr] = lead;
  const at::Tensor& x = *x_ptr;
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": ", x_name, " must be [B, ...], got a 0-dim tensor");
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK_VALUE(t != at::kDouble, op, ": the cuda backend computes in float32 and takes float16, bfloat16 or ",
                    "float32 latents, got float64; use the cpu or reference backend");
  TORCH_CHECK_VALUE(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat, op, ": ", x_name,
                    " dtype must be float16, bfloat16 or float32, got ", dtype_name(t));
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": ", x_name, " must be contiguous; call .contiguous()");
  const uintptr_t lead_byte = reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16;
  bool congruent = true;
  for (const auto& [name, p] : others) {
    if (p == nullptr) continue;
    TORCH_CHECK_VALUE(p->sizes() == x.sizes() && p->scalar_type() == t && p->is_contiguous(), op, ": ", name,
                      " must be a contiguous tensor of ", x_name, "'s shape ", x.sizes(), " and dtype ",
                      dtype_name(t), ", got shape ", p->sizes(), ", dtype ", dtype_name(p->scalar_type()),
                      ", strides ", p->strides());
    check_same_device(op, *p, name, x, x_name);
    congruent = congruent && reinterpret_cast<uintptr_t>(p->const_data_ptr()) % 16 == lead_byte;
  }
  TORCH_CHECK_VALUE(std_rule == 0 || std_rule == 1, op, ": std_rule must be 0 (wan) or 1 (sd3), got ", std_rule);
  TORCH_CHECK_VALUE(std::isfinite(std_coef) && std_coef > 0, op, ": std_coef must be finite and > 0, got ", std_coef);
  const int64_t B = x.size(0), D = B > 0 ? x.numel() / B : 0;
  TORCH_CHECK_VALUE(B == 0 || D >= 1, op, ": ", x_name, " must have at least one element per sample, got shape ",
                    x.sizes());
  const DType dtype = t == at::kHalf ? DType::kFloat16 : t == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat32;
  const int64_t elem = x.element_size();
  return {per_sample(op, "sigma", sigma, x, x_name), per_sample(op, "sigma_next", sigma_next, x, x_name), int(std_rule),
          float(std_coef), dtype, B, D, congruent, int(lead_byte / elem % (16 / elem))};
}

inline void check_launch(const char* op, const char* err) {
  TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
}

inline at::Tensor per_sample_output(const at::Tensor& x) { return empty_output({x.size(0)}, x.options().dtype(at::kFloat)); }

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sde_step_on(
    const at::Tensor& x, const at::Tensor& v, const at::Tensor& sigma, const at::Tensor& sigma_next,
    const at::Tensor& eps, int64_t std_rule, double std_coef, void* stream) {
  const Step s = step_of(kStepOp, {"x", &x}, {{"v", &v}, {"eps", &eps}}, sigma, sigma_next, std_rule, std_coef);
  at::Tensor x_next = empty_output(x.sizes(), x.options()), y = empty_output(x.sizes(), x.options());
  at::Tensor log_prob = per_sample_output(x), inv_lambda = per_sample_output(x);
  // x_next and y are fresh allocations: aligned, hence congruent with x only if x is.
  Step out = s;
  out.congruent = s.congruent && reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0;
  at::Tensor partial = empty_output({s.B, tiles_per_sample(out)}, log_prob.options());
  check_launch(kStepOp, sde_step({out, x.const_data_ptr(), v.const_data_ptr(), eps.const_data_ptr(),
                                  x_next.mutable_data_ptr(), y.mutable_data_ptr(), partial.mutable_data_ptr<float>(),
                                  log_prob.mutable_data_ptr<float>(), inv_lambda.mutable_data_ptr<float>(), stream}));
  return {x_next, y, log_prob, inv_lambda};
}

inline const at::Tensor* opt(const std::optional<at::Tensor>& t) { return t ? &*t : nullptr; }
inline const void* data_or_null(const std::optional<at::Tensor>& t) { return t ? t->const_data_ptr() : nullptr; }

// The loss's latents: v leads; target is x_next with x, the residual target y without.
inline LogProbInputs log_prob_inputs(const at::Tensor& v, const std::optional<at::Tensor>& x, const at::Tensor& target,
                                     const at::Tensor& sigma, const at::Tensor& sigma_next,
                                     const std::optional<at::Tensor>& v_ref, const std::optional<at::Tensor>& v_uncond,
                                     double cfg_scale, int64_t std_rule, double std_coef) {
  TORCH_CHECK_VALUE(std::isfinite(cfg_scale), kLossOp, ": cfg_scale must be finite, got ", cfg_scale);
  const Step s = step_of(kLossOp, {"v", &v},
                         {{"target", &target}, {"x", opt(x)}, {"v_ref", opt(v_ref)}, {"v_uncond", opt(v_uncond)}},
                         sigma, sigma_next, std_rule, std_coef);
  return {s, v.const_data_ptr(), data_or_null(v_uncond), data_or_null(x), target.const_data_ptr(), data_or_null(v_ref),
          float(cfg_scale)};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> log_prob_fwd_on(
    const at::Tensor& v, const std::optional<at::Tensor>& x, const at::Tensor& target, const at::Tensor& sigma,
    const at::Tensor& sigma_next, const std::optional<at::Tensor>& v_ref, const std::optional<at::Tensor>& v_uncond,
    double cfg_scale, int64_t std_rule, double std_coef, void* stream) {
  const LogProbInputs in = log_prob_inputs(v, x, target, sigma, sigma_next, v_ref, v_uncond, cfg_scale, std_rule,
                                           std_coef);
  at::Tensor log_prob = per_sample_output(v), kl = per_sample_output(v), inv_lambda = per_sample_output(v);
  at::Tensor partial = empty_output({2, in.step.B, tiles_per_sample(in.step)}, log_prob.options());
  check_launch(kLossOp, log_prob_fwd({in, partial.mutable_data_ptr<float>(), log_prob.mutable_data_ptr<float>(),
                                      kl.mutable_data_ptr<float>(), inv_lambda.mutable_data_ptr<float>(), stream}));
  return {log_prob, kl, inv_lambda};
}

inline std::vector<at::Tensor> log_prob_bwd_on(const at::Tensor& dlog_prob, const at::Tensor& dkl, const at::Tensor& v,
                                               const std::optional<at::Tensor>& x, const at::Tensor& target,
                                               const at::Tensor& sigma, const at::Tensor& sigma_next,
                                               const std::optional<at::Tensor>& v_ref,
                                               const std::optional<at::Tensor>& v_uncond, double cfg_scale,
                                               int64_t std_rule, double std_coef, void* stream) {
  LogProbInputs in = log_prob_inputs(v, x, target, sigma, sigma_next, v_ref, v_uncond, cfg_scale, std_rule, std_coef);
  const std::vector<int64_t> b_shape{in.step.B};
  for (const auto& [name, t] : {NamedTensor{"dlog_prob", &dlog_prob}, {"dkl", &dkl}}) {
    check_same_device(kLossOp, *t, name, v, "v");
    check_contiguous_as(kLossOp, *t, name, "[B]", b_shape, at::kFloat, "the accumulation dtype");
  }
  std::vector<at::Tensor> grads{empty_output(v.sizes(), v.options())};
  if (v_uncond) grads.push_back(empty_output(v.sizes(), v.options()));
  // The gradients are fresh allocations: aligned, hence congruent with the inputs only if v is.
  in.step.congruent = in.step.congruent && reinterpret_cast<uintptr_t>(v.const_data_ptr()) % 16 == 0;
  check_launch(kLossOp, log_prob_bwd({in, dlog_prob.const_data_ptr<float>(), dkl.const_data_ptr<float>(),
                                      grads[0].mutable_data_ptr(), v_uncond ? grads[1].mutable_data_ptr() : nullptr,
                                      stream}));
  return grads;
}

}  // namespace diffkern::grpo::cuda
