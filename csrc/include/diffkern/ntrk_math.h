// Element math of NoiseTilt (specs/ntrk.md), shared by the CPU and CUDA kernels. Torch-free.
// python/diffkern/ntrk/reference.py is the same math for the reference backend; the Triton kernels
// (python/diffkern/ntrk/triton_kernels.py) write it out in tl.* ops.
#pragma once

#include <math.h>
#include <stdint.h>

#include "diffkern/macros.h"

namespace diffkern::ntrk {

// x = mu + sigma (sqrt(rho) w + sqrt(1 - rho) eps) = mu + a w + b eps per sample.
template <typename T>
struct Tilt {
  T a, b;
};

// rho outside [0, 1] gives NaN (a square root of a negative number) for that sample.
template <typename T>
DIFFKERN_HD inline Tilt<T> tilt(T sigma, T rho) {
  return {sigma * sqrt(rho), sigma * sqrt(T(1) - rho)};
}

}  // namespace diffkern::ntrk
