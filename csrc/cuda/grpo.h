// Host interface of the CUDA Flow-GRPO kernels (grpo.cu): plain structs and launch functions with no
// torch or CUDA types, included by the torch glue (grpo_glue.h) of both the CUDA build and the CPU
// harness build. Pointers are device pointers; extents count the elements reachable from them (the
// harness bounds-checks every access against them; the GPU build ignores them).
#pragma once

#include <stdint.h>

namespace diffkern::grpo::cuda {

enum class DType : int32_t { kFloat32, kFloat16, kBFloat16 };

// A [B] float32 or float64 tensor of per-sample scalars (sigma, sigma_next), read in place: element i
// at data + i * stride (views such as a whole batch expanded from one step are common).
struct PerSample {
  const void* data;
  int64_t extent, stride;
  bool is_double;
};

// The [B, D] latents' layout shared by every kernel. All latent tensors are contiguous. When their
// addresses agree modulo 16 bytes (`congruent`), one element index starts a 16-byte vector in all of
// them or in none, and `lead` is their first element's offset modulo the vector width; otherwise the
// kernels take scalar accesses only.
struct Step {
  PerSample sigma, sigma_next;
  int std_rule;
  float std_coef;
  DType dtype;
  int64_t B, D;
  bool congruent;
  int lead;
};

// Each block reduces tiles of kTileThreads * kUnitsPerThread vectors of one sample (fixed, so results
// do not depend on the device) and leaves one float32 partial sum per tile and reduction.
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

// The multiprocessor count of the current device (the harness models one).
int sm_count();

// Each returns nullptr, or the description of a launch error.
const char* sde_step(const SdeStepParams& p);
const char* log_prob_fwd(const LogProbFwdParams& p);
const char* log_prob_bwd(const LogProbBwdParams& p);

}  // namespace diffkern::grpo::cuda
