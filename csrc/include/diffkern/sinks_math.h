// Scalar math of sink suppression (specs/sinks.md), shared by the C++ CPU kernels and any CUDA kernel.
// python/diffkern/sinks/reference.py `suppression_weights` and `recompute_below` are the same rules for the
// reference and Triton backends.
#pragma once

#include <math.h>

#include "diffkern/macros.h"

namespace diffkern::sinks {

// With bias b on the selected keys S of a row, g = e^b and P_ij = exp(s_ij - lse_i) the unmasked
// probabilities, the corrected row is
//   out' = (a o - w sum_S P v) / (a - d sum_S P),   post' = g' P_i,idx0 / (a - d sum_S P)
// with (a, w, d, g') from suppression_weights:
//  - renormalize (a logit bias; probabilities of S scaled by g and the row renormalised), b <= 0:
//    (1, 1 - g, 1 - g, g), i.e. out' = (o - (1 - g) sum_S P v) / (1 - (1 - g) sum_S P).
//  - renormalize, b > 0 (amplification): the same divided through by g, so that nothing overflows for a
//    large b: h = e^-b, (h, h - 1, h - 1, 1); the denominator h + (1 - h) sum_S P is >= h, i.e. the
//    normalised denominator 1 + (g - 1) sum_S P is >= 1: no amplification of the correction's error.
//  - renormalize with S holding every key: the bias shifts every logit alike and cancels in the softmax:
//    (1, 0, 0, 1) keeps the unmasked row (also for b = -inf, the limit of finite biases).
//  - value path (!renormalize: the selected keys' values scaled by g, probabilities untouched):
//    (1, 1 - g, 0, 1), out' = o - (1 - g) sum_S P v, post' = the unmasked P; S = every key gives g o.
// The correction carries errors the masked softmax does not have: o's rounding, and the rounding of lse and
// of the selected keys' logits in P_S = exp(s_S - lse) (s_S is computed apart from the forward's), whose
// error the masked output never sees since it drops those keys. Relative to the output, all of them are
// amplified by up to a / (a - w sum_S P): through the denominator (renormalize: d = w), or through the
// cancellation in o - w sum_S P v (value path: the output is that factor times o's size), which vanishes when
// the suppressed keys hold nearly all of the row's mass (the paper's situation). A row with
// a - w sum_S P <= recompute_below(output bytes) * a is recomputed as the masked softmax itself,
// softmax_j(s_ij + b [j in S]) v (value path: softmax_j(s_ij) v' with v'_j = g v_j on S), so no corrected
// row's error is amplified more than 1 / recompute_below (b > 0 never recomputes: a - w sum_S P >= a, nor
// does g >= 1 on the value path; a = 0 = a - w sum_S P, e^-b and the selected keys' unmasked
// probabilities all underflowed, does):
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
  double a, w, d, g;
};

DIFFKERN_HD inline SuppressionWeights suppression_weights(double bias, long long n_selected, long long n_keys,
                                                          bool renormalize) {
  if (!renormalize) return {1.0, 1.0 - exp(bias), 0.0, 1.0};
  if (n_selected >= n_keys) return {1.0, 0.0, 0.0, 1.0};
  if (bias > 0) {
    const double h = exp(-bias);
    return {h, h - 1.0, h - 1.0, 1.0};
  }
  const double g = exp(bias);
  return {1.0, 1.0 - g, 1.0 - g, g};
}

}  // namespace diffkern::sinks
