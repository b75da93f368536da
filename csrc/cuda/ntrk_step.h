// Host interface of the CUDA NoiseTilt step kernel (ntrk_step.cu): plain structs and a launch function
// with no torch or CUDA types, included by the torch glue (ntrk_step_glue.h) of both the CUDA build
// and the CPU harness build.
#pragma once

#include <stdint.h>

#include "latents.h"

namespace diffkern::ntrk::cuda {

using diffkern::cuda::Latents;
using diffkern::cuda::PerSample;

// x = mu + sigma_i (sqrt(rho_i) w + sqrt(1 - rho_i) eps), eps given or philox::randn(seed, offset + n)
// for flat element n, with (seed, offset) the two int64 words at `philox` in device memory.
struct StepParams {
  Latents lat;
  PerSample sigma, rho;
  const void *mu, *w, *eps;  // [B, D], dtype; eps may be nullptr
  void* x;                   // [B, D], dtype
  const int64_t* philox;     // [2] (seed, offset); nullptr when eps is given
  void* stream;
};

// Returns nullptr, or the description of a launch error.
const char* step(const StepParams& p);

}  // namespace diffkern::ntrk::cuda
