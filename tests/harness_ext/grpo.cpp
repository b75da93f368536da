// The shipped CUDA Flow-GRPO kernels, compiled as C++ against the host-execution harness.
#include "grpo.cu"
