// Per-sample scalar math of Flow-GRPO's SDE step (specs/grpo.md), shared by the CPU and CUDA kernels.
// Torch-free: T is the accumulation type. python/diffkern/grpo/reference.py `step_coefficients` is
// the same math for the reference and Triton backends.
#pragma once

#include <math.h>

#include "diffkern/macros.h"

namespace diffkern::grpo {

enum StdRule : int { kWan = 0, kSD3 = 1 };

// One step sigma -> sigma_next (dt = sigma_next - sigma < 0, Dt = -dt) of a sample:
//   mu = a x + b v,  x_next = mu + noise_scale * eps,
//   log_prob = -mean((x_next - mu)^2) * inv_2var - log_norm,  inv_lambda = 1 / lambda (TGR).
template <typename T>
struct StepCoef {
  T a, b, noise_scale, inv_2var, log_norm, inv_lambda;
};

// The step's std: c sigma ("wan") or Flow-GRPO's SD3 form c sqrt(sigma / (1 - s)) ("sd3"), where s = sigma,
// except at sigma == 1 (the first sigma of diffusers' schedules), where Flow-GRPO puts the schedule's second
// sigma (scheduler.sigmas[1]) in the denominator: that is this first step's sigma_next, so s = sigma_next.
// Every other factor of the step is finite at sigma = 1 (they divide by sigma, not by 1 - sigma) and at
// sigma_next = 0 (Dt = sigma > 0).
template <typename T>
DIFFKERN_HD inline T step_std(T sigma, T sigma_next, int std_rule, T std_coef) {
  return std_rule == kWan ? std_coef * sigma
                          : std_coef * sqrt(sigma / (T(1) - (sigma == T(1) ? sigma_next : sigma)));
}

template <typename T>
DIFFKERN_HD inline StepCoef<T> step_coefficients(T sigma, T sigma_next, int std_rule, T std_coef) {
  const T dt = sigma_next - sigma, Dt = -dt;
  const T std = step_std(sigma, sigma_next, std_rule, std_coef);
  const T s2 = std * std, sqrt_Dt = sqrt(Dt);
  const T half_log_2pi = T(0.91893853320467274178);
  const T lambda = sqrt_Dt / std + std * sqrt_Dt * (T(1) - sigma) / (T(2) * sigma);
  return {T(1) + s2 * dt / (T(2) * sigma),
          (T(1) + s2 * (T(1) - sigma) / (T(2) * sigma)) * dt,
          std * sqrt_Dt,
          T(1) / (T(2) * s2 * Dt),
          log(std * sqrt_Dt) + half_log_2pi,
          T(1) / lambda};
}

// Whether sigma -> sigma_next is a step the formulas above are defined for (both rules, "sd3" at sigma = 1
// included): 0 <= sigma_next < sigma <= 1. NaN is not.
template <typename T>
DIFFKERN_HD inline bool valid_step(T sigma, T sigma_next) {
  return sigma_next >= T(0) && sigma_next < sigma && sigma <= T(1);
}

// x_next - mu of one element from the residual target y = x_next - a x, or from x_next and x: the
// loss's residual, written so that both forms round alike ((target - b v) - a x).
template <typename T>
DIFFKERN_HD inline T residual(const StepCoef<T>& c, T target, T v) {
  return target - c.b * v;
}

template <typename T>
DIFFKERN_HD inline T residual(const StepCoef<T>& c, T target, T v, T x) {
  return residual(c, target, v) - c.a * x;
}

// The PPO-clip term of one sample (specs/grpo.md "Loss") and its derivatives, exactly as autograd
// differentiates  l = max(-w A r, -w A clip(r, lo, hi)),  r = exp(delta),  delta = log p - log p_old:
// torch.maximum lets NaN win and splits the gradient of a tie in halves (a NaN sends it to both
// sides); clamp passes the gradient inside [lo, hi], bounds included. lo = 1 - clip_eps and
// hi = 1 + clip_eps are rounded to T by the caller (from double, as torch.clamp rounds its bounds).
// python/diffkern/grpo/reference.py `ppo_epilogue` is the same math.
template <typename T>
struct PpoTerm {
  T loss, ratio, dlog_prob, dadvantage;  // l, r, dl/d(log p), dl/dA
};

template <typename T>
DIFFKERN_HD inline PpoTerm<T> ppo_term(T delta, T advantage, T weight, T lo, T hi) {
  const T r = exp(delta), rc = r < lo ? lo : (r > hi ? hi : r);
  const T wa = weight * advantage, a = -wa * r, b = -wa * rc;
  const T ga = a == b ? T(0.5) : (a < b ? T(0) : T(1)), gb = a == b ? T(0.5) : (a > b ? T(0) : T(1));
  const T in_range = r >= lo && r <= hi ? T(1) : T(0);
  return {a != a || a >= b ? a : b, r, -wa * (ga + gb * in_range) * r, -weight * (ga * r + gb * rc)};
}

}  // namespace diffkern::grpo
