// Torch glue for csrc/cuda/runtime.cu: lets Python report which CUDA runtime the build linked.
#include <torch/library.h>

namespace diffkern::cuda {
int runtime_version();
int compiled_runtime_version();
}  // namespace diffkern::cuda

namespace {
int64_t cuda_runtime_version() {
  return diffkern::cuda::runtime_version() * int64_t{1000000} + diffkern::cuda::compiled_runtime_version();
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(diffkern, m) {
  // runtime_version * 10^6 + compiled CUDART_VERSION (e.g. 13000 * 10^6 + 13000); the runtime part is -1
  // on a machine with no CUDA driver.
  m.def("cuda_runtime_version() -> int", &cuda_runtime_version);
}
