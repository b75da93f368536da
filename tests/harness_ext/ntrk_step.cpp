// The shipped CUDA NoiseTilt step kernel, compiled as C++ against the host-execution harness, and the
// CPU-key implementation of its internal op for the tests (blocks in a shuffled order, the same glue
// as the CUDA build).
#include <torch/library.h>

#include "ntrk_step.cu"
#include "ntrk_step_glue.h"

namespace {

at::Tensor step(const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& w, const at::Tensor& rho,
                const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& philox) {
  return diffkern::ntrk::cuda::step_on(mu, sigma, w, rho, eps, philox, nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("ntrk_step_cuda", TORCH_FN(step)); }
