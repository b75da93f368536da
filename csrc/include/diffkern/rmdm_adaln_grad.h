// The adaLN modulation's gradients, shared by both CPU backwards of the recursion (rmdm_recurse_bwd.cpp, which
// recomputes, and rmdm_recurse_keep_bwd.cpp, which reads kept activations). ATen ops on [B, T, d] tensors; m and
// dm are one block's modulation and its gradient, [B, 6, d] (shift1, scale1, gate1, shift2, scale2, gate2).
#pragma once

#include <ATen/ATen.h>

#include "diffkern/rmdm_math.h"

namespace diffkern::rmdm {

// Through u = ln (1 + scale) + shift (ln the LayerNorm's affine output): accumulates d shift = sum_t du and
// d scale = sum_t du ln into dm, and turns du, in place, into the gradient reaching ln, du (1 + scale).
inline void modulation_backward(at::Tensor& du, const at::Tensor& ln, const at::Tensor& m, ModPart shift,
                                at::Tensor& dm) {
  dm.select(1, shift).add_(du.sum(1));
  dm.select(1, shift + 1).add_((du * ln).sum(1));
  du.mul_(m.select(1, shift + 1).unsqueeze(1) + 1);
}

// Through out = h + gate * branch: accumulates d gate = sum_t dout branch into dm.
inline void gate_backward(const at::Tensor& dout, const at::Tensor& branch, ModPart gate, at::Tensor& dm) {
  dm.select(1, gate).add_((dout * branch).sum(1));
}

}  // namespace diffkern::rmdm
