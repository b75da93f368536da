// Host interface of the CUDA Flow-GRPO kernels (grpo.cu): plain structs and launch functions with no
// torch or CUDA types, included by the torch glue (grpo_glue.h) of both the CUDA build and the CPU
// harness build. Pointers are device pointers; extents count the elements reachable from them (the
// harness bounds-checks every access against them; the GPU build ignores them).
#pragma once

#include <stdint.h>

#include "latents.h"

namespace diffkern::grpo::cuda {

using diffkern::cuda::DType;
using diffkern::cuda::Latents;
using diffkern::cuda::PerSample;

// One step sigma -> sigma_next per sample (grpo_math.h) over the latents.
struct Step {
  PerSample sigma, sigma_next;
  int std_rule;
  float std_coef;
  Latents lat;
};

// A reducing kernel leaves one float32 partial sum per tile of 2048 elements of a sample and reduction
// (a fixed size, so results do not depend on the device).
int64_t tiles_per_sample(const Step& s);

struct SdeStepParams {
  Step step;
  const void *x, *v, *eps;  // [B, D], dtype
  void *x_next, *y;         // [B, D], dtype
  float* partial;           // [B, tiles_per_sample] scratch
  float *log_prob, *inv_lambda;  // [B]
  void* stream;
};

// v is the trained velocity; with v_uncond (else nullptr) the guided one v_uncond + cfg_scale (v - v_uncond).
// target is x_next with x, or the residual target y = x_next - a x without (x nullptr).
struct LogProbInputs {
  Step step;
  const void *v, *v_uncond, *x, *target, *v_ref;  // [B, D], dtype; x, v_uncond and v_ref may be nullptr
  float cfg_scale;
};

struct LogProbFwdParams {
  LogProbInputs in;
  float* partial;                    // [2, B, tiles_per_sample] scratch
  float *log_prob, *kl, *inv_lambda;  // [B]
  void* stream;
};

struct LogProbBwdParams {
  LogProbInputs in;
  const float *dlog_prob, *dkl;  // [B]
  void *dv, *dv_uncond;          // [B, D], dtype; dv_uncond only with v_uncond
  void* stream;
};

// Each returns nullptr, or the description of a launch error.
const char* sde_step(const SdeStepParams& p);
const char* log_prob_fwd(const LogProbFwdParams& p);
const char* log_prob_bwd(const LogProbBwdParams& p);

}  // namespace diffkern::grpo::cuda
