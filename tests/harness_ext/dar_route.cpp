// The shipped CUDA routing kernels, compiled as C++ against the host-execution harness.
#include "dar_route.cu"
