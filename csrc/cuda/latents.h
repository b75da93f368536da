// Host interface shared by the CUDA kernels over [B, D] latents (grpo.cu, ntrk_step.cu): plain
// structs with no torch or CUDA types. Pointers are device pointers; extents count the elements
// reachable from them (the harness bounds-checks every access against them).
#pragma once

#include <stdint.h>

namespace diffkern::cuda {

enum class DType : int32_t { kFloat32, kFloat16, kBFloat16 };

// A [B] float32 or float64 tensor of per-sample scalars (sigma, rho, ...), read in place: element i
// at data + i * stride (views such as a whole batch expanded from one value are common).
struct PerSample {
  const void* data;
  int64_t extent, stride;
  bool is_double;
};

// Contiguous [B, D] latents of one dtype. When all their addresses agree modulo 16 bytes
// (`congruent`), one element index starts a 16-byte vector in all of them or in none, and `lead` is
// their first element's offset modulo the vector width; otherwise the kernels take scalar accesses.
struct Latents {
  DType dtype;
  int64_t B, D;
  bool congruent;
  int lead;
};

}  // namespace diffkern::cuda
