// Portability macros shared by the C++ CPU kernels and the CUDA kernels.
#pragma once

// Marks math that both the CPU kernels (host compiler) and the CUDA kernels (nvcc) call.
#ifdef __CUDACC__
#define DIFFKERN_HD __host__ __device__
#else
#define DIFFKERN_HD
#endif
