// Argument checks of the DAR routing and gathering ops, shared by every C++ implementation (the CPU kernels in
// csrc/cpu/dar.cpp, the CUDA glue in csrc/cuda/): one wording, one set of rules.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include "diffkern/check.h"
#include "diffkern/dar_math.h"

namespace diffkern::dar {

inline constexpr const char* kOp = "dar_route";
inline constexpr const char* kGatherOp = "dar_gather";

struct Geometry {
  int64_t B, T, d, n;
  QKind q_kind;
  int64_t q_sb, q_st;  // q's batch and token strides, 0 along the dims it broadcasts over
};

inline void check_param_dtype(const at::Tensor& x, const char* name, at::ScalarType src, const char* op) {
  const at::ScalarType acc = at::toOpMathType(src);
  TORCH_CHECK_VALUE(x.scalar_type() == src || x.scalar_type() == acc, op, ": ", name, " dtype must be ",
                    dtype_name(src), " (the sources' dtype) or ", dtype_name(acc), ", got ", dtype_name(x.scalar_type()));
}

// The checks of dar_route_fwd (and of the forward inputs dar_route_bwd takes back).
inline Geometry check_route_args(at::TensorList sources, const at::Tensor& q, const at::Tensor& gain, double eps,
                                 const char* op = kOp) {
  TORCH_CHECK_VALUE(!sources.empty(), op, ": sources must hold at least one tensor");
  const at::Tensor& v0 = sources[0];
  for (size_t i = 0; i < sources.size(); ++i) {
    const at::Tensor& v = sources[i];
    const std::string name = "sources[" + std::to_string(i) + "]";
    TORCH_CHECK_VALUE(v.dim() == 3, op, ": ", name, " must be [B, T, d], got shape ", v.sizes());
    TORCH_CHECK_VALUE(v.sizes() == v0.sizes(), op, ": ", name, " has shape ", v.sizes(), " but sources[0] has shape ",
                      v0.sizes());
    const at::ScalarType t = v.scalar_type();
    TORCH_CHECK_VALUE(i > 0 || t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble, op,
                      ": sources[0] dtype must be float16, bfloat16, float32 or float64, got ", dtype_name(t));
    TORCH_CHECK_VALUE(t == v0.scalar_type(), op, ": ", name, " dtype ", dtype_name(t), " differs from sources[0] dtype ",
                      dtype_name(v0.scalar_type()));
    check_same_device(op, v, name, v0, "sources[0]");
    check_unit_last_stride(op, v, name);
  }
  const int64_t B = v0.size(0), T = v0.size(1), d = v0.size(2);
  TORCH_CHECK_VALUE(d >= 1, op, ": d must be at least 1");

  check_same_device(op, q, "q", v0, "sources[0]");
  const bool q_shape_ok = (q.dim() == 1 && q.size(0) == d) || (q.dim() == 2 && q.sizes().equals({B, d})) ||
                          (q.dim() == 3 && q.sizes().equals({B, T, d}));
  TORCH_CHECK_VALUE(q_shape_ok, op, ": q must be [d], [B, d] or [B, T, d] with B=", B, ", T=", T, ", d=", d,
                    ", got shape ", q.sizes());
  check_param_dtype(q, "q", v0.scalar_type(), op);
  check_unit_last_stride(op, q, "q");

  check_same_device(op, gain, "gain", v0, "sources[0]");
  TORCH_CHECK_VALUE(gain.dim() == 1 && gain.size(0) == d, op, ": gain must be [d] = [", d, "], got shape ", gain.sizes());
  check_param_dtype(gain, "gain", v0.scalar_type(), op);
  check_unit_last_stride(op, gain, "gain");
  check_finite_nonneg(op, eps, "eps");

  const QKind kind = q.dim() == 1 ? QKind::kStatic : q.dim() == 2 ? QKind::kPerBatch : QKind::kPerToken;
  return {B, T, d, static_cast<int64_t>(sources.size()), kind, q.dim() > 1 ? q.stride(0) : 0,
          q.dim() > 2 ? q.stride(1) : 0};
}

// The checks of dar_route_bwd: the forward's, then the gradient and the saved outputs.
inline Geometry check_route_bwd_args(const at::Tensor& dh, at::TensorList sources, const at::Tensor& q,
                                     const at::Tensor& gain, const at::Tensor& h, const at::Tensor& lse, double eps,
                                     const char* op = kOp) {
  const Geometry g = check_route_args(sources, q, gain, eps, op);
  const at::ScalarType dtype = sources[0].scalar_type(), acc_dtype = at::toOpMathType(dtype);
  const std::vector<int64_t> btd{g.B, g.T, g.d}, bt{g.B, g.T};
  check_same_device(op, dh, "dh", sources[0], "sources[0]");
  check_same_device(op, h, "h", sources[0], "sources[0]");
  check_same_device(op, lse, "lse", sources[0], "sources[0]");
  check_contiguous_as(op, dh, "dh", "[B, T, d]", btd, dtype, "the sources' dtype");
  check_contiguous_as(op, h, "h", "[B, T, d]", btd, dtype, "the sources' dtype");
  check_contiguous_as(op, lse, "lse", "[B, T]", bt, acc_dtype, "the accumulation dtype");
  return g;
}

// The checks of dar_gather_fwd: the routing sources', then every addend of the new summary against sources[0].
inline Geometry check_gather_args(at::TensorList sources, at::TensorList addends, const at::Tensor& q,
                                  const at::Tensor& gain, double eps) {
  const Geometry g = check_route_args(sources, q, gain, eps, kGatherOp);
  const at::Tensor& v0 = sources[0];
  for (size_t k = 0; k < addends.size(); ++k) {
    const at::Tensor& a = addends[k];
    const std::string name = "addends[" + std::to_string(k) + "]";
    TORCH_CHECK_VALUE(a.sizes() == v0.sizes(), kGatherOp, ": ", name, " has shape ", a.sizes(),
                      " but sources[0] has shape ", v0.sizes());
    TORCH_CHECK_VALUE(a.scalar_type() == v0.scalar_type(), kGatherOp, ": ", name, " dtype ", dtype_name(a.scalar_type()),
                      " differs from sources[0] dtype ", dtype_name(v0.scalar_type()));
    check_same_device(kGatherOp, a, name, v0, "sources[0]");
    check_unit_last_stride(kGatherOp, a, name);
  }
  return g;
}

// The checks of dar_gather_bwd: the routing backward's, then the optional gradient of the last source.
inline Geometry check_gather_bwd_args(const at::Tensor& dh, at::TensorList sources, const at::Tensor& q,
                                      const at::Tensor& gain, const at::Tensor& h, const at::Tensor& lse,
                                      const std::optional<at::Tensor>& dlast, double eps) {
  const Geometry g = check_route_bwd_args(dh, sources, q, gain, h, lse, eps, kGatherOp);
  if (dlast.has_value()) {
    check_same_device(kGatherOp, *dlast, "dlast", sources[0], "sources[0]");
    check_contiguous_as(kGatherOp, *dlast, "dlast", "[B, T, d]", std::vector<int64_t>{g.B, g.T, g.d},
                        sources[0].scalar_type(), "the sources' dtype");
  }
  return g;
}

}  // namespace diffkern::dar
