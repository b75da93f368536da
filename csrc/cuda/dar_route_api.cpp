// Torch glue of the CUDA routing kernels (dar_route.cu) for CUDA tensors: the internal ops
// dar_route_fwd_cuda / dar_route_bwd_cuda, which the `cuda` backend of dar_route_fwd/bwd calls
// (python/diffkern/dar/op.py). Launches on the current stream of the inputs' device.
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dar_route_glue.h"

namespace diffkern::dar::cuda {
namespace {

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

bool capturing() { return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None; }

std::tuple<at::Tensor, at::Tensor> dar_route_fwd_cuda(at::TensorList sources, const at::Tensor& q,
                                                      const at::Tensor& gain, double eps) {
  const c10::cuda::OptionalCUDAGuard guard(sources.empty() ? q.device() : sources[0].device());
  return route_fwd_on(sources, q, gain, eps, current_stream(), capturing());
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> dar_route_bwd_cuda(
    const at::Tensor& dh, at::TensorList sources, const at::Tensor& q, const at::Tensor& gain, const at::Tensor& h,
    const at::Tensor& lse, double eps) {
  const c10::cuda::OptionalCUDAGuard guard(dh.device());
  return route_bwd_on(dh, sources, q, gain, h, lse, eps, current_stream(), capturing());
}

}  // namespace
}  // namespace diffkern::dar::cuda

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) {
  m.impl("dar_route_fwd_cuda", TORCH_FN(diffkern::dar::cuda::dar_route_fwd_cuda));
  m.impl("dar_route_bwd_cuda", TORCH_FN(diffkern::dar::cuda::dar_route_bwd_cuda));
}
