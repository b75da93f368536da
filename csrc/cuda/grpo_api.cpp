// Torch glue of the CUDA Flow-GRPO kernels (grpo.cu) for CUDA tensors: the internal ops
// flow_sde_step_cuda / grpo_log_prob_cuda / grpo_log_prob_bwd_cuda, which the `cuda` backend of
// flow_sde_step / grpo_log_prob / grpo_log_prob_bwd calls (python/diffkern/grpo/op.py). Launches on
// the current stream of the inputs' device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "grpo_glue.h"

namespace diffkern::grpo::cuda {
namespace {

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flow_sde_step_cuda(
    const at::Tensor& x, const at::Tensor& v, const at::Tensor& sigma, const at::Tensor& sigma_next,
    const at::Tensor& eps, int64_t std_rule, double std_coef) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  return sde_step_on(x, v, sigma, sigma_next, eps, std_rule, std_coef, current_stream());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grpo_log_prob_cuda(
    const at::Tensor& v, const std::optional<at::Tensor>& x, const at::Tensor& target, const at::Tensor& sigma,
    const at::Tensor& sigma_next, const std::optional<at::Tensor>& v_ref, const std::optional<at::Tensor>& v_uncond,
    double cfg_scale, int64_t std_rule, double std_coef) {
  const c10::cuda::OptionalCUDAGuard guard(v.device());
  return log_prob_fwd_on(v, x, target, sigma, sigma_next, v_ref, v_uncond, cfg_scale, std_rule, std_coef,
                         current_stream());
}

std::vector<at::Tensor> grpo_log_prob_bwd_cuda(
    const at::Tensor& dlog_prob, const at::Tensor& dkl, const at::Tensor& v, const std::optional<at::Tensor>& x,
    const at::Tensor& target, const at::Tensor& sigma, const at::Tensor& sigma_next,
    const std::optional<at::Tensor>& v_ref, const std::optional<at::Tensor>& v_uncond, double cfg_scale,
    int64_t std_rule, double std_coef) {
  const c10::cuda::OptionalCUDAGuard guard(v.device());
  return log_prob_bwd_on(dlog_prob, dkl, v, x, target, sigma, sigma_next, v_ref, v_uncond, cfg_scale, std_rule,
                         std_coef, current_stream());
}

}  // namespace
}  // namespace diffkern::grpo::cuda

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) {
  m.impl("flow_sde_step_cuda", TORCH_FN(diffkern::grpo::cuda::flow_sde_step_cuda));
  m.impl("grpo_log_prob_cuda", TORCH_FN(diffkern::grpo::cuda::grpo_log_prob_cuda));
  m.impl("grpo_log_prob_bwd_cuda", TORCH_FN(diffkern::grpo::cuda::grpo_log_prob_bwd_cuda));
}
