// Checks of [B, ...] latent arguments, shared by the CPU kernels (grpo.cpp, ntrk.cpp) and the glue of
// their CUDA kernels (csrc/cuda/latents_glue.h), worded like the Python-side checks.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>

#include <ATen/core/Tensor.h>

#include "diffkern/check.h"

namespace diffkern {

// A named tensor argument; nullptr for an absent optional one.
using NamedTensor = std::pair<const char*, const at::Tensor*>;

inline const at::Tensor* optional_ptr(const std::optional<at::Tensor>& t) { return t ? &*t : nullptr; }

struct LatentShape {
  int64_t B, D;  // samples, elements per sample
};

// `lead` sets the shape, dtype and device every other latent (`others`, absent ones nullptr) must
// share; all contiguous, float16/bfloat16/float32/float64. Samples of no element are refused unless
// `empty_rows` (the op then returns empty outputs).
inline LatentShape check_latents(const char* op, NamedTensor lead, std::initializer_list<NamedTensor> others,
                                 bool empty_rows = false) {
  const auto& [lname, lp] = lead;
  const at::Tensor& x = *lp;
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": ", lname, " must be [B, ...], got a 0-dim tensor");
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK_VALUE(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble, op, ": ", lname,
                    " dtype must be float16, bfloat16, float32 or float64, got ", dtype_name(t));
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": ", lname, " must be contiguous; call .contiguous()");
  for (const auto& [name, p] : others) {
    if (p == nullptr) continue;
    const at::Tensor& y = *p;
    TORCH_CHECK_VALUE(y.sizes() == x.sizes(), op, ": ", name, " has shape ", y.sizes(), " but ", lname, " has shape ",
                      x.sizes());
    TORCH_CHECK_VALUE(y.scalar_type() == t, op, ": ", name, " dtype ", dtype_name(y.scalar_type()), " differs from ",
                      lname, " dtype ", dtype_name(t));
    check_same_device(op, y, name, x, lname);
    TORCH_CHECK_VALUE(y.is_contiguous(), op, ": ", name, " must be contiguous; call .contiguous()");
  }
  const int64_t B = x.size(0), D = B > 0 ? x.numel() / B : 0;
  TORCH_CHECK_VALUE(B == 0 || D >= 1 || empty_rows, op, ": ", lname,
                    " must have at least one element per sample, got shape ", x.sizes());
  return {B, D};
}

// `s`, a [B] float32/float64 per-sample scalar on the lead latent's device.
inline void check_per_sample(const char* op, NamedTensor s, NamedTensor lead) {
  const auto& [name, sp] = s;
  const auto& [lname, lp] = lead;
  check_same_device(op, *sp, name, *lp, lname);
  TORCH_CHECK_VALUE(sp->dim() == 1 && sp->size(0) == lp->size(0), op, ": ", name, " must be [B] = [", lp->size(0),
                    "], got shape ", sp->sizes());
  TORCH_CHECK_VALUE(sp->scalar_type() == at::kFloat || sp->scalar_type() == at::kDouble, op, ": ", name,
                    " dtype must be float32 or float64, got ", dtype_name(sp->scalar_type()));
}

// ntrk_step's Philox state: when eps is absent, a contiguous int64 [2] tensor (seed, offset) on the lead
// latent's device; when eps is given it is not read and may be absent.
inline void check_philox_state(const char* op, const std::optional<at::Tensor>& philox, bool has_eps,
                               NamedTensor lead) {
  if (!philox) {
    TORCH_CHECK_VALUE(has_eps, op, ": philox (the int64 [2] tensor (seed, offset)) is required when eps is None");
    return;
  }
  check_same_device(op, *philox, "philox", *lead.second, lead.first);
  TORCH_CHECK_VALUE(philox->scalar_type() == at::kLong && philox->dim() == 1 && philox->size(0) == 2 &&
                        philox->is_contiguous(),
                    op, ": philox must be a contiguous int64 [2] tensor (seed, offset), got ",
                    dtype_name(philox->scalar_type()), " of shape ", philox->sizes());
}

}  // namespace diffkern
