// Torch glue of the CUDA NoiseTilt step kernel (ntrk_step.cu) for CUDA tensors: the internal op
// ntrk_step_cuda, which the `cuda` backend of ntrk_step calls (python/diffkern/ntrk/op.py). Launches on
// the current stream of the inputs' device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ntrk_step_glue.h"

namespace diffkern::ntrk::cuda {
namespace {

at::Tensor ntrk_step_cuda(const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& w, const at::Tensor& rho,
                          const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& philox) {
  const c10::cuda::OptionalCUDAGuard guard(mu.device());
  return step_on(mu, sigma, w, rho, eps, philox, c10::cuda::getCurrentCUDAStream().stream());
}

}  // namespace
}  // namespace diffkern::ntrk::cuda

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) { m.impl("ntrk_step_cuda", TORCH_FN(diffkern::ntrk::cuda::ntrk_step_cuda)); }
