// Per-token scalar math of DAR routing (specs/dar.md "Routing"), shared by the CPU and CUDA kernels.
// Torch-free: T is the accumulation type (float, or double for float64 inputs). The kernels own the
// loops over d; these functions take the reductions those loops produce.
#pragma once

#include <math.h>

#include "diffkern/macros.h"

namespace diffkern::dar {

// The query variants (specs/dar.md): q is [d] (static), [B, d] (timestep-injected) or [B, T, d] (dynamic).
enum class QKind { kStatic, kPerBatch, kPerToken };

// ::expf/::sqrtf and friends exist both in the host C library and as CUDA device functions, so the
// overloads below compile unchanged in either pass.
DIFFKERN_HD inline float exp_(float x) { return ::expf(x); }
DIFFKERN_HD inline double exp_(double x) { return ::exp(x); }
DIFFKERN_HD inline float log_(float x) { return ::logf(x); }
DIFFKERN_HD inline double log_(double x) { return ::log(x); }
DIFFKERN_HD inline float sqrt_(float x) { return ::sqrtf(x); }
DIFFKERN_HD inline double sqrt_(double x) { return ::sqrt(x); }

// Finite inputs near the float32 maximum overflow a float32 sum of squares (or <q*g, v>, <dh, v>, the
// weighted sum) although the routing is finite. The GPU kernels route such a token again with every row
// scaled by kOverflowRescale * sigma and eps by its square: the scores, the weights and dv are unchanged
// by that scaling, h and u come back divided by it. kOverflowRescale is a power of two (exact) that
// brings float32's largest values to ~3e14, whose squares summed over any d the kernels take stay finite;
// sigma = overflow_rms_scale(m), m the largest mean((v * kOverflowRescale)^2) over the token's sources,
// then brings the largest source's rms to 1, so rstd stays near 1 and the backward's rstd^2 cannot
// underflow. (The CPU kernels route such a token again in double instead.)
constexpr float kOverflowRescale = 0x1p-80f;

template <typename T>
DIFFKERN_HD inline T overflow_rms_scale(T m) {
  return m > T(0) && m < T(INFINITY) ? T(1) / sqrt_(m) : T(1);  // 1 for 0, inf, NaN: those propagate
}

// rstd = (mean(v^2) + eps)^-1/2 from the row's sum of squares.
template <typename T>
DIFFKERN_HD inline T rstd_from_sumsq(T sumsq, T inv_d, T eps) {
  return T(1) / sqrt_(sumsq * inv_d + eps);
}

// s = <q*g, v * rstd> / sqrt(d), with p = <q*g, v> taken from the same pass as the sum of squares.
template <typename T>
DIFFKERN_HD inline T route_score(T rstd, T p, T inv_sqrt_d) {
  return rstd * p * inv_sqrt_d;
}

// Running state of a softmax over sources: max score m and sum l = sum_i exp(s_i - m). Start from
// m = -inf, l = 0 and a zero accumulator, or from the first source: m = s_0, l = 1, acc = v_0.
template <typename T>
struct SoftmaxState {
  T m;
  T l;
};

// exp(s - m) for a score s that becomes the running max m = s: 1, or NaN where the reference's
// exp(s - max(s)) is NaN (s = +inf, or NaN), so such a score makes the token NaN on every backend.
// A -inf score keeps weight 1 here and gets weight 0 as soon as a larger score arrives, as exp(-inf).
template <typename T>
DIFFKERN_HD inline T max_weight(T s) {
  return (s < T(0) || s - s == T(0)) ? T(1) : s - s;
}

// The state after the first source's score s (its value is the accumulator, with weight max_weight(s)).
template <typename T>
DIFFKERN_HD inline SoftmaxState<T> softmax_start(T s) {
  return {s, max_weight(s)};
}

// Folds score s into the state. The accumulator becomes acc * scale + w * v, where (finite scores)
// exactly one of scale, w is 1: returns true when the max grew (acc must be rescaled and v added with
// weight 1; w = NaN for s = +inf reaches h through l), false when only w * v is added.
// A NaN score fails the comparison and makes w, hence l and acc, NaN, so it propagates to h and lse.
template <typename T>
DIFFKERN_HD inline bool softmax_push(SoftmaxState<T>& st, T s, T& scale, T& w) {
  if (s > st.m) {
    scale = exp_(st.m - s);
    w = max_weight(s);
    st.l = st.l * scale + w;
    st.m = s;
    return true;
  }
  scale = T(1);
  w = exp_(s - st.m);
  st.l += w;
  return false;
}

// 1 / l, the softmax's normaliser: NaN when every score was -inf (m = -inf), where the reference's
// exp(s - max(s)) is exp(-inf + inf); single-source calls included.
template <typename T>
DIFFKERN_HD inline T softmax_inv_l(const SoftmaxState<T>& st) {
  return st.m == -T(INFINITY) ? st.m - st.m : T(1) / st.l;
}

template <typename T>
DIFFKERN_HD inline T softmax_lse(const SoftmaxState<T>& st) {
  return st.m + log_(st.l);
}

// Backward coefficients of one source: dv = alpha*dh + c*(q*g) - beta*v and u += c*v, where
//   alpha = exp(s - lse), ds = alpha (<dh, v> - delta), c = ds rstd / sqrt(d), beta = c rstd^2 p / d
// and delta = <dh, h> = sum_j alpha_j <dh, v_j> (so each source is read once).
template <typename T>
struct RouteGrad {
  T alpha;
  T c;
  T beta;
};

template <typename T>
DIFFKERN_HD inline RouteGrad<T> route_grad(T rstd, T p, T da, T delta, T lse, T inv_d, T inv_sqrt_d) {
  const T alpha = exp_(route_score(rstd, p, inv_sqrt_d) - lse);
  const T c = alpha * (da - delta) * rstd * inv_sqrt_d;
  return {alpha, c, c * rstd * rstd * p * inv_d};
}

}  // namespace diffkern::dar
