// Scalar math of sink suppression (specs/sinks.md), shared by the C++ CPU kernels and any CUDA kernel.
// python/diffkern/sinks/reference.py `suppression_weights` and `recompute_below` are the same rules for the
// reference and Triton backends.
#pragma once

#include <math.h>

#include "diffkern/macros.h"

namespace diffkern::sinks {

// With bias b on the selected keys S of a row, P_ij = exp(s_ij - lse_i) the unmasked probabilities:
//   out' = (o - w sum_S P v) / (1 - w sum_S P),   P'_ij = g P_ij / (1 - w sum_S P)  (j in S),
// w = 1 - e^b, g = e^b. When S holds every key, the bias shifts every logit alike and cancels in the
// softmax: (w, g) = (0, 1) keeps the unmasked row (also for b = -inf, the limit of finite biases).
// The correction carries errors the masked softmax does not have: o's rounding, and the rounding of lse and
// of the selected keys' logits in P_S = exp(s_S - lse) (s_S is computed apart from the forward's), whose
// error the masked output never sees since it drops those keys. Through the denominator 1 - w sum_S P,
// which vanishes when the suppressed keys hold nearly all of the row's mass (the paper's situation), all of
// them are amplified by up to 1 / (1 - w sum_S P). A row whose denominator is below
// recompute_below(output bytes) is recomputed as the masked softmax itself, softmax_j(s_ij + b [j in S]) v,
// so no corrected row's error is amplified more than 1 / recompute_below:
//  - 16-bit outputs (bf16, fp16): 1/8, at most 8x the fp32 accumulation's error (3 bits of fp32), still
//    below the output's own rounding; only rows whose suppressed keys hold over 7/8 of the mass recompute.
//  - 32/64-bit outputs (fp32, fp64): 1/2, at most 2x the accumulation's error, which the tests' error model
//    (python/diffkern/testing/numerics.py) holds: a corrected row's error there is then <= 0.5 of its
//    tolerance (measured on the CPU kernel, fp32 and fp64, 60 seeded inputs; rows whose suppressed keys
//    hold 1/2..2/3 of the mass reach 1.1x of it, 2/3..3/4 1.8x, 3/4..7/8 3.8x); rows whose suppressed
//    keys hold over half of the mass recompute.
constexpr double kRecomputeBelow16Bit = 0.125;
constexpr double kRecomputeBelowWide = 0.5;

// The recompute threshold for an output element of `output_bytes` bytes (the inputs' dtype).
DIFFKERN_HD constexpr double recompute_below(long long output_bytes) {
  return output_bytes <= 2 ? kRecomputeBelow16Bit : kRecomputeBelowWide;
}

struct SuppressionWeights {
  double w, g;
};

DIFFKERN_HD inline SuppressionWeights suppression_weights(double bias, long long n_selected, long long n_keys) {
  if (n_selected >= n_keys) return {0.0, 1.0};
  const double g = exp(bias);
  return {1.0 - g, g};
}

}  // namespace diffkern::sinks
