// The Flow-GRPO kernels' (grpo.cu) view of a call: where the tiles are (latent_tiles.cuh) and each
// sample's step scalars (grpo_math.h). Device code, torch-free.
#pragma once

#include "diffkern/cuda_compat.h"
#include "diffkern/grpo_math.h"
#include "grpo.h"
#include "latent_tiles.cuh"

namespace diffkern::grpo::cuda {

using namespace diffkern::cuda;

// What every kernel needs to place a tile and compute its sample's step scalars.
struct Layout {
  SampleScalar sigma, sigma_next;
  int std_rule;
  float std_coef;
  int64_t B, D, n_tiles;
  int lead;  // the latents' first element offset modulo the vector width

  DIFFKERN_DEVICE StepCoef<float> coef(int64_t i) const {
    return step_coefficients<float>(sigma[i], sigma_next[i], std_rule, std_coef);
  }
  template <int W>
  DIFFKERN_DEVICE Row row(int64_t i) const {
    return row_of<W>(i, D, lead);
  }
};

}  // namespace diffkern::grpo::cuda
