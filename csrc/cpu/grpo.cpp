// CPU kernels of the Flow-GRPO ops (specs/grpo.md; schemas in csrc/diffkern/ops.cpp).
//
// Each sample's D elements are cut into chunks of kChunk; tasks are (sample, chunk) pairs run in
// parallel, each leaving one partial sum, and the partials of a sample are added in chunk order: the
// result does not depend on the thread count. Traffic, in elements of B*D: flow_sde_step reads x, v,
// noise and writes x_next, mu; grpo_log_prob reads v, x, x_next (+ v_uncond, v_ref); the backward
// reads the same again and writes dv (+ dv_uncond).
#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "convert.h"
#include "diffkern/check.h"
#include "diffkern/grpo_math.h"

namespace diffkern::grpo {
namespace {

using cpu::narrow;
using cpu::staging;
using cpu::widen;

// Elements per parallel task, hence per partial sum: fixed, so the sums do not depend on the thread
// count; large enough (64 KB of fp32 per operand) that scheduling costs vanish.
constexpr int64_t kChunk = 16384;
// Elements widened into L1-resident fp32 rows at a time.
constexpr int64_t kRow = 512;

constexpr const char* kStepOp = "flow_sde_step";
constexpr const char* kLossOp = "grpo_iso_loss";

struct Geometry {
  int64_t B, D, n_chunks;
};

// A named tensor argument; nullptr for an absent optional one.
using NamedTensor = std::pair<const char*, const at::Tensor*>;

Geometry check_latents(const char* op, const at::Tensor& x, std::initializer_list<NamedTensor> others,
                       const at::Tensor& sigma, const at::Tensor& sigma_next, int64_t std_rule, double std_coef) {
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must be [B, ...], got a 0-dim tensor");
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK_VALUE(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble, op,
                    ": x dtype must be float16, bfloat16, float32 or float64, got ", dtype_name(t));
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous; call .contiguous()");
  for (const auto& [name, p] : others) {
    if (p == nullptr) continue;
    const at::Tensor& y = *p;
    TORCH_CHECK_VALUE(y.sizes() == x.sizes(), op, ": ", name, " has shape ", y.sizes(), " but x has shape ", x.sizes());
    TORCH_CHECK_VALUE(y.scalar_type() == t, op, ": ", name, " dtype ", dtype_name(y.scalar_type()),
                      " differs from x dtype ", dtype_name(t));
    check_same_device(op, y, name, x, "x");
    TORCH_CHECK_VALUE(y.is_contiguous(), op, ": ", name, " must be contiguous; call .contiguous()");
  }
  const int64_t B = x.size(0), D = B > 0 ? x.numel() / B : 0;
  TORCH_CHECK_VALUE(B == 0 || D >= 1, op, ": x must have at least one element per sample, got shape ", x.sizes());
  for (const auto& [name, s] : {NamedTensor{"sigma", &sigma}, {"sigma_next", &sigma_next}}) {
    check_same_device(op, *s, name, x, "x");
    TORCH_CHECK_VALUE(s->dim() == 1 && s->size(0) == B, op, ": ", name, " must be [B] = [", B, "], got shape ",
                      s->sizes());
    TORCH_CHECK_VALUE(s->scalar_type() == at::kFloat || s->scalar_type() == at::kDouble, op, ": ", name,
                      " dtype must be float32 or float64, got ", dtype_name(s->scalar_type()));
  }
  TORCH_CHECK_VALUE(std_rule == kWan || std_rule == kSD3, op, ": std_rule must be 0 (wan) or 1 (sd3), got ", std_rule);
  TORCH_CHECK_VALUE(std::isfinite(std_coef) && std_coef > 0, op, ": std_coef must be finite and > 0, got ", std_coef);
  return {B, D, (D + kChunk - 1) / kChunk};
}

template <typename acc_t>
std::vector<StepCoef<acc_t>> coefficients(const at::Tensor& sigma, const at::Tensor& sigma_next, int64_t std_rule,
                                          double std_coef) {
  const at::Tensor s = sigma.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const at::Tensor sn = sigma_next.to(s.scalar_type()).contiguous();
  std::vector<StepCoef<acc_t>> c;
  for (int64_t i = 0; i < s.numel(); ++i) {
    c.push_back(step_coefficients<acc_t>(s.const_data_ptr<acc_t>()[i], sn.const_data_ptr<acc_t>()[i],
                                         static_cast<int>(std_rule), static_cast<acc_t>(std_coef)));
  }
  return c;
}

// Calls f(i, offset, n) for every row of at most kRow elements of task `task`'s chunk: i is the
// sample, offset the row's first element in the [B, D] tensors.
template <typename F>
inline void for_rows(const Geometry& g, int64_t task, const F& f) {
  const int64_t i = task / g.n_chunks, e0 = task % g.n_chunks * kChunk, e_end = std::min(g.D, e0 + kChunk);
  for (int64_t e = e0; e < e_end; e += kRow) f(i, i * g.D + e, std::min(kRow, e_end - e));
}

// Sums the (sample, chunk) partials of each sample in chunk order.
template <typename acc_t>
std::vector<acc_t> per_sample(const Geometry& g, const std::vector<acc_t>& partial) {
  std::vector<acc_t> total(g.B, acc_t(0));
  for (int64_t i = 0; i < g.B; ++i)
    for (int64_t c = 0; c < g.n_chunks; ++c) total[i] += partial[i * g.n_chunks + c];
  return total;
}

template <typename scalar_t>
void sde_step_kernel(const Geometry& g, const at::Tensor& x, const at::Tensor& v, const at::Tensor& sigma,
                     const at::Tensor& sigma_next, const at::Tensor& eps, int64_t std_rule, double std_coef,
                     at::Tensor& x_next, at::Tensor& mu, at::Tensor& log_prob, at::Tensor& inv_lambda) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto coef = coefficients<acc_t>(sigma, sigma_next, std_rule, std_coef);
  const scalar_t *px = x.const_data_ptr<scalar_t>(), *pv = v.const_data_ptr<scalar_t>(),
                 *pn = eps.const_data_ptr<scalar_t>();
  scalar_t *pxn = x_next.mutable_data_ptr<scalar_t>(), *pmu = mu.mutable_data_ptr<scalar_t>();
  std::vector<acc_t> partial(g.B * g.n_chunks);
  at::parallel_for(0, g.B * g.n_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(6 * kRow);
    acc_t *bx = buf.data(), *bv = bx + kRow, *bn = bv + kRow, *bmu = bn + kRow, *bxn = bmu + kRow, *bback = bxn + kRow;
    for (int64_t task = begin; task < end; ++task) {
      acc_t ss = 0;
      for_rows(g, task, [&](int64_t i, int64_t off, int64_t n) {
        const StepCoef<acc_t>& c = coef[i];
        const acc_t *__restrict xr = widen(px + off, bx, n), *__restrict vr = widen(pv + off, bv, n),
                    *__restrict nr = widen(pn + off, bn, n);
        acc_t *__restrict mur = staging(pmu + off, bmu), *__restrict xnr = staging(pxn + off, bxn);
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          mur[j] = c.a * xr[j] + c.b * vr[j];
          xnr[j] = mur[j] + c.noise_scale * nr[j];
        }
        narrow(mur, pmu + off, n);
        narrow(xnr, pxn + off, n);
        // log_prob is taken of x_next as stored (rounded to x's dtype), the value training reads back.
        const acc_t* __restrict back = widen(pxn + off, bback, n);
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < n; ++j) ss += (back[j] - mur[j]) * (back[j] - mur[j]);
      });
      partial[task] = ss;
    }
  });
  const std::vector<acc_t> ss = per_sample(g, partial);
  for (int64_t i = 0; i < g.B; ++i) {
    log_prob.mutable_data_ptr<acc_t>()[i] = -ss[i] / acc_t(g.D) * coef[i].inv_2var - coef[i].log_norm;
    inv_lambda.mutable_data_ptr<acc_t>()[i] = coef[i].inv_lambda;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flow_sde_step_cpu(
    const at::Tensor& x, const at::Tensor& v, const at::Tensor& sigma, const at::Tensor& sigma_next,
    const at::Tensor& eps, int64_t std_rule, double std_coef) {
  const Geometry g = check_latents(kStepOp, x, {{"v", &v}, {"eps", &eps}}, sigma, sigma_next, std_rule, std_coef);
  const at::ScalarType acc_dtype = at::toOpMathType(x.scalar_type());
  at::Tensor x_next = empty_output(x.sizes(), x.options()), mu = empty_output(x.sizes(), x.options());
  at::Tensor log_prob = empty_output({g.B}, x.options().dtype(acc_dtype));
  at::Tensor inv_lambda = empty_output({g.B}, log_prob.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kStepOp, [&] {
    sde_step_kernel<scalar_t>(g, x, v, sigma, sigma_next, eps, std_rule, std_coef, x_next, mu, log_prob, inv_lambda);
  });
  return {x_next, mu, log_prob, inv_lambda};
}

// The velocity a row is trained through: v, or v_uncond + w (v - v_uncond) under classifier-free guidance.
template <typename scalar_t, typename acc_t>
struct Velocity {
  const scalar_t *v, *vu;
  acc_t w;
  const acc_t* row(int64_t off, int64_t n, acc_t* bv, acc_t* bu) const {
    const acc_t* __restrict vr = widen(v + off, bv, n);
    if (vu == nullptr) return vr;
    const acc_t* __restrict ur = widen(vu + off, bu, n);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) bv[j] = ur[j] + w * (vr[j] - ur[j]);
    return bv;
  }
};

template <typename scalar_t>
const scalar_t* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<scalar_t>() : nullptr;
}

Geometry check_loss_args(const at::Tensor& v, const at::Tensor& x, const at::Tensor& x_next, const at::Tensor& sigma,
                         const at::Tensor& sigma_next, const std::optional<at::Tensor>& v_ref,
                         const std::optional<at::Tensor>& v_uncond, double cfg_scale, int64_t std_rule,
                         double std_coef) {
  const Geometry g = check_latents(kLossOp, x,
                                   {{"v", &v}, {"x_next", &x_next}, {"v_ref", v_ref ? &*v_ref : nullptr},
                                    {"v_uncond", v_uncond ? &*v_uncond : nullptr}},
                                   sigma, sigma_next, std_rule, std_coef);
  TORCH_CHECK_VALUE(std::isfinite(cfg_scale), kLossOp, ": cfg_scale must be finite, got ", cfg_scale);
  return g;
}

template <typename scalar_t>
void log_prob_kernel(const Geometry& g, const at::Tensor& v, const at::Tensor& x, const at::Tensor& x_next,
                     const at::Tensor& sigma, const at::Tensor& sigma_next, const std::optional<at::Tensor>& v_ref,
                     const std::optional<at::Tensor>& v_uncond, double cfg_scale, int64_t std_rule, double std_coef,
                     at::Tensor& log_prob, at::Tensor& kl, at::Tensor& inv_lambda) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto coef = coefficients<acc_t>(sigma, sigma_next, std_rule, std_coef);
  const Velocity<scalar_t, acc_t> vel{v.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(v_uncond),
                                      static_cast<acc_t>(cfg_scale)};
  const scalar_t *px = x.const_data_ptr<scalar_t>(), *pxn = x_next.const_data_ptr<scalar_t>(),
                 *pref = data_or_null<scalar_t>(v_ref);
  std::vector<acc_t> partial_sq(g.B * g.n_chunks), partial_kl(g.B * g.n_chunks);
  at::parallel_for(0, g.B * g.n_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(5 * kRow);
    acc_t *bv = buf.data(), *bu = bv + kRow, *bx = bu + kRow, *bxn = bx + kRow, *bref = bxn + kRow;
    for (int64_t task = begin; task < end; ++task) {
      acc_t ss = 0, kk = 0;
      for_rows(g, task, [&](int64_t i, int64_t off, int64_t n) {
        const StepCoef<acc_t>& c = coef[i];
        const acc_t *__restrict vr = vel.row(off, n, bv, bu), *__restrict xr = widen(px + off, bx, n),
                    *__restrict xnr = widen(pxn + off, bxn, n);
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < n; ++j) {
          const acc_t r = xnr[j] - (c.a * xr[j] + c.b * vr[j]);
          ss += r * r;
        }
        if (pref != nullptr) {
          const acc_t* __restrict rr = widen(pref + off, bref, n);
#pragma omp simd reduction(+ : kk)
          for (int64_t j = 0; j < n; ++j) kk += (vr[j] - rr[j]) * (vr[j] - rr[j]);
        }
      });
      partial_sq[task] = ss;
      partial_kl[task] = kk;
    }
  });
  const std::vector<acc_t> ss = per_sample(g, partial_sq), kk = per_sample(g, partial_kl);
  for (int64_t i = 0; i < g.B; ++i) {
    const StepCoef<acc_t>& c = coef[i];
    log_prob.mutable_data_ptr<acc_t>()[i] = -ss[i] / acc_t(g.D) * c.inv_2var - c.log_norm;
    // mu - mu_ref = b (v - v_ref): the x terms cancel.
    kl.mutable_data_ptr<acc_t>()[i] = c.b * c.b * kk[i] / acc_t(g.D) * c.inv_2var;
    inv_lambda.mutable_data_ptr<acc_t>()[i] = c.inv_lambda;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grpo_log_prob_cpu(
    const at::Tensor& v, const at::Tensor& x, const at::Tensor& x_next, const at::Tensor& sigma,
    const at::Tensor& sigma_next, const std::optional<at::Tensor>& v_ref, const std::optional<at::Tensor>& v_uncond,
    double cfg_scale, int64_t std_rule, double std_coef) {
  const Geometry g = check_loss_args(v, x, x_next, sigma, sigma_next, v_ref, v_uncond, cfg_scale, std_rule, std_coef);
  const at::ScalarType acc_dtype = at::toOpMathType(x.scalar_type());
  at::Tensor log_prob = empty_output({g.B}, x.options().dtype(acc_dtype));
  at::Tensor kl = empty_output({g.B}, log_prob.options()), inv_lambda = empty_output({g.B}, log_prob.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kLossOp, [&] {
    log_prob_kernel<scalar_t>(g, v, x, x_next, sigma, sigma_next, v_ref, v_uncond, cfg_scale, std_rule, std_coef,
                              log_prob, kl, inv_lambda);
  });
  return {log_prob, kl, inv_lambda};
}

template <typename scalar_t>
void log_prob_bwd_kernel(const Geometry& g, const at::Tensor& dlog_prob, const at::Tensor& dkl, const at::Tensor& v,
                         const at::Tensor& x, const at::Tensor& x_next, const at::Tensor& sigma,
                         const at::Tensor& sigma_next, const std::optional<at::Tensor>& v_ref,
                         const std::optional<at::Tensor>& v_uncond, double cfg_scale, int64_t std_rule,
                         double std_coef, std::vector<at::Tensor>& grads) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto coef = coefficients<acc_t>(sigma, sigma_next, std_rule, std_coef);
  const acc_t w = v_uncond ? static_cast<acc_t>(cfg_scale) : acc_t(1);
  const Velocity<scalar_t, acc_t> vel{v.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(v_uncond), w};
  const scalar_t *px = x.const_data_ptr<scalar_t>(), *pxn = x_next.const_data_ptr<scalar_t>(),
                 *pref = data_or_null<scalar_t>(v_ref);
  const acc_t *glp = dlog_prob.const_data_ptr<acc_t>(), *gkl = dkl.const_data_ptr<acc_t>();
  scalar_t* pdv = grads[0].mutable_data_ptr<scalar_t>();
  scalar_t* pdu = v_uncond ? grads[1].mutable_data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, g.B * g.n_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(7 * kRow);
    acc_t *bv = buf.data(), *bu = bv + kRow, *bx = bu + kRow, *bxn = bx + kRow, *bref = bxn + kRow,
          *bdv = bref + kRow, *bdu = bdv + kRow;
    for (int64_t task = begin; task < end; ++task) {
      for_rows(g, task, [&](int64_t i, int64_t off, int64_t n) {
        const StepCoef<acc_t>& c = coef[i];
        // d log_prob / dv = (x_next - mu) b / (std^2 Dt D); d kl / dv = b^2 (v - v_ref) / (std^2 Dt D)
        const acc_t k = c.b * 2 * c.inv_2var / acc_t(g.D), k_lp = glp[i] * k, k_kl = gkl[i] * k * c.b;
        const acc_t *__restrict vr = vel.row(off, n, bv, bu), *__restrict xr = widen(px + off, bx, n),
                    *__restrict xnr = widen(pxn + off, bxn, n);
        const acc_t* __restrict rr = pref != nullptr ? widen(pref + off, bref, n) : vr;
        acc_t *__restrict dv = staging(pdv + off, bdv), *__restrict du = pdu ? staging(pdu + off, bdu) : bdu;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const acc_t d = k_lp * (xnr[j] - (c.a * xr[j] + c.b * vr[j])) + k_kl * (vr[j] - rr[j]);
          dv[j] = w * d;
          du[j] = (acc_t(1) - w) * d;
        }
        narrow(dv, pdv + off, n);
        if (pdu != nullptr) narrow(du, pdu + off, n);
      });
    }
  });
}

std::vector<at::Tensor> grpo_log_prob_bwd_cpu(const at::Tensor& dlog_prob, const at::Tensor& dkl, const at::Tensor& v,
                                              const at::Tensor& x, const at::Tensor& x_next, const at::Tensor& sigma,
                                              const at::Tensor& sigma_next, const std::optional<at::Tensor>& v_ref,
                                              const std::optional<at::Tensor>& v_uncond, double cfg_scale,
                                              int64_t std_rule, double std_coef) {
  const Geometry g = check_loss_args(v, x, x_next, sigma, sigma_next, v_ref, v_uncond, cfg_scale, std_rule, std_coef);
  const at::ScalarType acc_dtype = at::toOpMathType(x.scalar_type());
  const std::vector<int64_t> b_shape{g.B};
  for (const auto& [name, t] : {NamedTensor{"dlog_prob", &dlog_prob}, {"dkl", &dkl}}) {
    check_same_device(kLossOp, *t, name, x, "x");
    check_contiguous_as(kLossOp, *t, name, "[B]", b_shape, acc_dtype, "the accumulation dtype");
  }
  std::vector<at::Tensor> grads{empty_output(x.sizes(), x.options())};
  if (v_uncond) grads.push_back(empty_output(x.sizes(), x.options()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kLossOp, [&] {
    log_prob_bwd_kernel<scalar_t>(g, dlog_prob, dkl, v, x, x_next, sigma, sigma_next, v_ref, v_uncond, cfg_scale,
                                  std_rule, std_coef, grads);
  });
  return grads;
}

}  // namespace
}  // namespace diffkern::grpo

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("flow_sde_step", TORCH_FN(diffkern::grpo::flow_sde_step_cpu));
  m.impl("grpo_log_prob", TORCH_FN(diffkern::grpo::grpo_log_prob_cpu));
  m.impl("grpo_log_prob_bwd", TORCH_FN(diffkern::grpo::grpo_log_prob_bwd_cpu));
}
