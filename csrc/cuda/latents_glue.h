// Torch side shared by the glues of the CUDA kernels over [B, D] latents (grpo_glue.h,
// ntrk_step_glue.h): the checks the kernels' memory safety rests on, and their view of the tensors.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <utility>

#include <ATen/core/Tensor.h>

#include "diffkern/check.h"
#include "diffkern/latent_args.h"
#include "latents.h"

namespace diffkern::cuda {

using diffkern::NamedTensor;

// `s`, a [B] float32/float64 tensor beside the lead latent x.
inline PerSample per_sample(const char* op, const char* name, const at::Tensor& s, const at::Tensor& x,
                            const char* x_name) {
  check_per_sample(op, {name, &s}, {x_name, &x});
  const int64_t extent = s.numel() == 0 ? 0 : 1 + (s.numel() - 1) * s.stride(0);
  return {s.const_data_ptr(), extent, s.stride(0), s.scalar_type() == at::kDouble};
}

// The lead latent and those beside it (`others`, absent ones nullptr): same shape, dtype, device,
// contiguous; float16/bfloat16/float32 (the kernels compute in float32). Samples of no element are
// refused unless `empty_rows` (the op then returns empty outputs).
inline Latents latents_of(const char* op, NamedTensor lead, std::initializer_list<NamedTensor> others,
                          bool empty_rows = false) {
  const auto [x_name, x_ptr] = lead;
  const at::Tensor& x = *x_ptr;
  TORCH_CHECK_VALUE(x.scalar_type() != at::kDouble, op, ": the cuda backend computes in float32 and takes float16, ",
                    "bfloat16 or float32 latents, got float64; use the cpu or reference backend");
  const auto [B, D] = check_latents(op, lead, others, empty_rows);
  const at::ScalarType t = x.scalar_type();
  // 16-byte vector loads need every latent at the same offset from a 16-byte boundary.
  const uintptr_t lead_byte = reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16;
  bool congruent = true;
  for (const NamedTensor& other : others) {
    const at::Tensor* p = other.second;
    congruent = congruent && (p == nullptr || reinterpret_cast<uintptr_t>(p->const_data_ptr()) % 16 == lead_byte);
  }
  const DType dtype = t == at::kHalf ? DType::kFloat16 : t == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat32;
  const int64_t elem = x.element_size();
  return {dtype, B, D, congruent, int(lead_byte / elem % (16 / elem))};
}

// `l` once fresh outputs join the latents: a fresh allocation is 16-byte aligned, hence congruent with
// the inputs only if the lead one is.
inline Latents with_fresh_outputs(Latents l, const at::Tensor& lead) {
  l.congruent = l.congruent && reinterpret_cast<uintptr_t>(lead.const_data_ptr()) % 16 == 0;
  return l;
}

inline void check_launch(const char* op, const char* err) {
  TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
}

}  // namespace diffkern::cuda
