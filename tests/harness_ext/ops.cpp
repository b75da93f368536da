// CPU-key implementations of the cuda backend's internal ops, for the tests: the kernels of
// csrc/cuda/dar_route.cu (compiled as C++ in dar_route.cpp) run in the host-execution harness on the
// CPU tensors' memory, blocks in a shuffled order, behind the same glue as the CUDA build.
#include <torch/library.h>

#include "dar_route_glue.h"

namespace {

using namespace diffkern::dar::cuda;

std::tuple<at::Tensor, at::Tensor> fwd(at::TensorList sources, const at::Tensor& q, const at::Tensor& gain,
                                       double eps) {
  return route_fwd_on(sources, q, gain, eps, nullptr);
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> bwd(const at::Tensor& dh, at::TensorList sources,
                                                                const at::Tensor& q, const at::Tensor& gain,
                                                                const at::Tensor& h, const at::Tensor& lse, double eps) {
  return route_bwd_on(dh, sources, q, gain, h, lse, eps, nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("dar_route_fwd_cuda", TORCH_FN(fwd));
  m.impl("dar_route_bwd_cuda", TORCH_FN(bwd));
}
