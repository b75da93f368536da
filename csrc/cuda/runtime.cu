// The CUDA runtime this extension was compiled and linked against (torch-free translation unit).
#include <cuda_runtime_api.h>

namespace diffkern::cuda {

int runtime_version() {
  int version = 0;
  return cudaRuntimeGetVersion(&version) == cudaSuccess ? version : -1;
}

int compiled_runtime_version() { return CUDART_VERSION; }

}  // namespace diffkern::cuda
