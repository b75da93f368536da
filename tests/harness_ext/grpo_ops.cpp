// CPU-key implementations of the GRPO cuda backend's internal ops, for the tests: the kernels of
// csrc/cuda/grpo.cu (compiled as C++ in grpo.cpp) run in the host-execution harness on the CPU
// tensors' memory, blocks in a shuffled order, behind the same glue as the CUDA build.
#include <torch/library.h>

#include "grpo_glue.h"

namespace {

using namespace diffkern::grpo::cuda;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> step(const at::Tensor& x, const at::Tensor& v,
                                                                const at::Tensor& sigma, const at::Tensor& sigma_next,
                                                                const at::Tensor& eps, int64_t std_rule,
                                                                double std_coef) {
  return sde_step_on(x, v, sigma, sigma_next, eps, std_rule, std_coef, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& v, const std::optional<at::Tensor>& x, const at::Tensor& target,
                                                   const at::Tensor& sigma, const at::Tensor& sigma_next,
                                                   const std::optional<at::Tensor>& v_ref,
                                                   const std::optional<at::Tensor>& v_uncond, double cfg_scale,
                                                   int64_t std_rule, double std_coef) {
  return log_prob_fwd_on(v, x, target, sigma, sigma_next, v_ref, v_uncond, cfg_scale, std_rule, std_coef, nullptr);
}

std::vector<at::Tensor> bwd(const at::Tensor& dlog_prob, const at::Tensor& dkl, const at::Tensor& v,
                            const std::optional<at::Tensor>& x, const at::Tensor& target, const at::Tensor& sigma,
                            const at::Tensor& sigma_next, const std::optional<at::Tensor>& v_ref,
                            const std::optional<at::Tensor>& v_uncond, double cfg_scale, int64_t std_rule,
                            double std_coef) {
  return log_prob_bwd_on(dlog_prob, dkl, v, x, target, sigma, sigma_next, v_ref, v_uncond, cfg_scale, std_rule,
                         std_coef, nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("flow_sde_step_cuda", TORCH_FN(step));
  m.impl("grpo_log_prob_cuda", TORCH_FN(fwd));
  m.impl("grpo_log_prob_bwd_cuda", TORCH_FN(bwd));
}
