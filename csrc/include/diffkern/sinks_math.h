// Scalar math of sink suppression (specs/sinks.md), shared by the C++ CPU kernels and any CUDA kernel.
// python/diffkern/sinks/reference.py `suppression_weights` is the same rule for the reference and
// Triton backends.
#pragma once

#include <math.h>

#include "diffkern/macros.h"

namespace diffkern::sinks {

// With bias b on the selected keys S of a row, P_ij = exp(s_ij - lse_i) the unmasked probabilities:
//   out' = (o - w sum_S P v) / (1 - w sum_S P),   P'_ij = g P_ij / (1 - w sum_S P)  (j in S),
// w = 1 - e^b, g = e^b. When S holds every key, the bias shifts every logit alike and cancels in the
// softmax: (w, g) = (0, 1) keeps the unmasked row (also for b = -inf, the limit of finite biases).
// The correction divides the unmasked row's rounding error by its denominator 1 - w sum_S P, which
// vanishes when the suppressed keys hold nearly all of the row's mass (the paper's situation): a row
// whose denominator is below kRecomputeBelow is recomputed as the masked softmax itself,
// softmax_j(s_ij + b [j in S]) v, so no row's error is amplified more than 1 / kRecomputeBelow = 8x
// (3 bits of fp32, below a bf16 or fp16 output's rounding), and only rows whose suppressed keys hold
// over 7/8 of the mass pay for the second pass.
constexpr double kRecomputeBelow = 0.125;

struct SuppressionWeights {
  double w, g;
};

DIFFKERN_HD inline SuppressionWeights suppression_weights(double bias, long long n_selected, long long n_keys) {
  if (n_selected >= n_keys) return {0.0, 1.0};
  const double g = exp(bias);
  return {1.0 - g, g};
}

}  // namespace diffkern::sinks
