// The activations R-MDM's training forward keeps for its backward (rmdm_recurse_keep / rmdm_recurse_keep_bwd,
// csrc/cpu/rmdm_recurse.cpp and csrc/cpu/rmdm_recurse_keep_bwd.cpp; python/diffkern/rmdm/op.py `acts_numel` is
// the same count).
//
// One flat buffer in the accumulation type. Per block k, field by field, every iteration's rows follow each
// other: field F of block k is [n_iter, M, width(F)] (M = B*T), so the backward forms a weight gradient over all
// n_iter iterations with one GEMM. Fields per row of one block evaluation: the LayerNorms' normalised inputs and
// reciprocal deviations, the GEMM inputs u1, ctx, u2, g = gelu(z), the qkv projection, the attention
// probabilities (heads * T per row: [B, heads, T, T] per iteration), the slope gelu'(z) at the MLP's
// pre-activation z (the forward computes it with gelu(z), diffkern/rmdm_gelu.h), and, with adaLN, the ungated
// branch outputs a and y (the gates' gradients need them).
#pragma once

#include <cstdint>

namespace diffkern::rmdm {

enum ActField : int { kXhat1, kRstd1, kU1, kQkv, kProbs, kCtx, kAttnOut, kXhat2, kRstd2, kU2, kSlope, kG, kMlpOut,
                      kActFields };

struct ActsLayout {
  int64_t rows = 0, n_iter = 0, width[kActFields] = {}, offset[kActFields] = {}, per_block = 0;

  ActsLayout(int64_t B, int64_t T, int64_t d, int64_t f, int64_t heads, int64_t n_iter_, bool with_mod)
      : rows(B * T), n_iter(n_iter_) {
    const int64_t mod_d = with_mod ? d : 0;
    const int64_t w[kActFields] = {d, 1, d, 3 * d, heads * T, d, mod_d, d, 1, d, f, f, mod_d};
    for (int i = 0; i < kActFields; ++i) {
      width[i] = w[i];
      offset[i] = per_block;
      per_block += n_iter * rows * w[i];
    }
  }

  int64_t numel(int64_t K) const { return K * per_block; }

  // Field `f` of block k: its iteration `it` rows, or (it = 0) the start of all n_iter iterations' rows.
  template <typename T>
  T* at(T* base, int64_t k, ActField f, int64_t it = 0) const {
    return base + k * per_block + offset[f] + it * rows * width[f];
  }
};

}  // namespace diffkern::rmdm
