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
#include "latents_glue.h"

namespace diffkern::grpo::cuda {

constexpr const char* kStepOp = "flow_sde_step";
constexpr const char* kLossOp = "grpo_iso_loss";

using diffkern::cuda::check_launch;
using diffkern::cuda::NamedTensor;

// The kernels' view of a call: the latents (the lead one x for the step, v for the loss) and the step.
inline Step step_of(const char* op, NamedTensor lead, std::initializer_list<NamedTensor> others,
                    const at::Tensor& sigma, const at::Tensor& sigma_next, int64_t std_rule, double std_coef) {
  const Latents lat = diffkern::cuda::latents_of(op, lead, others);
  TORCH_CHECK_VALUE(std_rule == 0 || std_rule == 1, op, ": std_rule must be 0 (wan) or 1 (sd3), got ", std_rule);
  TORCH_CHECK_VALUE(std::isfinite(std_coef) && std_coef > 0, op, ": std_coef must be finite and > 0, got ", std_coef);
  const at::Tensor& x = *lead.second;
  return {diffkern::cuda::per_sample(op, "sigma", sigma, x, lead.first),
          diffkern::cuda::per_sample(op, "sigma_next", sigma_next, x, lead.first), int(std_rule), float(std_coef), lat};
}

inline at::Tensor per_sample_output(const at::Tensor& x) { return empty_output({x.size(0)}, x.options().dtype(at::kFloat)); }

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sde_step_on(
    const at::Tensor& x, const at::Tensor& v, const at::Tensor& sigma, const at::Tensor& sigma_next,
    const at::Tensor& eps, int64_t std_rule, double std_coef, void* stream) {
  const Step s = step_of(kStepOp, {"x", &x}, {{"v", &v}, {"eps", &eps}}, sigma, sigma_next, std_rule, std_coef);
  at::Tensor x_next = empty_output(x.sizes(), x.options()), y = empty_output(x.sizes(), x.options());
  at::Tensor log_prob = per_sample_output(x), inv_lambda = per_sample_output(x);
  Step out = s;
  out.lat = diffkern::cuda::with_fresh_outputs(s.lat, x);
  at::Tensor partial = empty_output({s.lat.B, tiles_per_sample(out)}, log_prob.options());
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
                         {{x ? "x_next" : "y", &target}, {"x", opt(x)}, {"v_ref", opt(v_ref)}, {"v_uncond", opt(v_uncond)}},
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
  at::Tensor partial = empty_output({2, in.step.lat.B, tiles_per_sample(in.step)}, log_prob.options());
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
  const std::vector<int64_t> b_shape{in.step.lat.B};
  for (const auto& [name, t] : {NamedTensor{"dlog_prob", &dlog_prob}, {"dkl", &dkl}}) {
    check_same_device(kLossOp, *t, name, v, "v");
    check_contiguous_as(kLossOp, *t, name, "[B]", b_shape, at::kFloat, "the accumulation dtype");
  }
  std::vector<at::Tensor> grads{empty_output(v.sizes(), v.options())};
  if (v_uncond) grads.push_back(empty_output(v.sizes(), v.options()));
  in.step.lat = diffkern::cuda::with_fresh_outputs(in.step.lat, v);
  check_launch(kLossOp, log_prob_bwd({in, dlog_prob.const_data_ptr<float>(), dkl.const_data_ptr<float>(),
                                      grads[0].mutable_data_ptr(), v_uncond ? grads[1].mutable_data_ptr() : nullptr,
                                      stream}));
  return grads;
}

}  // namespace diffkern::grpo::cuda
