// Argument validation for the torch-facing C++ code, worded like the Python-side checks, plus the
// debug allocation that makes unwritten output elements visible.
#pragma once

#include <cmath>
#include <cstdlib>
#include <string>
#include <string_view>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/util/Exception.h>

namespace diffkern {

// Python's spelling of a dtype ("float16", "bfloat16", ...), so C++ and Python errors read the same.
inline std::string_view dtype_name(at::ScalarType t) { return c10::getDtypeNames(t).first; }

inline void check_same_device(const char* op, const at::Tensor& t, const std::string& name,
                              const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device());
}

// Kernels vectorise over the last dim, so only it must be dense; every other stride is honoured.
// A size-1 last dim has no meaningful stride and is accepted whatever it is.
inline void check_unit_last_stride(const char* op, const at::Tensor& t, const std::string& name) {
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
                    " must have unit stride in its last dim (got stride ", t.stride(-1), "); call .contiguous()");
}

// For tensors a forward op produced and its backward takes back (saved outputs, incoming gradients).
inline void check_contiguous_as(const char* op, const at::Tensor& t, const char* name, const char* layout,
                                at::IntArrayRef sizes, at::ScalarType dtype, const char* dtype_role) {
  TORCH_CHECK_VALUE(t.sizes() == sizes && t.scalar_type() == dtype && t.is_contiguous(), op, ": ", name,
                    " must be a contiguous ", layout, " = ", sizes, " tensor of dtype ", dtype_name(dtype), " (",
                    dtype_role, "), got shape ", t.sizes(), ", dtype ", dtype_name(t.scalar_type()), ", strides ",
                    t.strides());
}

inline void check_finite_nonneg(const char* op, double x, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(x) && x >= 0, op, ": ", name, " must be finite and >= 0, got ", x);
}

// Whether DIFFKERN_DEBUG_FILL=nan (read once): outputs start NaN-filled, so that an output element a kernel
// forgets to write fails the tests instead of holding stale memory.
inline bool debug_fill_nan() {
  static const bool fill_nan = [] {
    const char* v = std::getenv("DIFFKERN_DEBUG_FILL");
    return v != nullptr && std::string_view(v) == "nan";
  }();
  return fill_nan;
}

// at::empty, or a NaN-filled tensor under DIFFKERN_DEBUG_FILL=nan.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return debug_fill_nan() ? at::full(sizes, NAN, options) : at::empty(sizes, options);
}

}  // namespace diffkern
