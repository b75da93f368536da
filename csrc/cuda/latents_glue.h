// Torch side shared by the glues of the CUDA kernels over [B, D] latents (grpo_glue.h,
// ntrk_step_glue.h): the checks the kernels' memory safety rests on, and their view of the tensors.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <utility>

#include <ATen/core/Tensor.h>

#include "diffkern/check.h"
#include "latents.h"

namespace diffkern::cuda {

using NamedTensor = std::pair<const char*, const at::Tensor*>;

// `s`, a [B] float32/float64 tensor beside the lead latent x.
inline PerSample per_sample(const char* op, const char* name, const at::Tensor& s, const at::Tensor& x,
                            const char* x_name) {
  check_same_device(op, s, name, x, x_name);
  TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == x.size(0), op, ": ", name, " must be [B] = [", x.size(0),
                    "], got shape ", s.sizes());
  TORCH_CHECK_VALUE(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble, op, ": ", name,
                    " dtype must be float32 or float64, got ", dtype_name(s.scalar_type()));
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
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": ", x_name, " must be [B, ...], got a 0-dim tensor");
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK_VALUE(t != at::kDouble, op, ": the cuda backend computes in float32 and takes float16, bfloat16 or ",
                    "float32 latents, got float64; use the cpu or reference backend");
  TORCH_CHECK_VALUE(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat, op, ": ", x_name,
                    " dtype must be float16, bfloat16 or float32, got ", dtype_name(t));
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": ", x_name, " must be contiguous; call .contiguous()");
  const uintptr_t lead_byte = reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16;
  bool congruent = true;
  for (const auto& [name, p] : others) {
    if (p == nullptr) continue;
    TORCH_CHECK_VALUE(p->sizes() == x.sizes() && p->scalar_type() == t && p->is_contiguous(), op, ": ", name,
                      " must be a contiguous tensor of ", x_name, "'s shape ", x.sizes(), " and dtype ",
                      dtype_name(t), ", got shape ", p->sizes(), ", dtype ", dtype_name(p->scalar_type()),
                      ", strides ", p->strides());
    check_same_device(op, *p, name, x, x_name);
    congruent = congruent && reinterpret_cast<uintptr_t>(p->const_data_ptr()) % 16 == lead_byte;
  }
  const int64_t B = x.size(0), D = B > 0 ? x.numel() / B : 0;
  TORCH_CHECK_VALUE(B == 0 || D >= 1 || empty_rows, op, ": ", x_name, " must have at least one element per sample, got shape ",
                    x.sizes());
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
