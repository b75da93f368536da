// CPU kernels of the Flow-GRPO ops (specs/grpo.md; schemas in csrc/diffkern/ops.cpp).
//
// Each sample's D elements are cut into chunks of kChunk; tasks are (sample, chunk) pairs run in
// parallel, each leaving one partial sum, and the partials of a sample are added in chunk order: the
// result does not depend on the thread count. Traffic, in elements of B*D: flow_sde_step reads x, v,
// eps and writes x_next, y; grpo_log_prob reads v and target (+ x, v_uncond, v_ref); the backward
// reads the same again and writes dv (+ dv_uncond). With target = y and no x that is 2 reads forward
// and 2 reads + 1 write backward.
#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
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
#include "diffkern/latent_args.h"

namespace diffkern::grpo {
namespace {

using cpu::narrow;
using cpu::staging;
using cpu::widen;

// Elements per parallel task, hence per partial sum: fixed, so the sums do not depend on the thread
// count; large enough (64 KB of fp32 per operand) that scheduling costs vanish.
constexpr int64_t kChunk = 16384;
// Least elements worth a thread (ATen's GRAIN_SIZE for elementwise loops): a smaller problem runs in
// the calling thread, where waking a second one would cost more than the work.
constexpr int64_t kMinThreadElements = 32768;
// Elements widened into L1-resident fp32 rows at a time.
constexpr int64_t kRow = 512;

constexpr const char* kStepOp = "flow_sde_step";
constexpr const char* kLossOp = "grpo_iso_loss";

struct Geometry {
  int64_t B, D, n_chunks;
};

// The step values, read here where they live on the host. The CUDA kernels do not check them (that would
// be a host sync per call): there an invalid step gives that sample NaN or inf.
// Element i of a [B] float32/float64 tensor (any stride: expanded views too), read in place.
double element(const at::Tensor& t, int64_t i) {
  const int64_t at = i * t.stride(0);
  return t.scalar_type() == at::kDouble ? t.const_data_ptr<double>()[at] : t.const_data_ptr<float>()[at];
}

void check_steps(const char* op, const at::Tensor& sigma, const at::Tensor& sigma_next) {
  for (int64_t i = 0; i < sigma.numel(); ++i) {
    const double s = element(sigma, i), sn = element(sigma_next, i);
    TORCH_CHECK_VALUE(valid_step(s, sn), op, ": sigma and sigma_next must satisfy 0 <= sigma_next < sigma <= 1, got "
                      "sigma[", i, "] = ", s, ", sigma_next[", i, "] = ", sn);
  }
}

// `lead` sets the shape, dtype and device every other latent must share.
Geometry check_latents(const char* op, NamedTensor lead, std::initializer_list<NamedTensor> others,
                       const at::Tensor& sigma, const at::Tensor& sigma_next, int64_t std_rule, double std_coef) {
  const auto [B, D] = diffkern::check_latents(op, lead, others);
  check_per_sample(op, {"sigma", &sigma}, lead);
  check_per_sample(op, {"sigma_next", &sigma_next}, lead);
  TORCH_CHECK_VALUE(std_rule == kWan || std_rule == kSD3, op, ": std_rule must be 0 (wan) or 1 (sd3), got ", std_rule);
  TORCH_CHECK_VALUE(std::isfinite(std_coef) && std_coef > 0, op, ": std_coef must be finite and > 0, got ", std_coef);
  check_steps(op, sigma, sigma_next);
  return {B, D, (D + kChunk - 1) / kChunk};
}

template <typename acc_t>
std::vector<StepCoef<acc_t>> coefficients(const at::Tensor& sigma, const at::Tensor& sigma_next, int64_t std_rule,
                                          double std_coef) {
  std::vector<StepCoef<acc_t>> c;
  c.reserve(sigma.numel());
  for (int64_t i = 0; i < sigma.numel(); ++i) {  // read in place: no tensor ops (a tiny call's time is in them)
    c.push_back(step_coefficients<acc_t>(static_cast<acc_t>(element(sigma, i)),
                                         static_cast<acc_t>(element(sigma_next, i)), static_cast<int>(std_rule),
                                         static_cast<acc_t>(std_coef)));
  }
  return c;
}

// Runs f(i, offset, n) for every row of at most kRow elements of every (sample, chunk) task, tasks in
// parallel; i is the sample, offset the row's first element in the [B, D] tensors. f returns K sums
// of its row; the result is their per-sample totals, added in chunk order.
template <int K, typename acc_t, typename F>
std::vector<std::array<acc_t, K>> for_rows(const Geometry& g, const F& f) {
  std::vector<std::array<acc_t, K>> partial(g.B * g.n_chunks);
  const int64_t grain = std::max<int64_t>(1, kMinThreadElements / std::min(g.D, kChunk));
  at::parallel_for(0, g.B * g.n_chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / g.n_chunks, e0 = task % g.n_chunks * kChunk, e_end = std::min(g.D, e0 + kChunk);
      std::array<acc_t, K> sum{};
      for (int64_t e = e0; e < e_end; e += kRow) {
        const std::array<acc_t, K> row = f(i, i * g.D + e, std::min(kRow, e_end - e));
        for (int k = 0; k < K; ++k) sum[k] += row[k];
      }
      partial[task] = sum;
    }
  });
  std::vector<std::array<acc_t, K>> total(g.B, std::array<acc_t, K>{});
  for (int64_t i = 0; i < g.B; ++i)
    for (int64_t c = 0; c < g.n_chunks; ++c)
      for (int k = 0; k < K; ++k) total[i][k] += partial[i * g.n_chunks + c][k];
  return total;
}

template <typename acc_t>
inline acc_t sq(acc_t r) {
  return r * r;
}

// Per-thread L1 rows, `count` of kRow elements.
template <typename acc_t>
struct RowBuffers {
  explicit RowBuffers(int count) : data(count * kRow) {}
  acc_t* operator[](int k) { return data.data() + k * kRow; }
  std::vector<acc_t> data;
};

// The calling thread's `count` row buffers, allocated on its first call. Out of line on purpose: a
// thread_local initialised inside a kernel's row lambda let the compiler emit the row loop twice (after
// the initialisation and on the warm path), and the two copies rounded differently, so a thread's first
// call differed from its later ones in the last bits (flow_sde_step's log_prob in a fresh process).
template <typename acc_t, int count>
[[gnu::noinline]] RowBuffers<acc_t>& row_buffers() {
  thread_local RowBuffers<acc_t> buf(count);
  return buf;
}

template <typename scalar_t>
void sde_step_kernel(const Geometry& g, const at::Tensor& x, const at::Tensor& v, const at::Tensor& sigma,
                     const at::Tensor& sigma_next, const at::Tensor& eps, int64_t std_rule, double std_coef,
                     at::Tensor& x_next, at::Tensor& y, at::Tensor& log_prob, at::Tensor& inv_lambda) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto coef = coefficients<acc_t>(sigma, sigma_next, std_rule, std_coef);
  const scalar_t *px = x.const_data_ptr<scalar_t>(), *pv = v.const_data_ptr<scalar_t>(),
                 *pn = eps.const_data_ptr<scalar_t>();
  scalar_t *pxn = x_next.mutable_data_ptr<scalar_t>(), *py = y.mutable_data_ptr<scalar_t>();
  const auto ss = for_rows<1, acc_t>(g, [&](int64_t i, int64_t off, int64_t n) {
    RowBuffers<acc_t>& buf = row_buffers<acc_t, 5>();
    const StepCoef<acc_t>& c = coef[i];
    const acc_t *__restrict xr = widen(px + off, buf[0], n), *__restrict vr = widen(pv + off, buf[1], n),
                *__restrict nr = widen(pn + off, buf[2], n);
    acc_t *__restrict yr = staging(py + off, buf[3]), *__restrict xnr = staging(pxn + off, buf[4]);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      yr[j] = c.b * vr[j] + c.noise_scale * nr[j];
      xnr[j] = c.a * xr[j] + yr[j];
    }
    narrow(yr, py + off, n);
    narrow(xnr, pxn + off, n);
    // log_prob is of y as stored (rounded to x's dtype), the value the loss reads back.
    const acc_t* __restrict back = widen(py + off, buf[3], n);
    acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < n; ++j) ss += sq(residual(c, back[j], vr[j]));
    return std::array<acc_t, 1>{ss};
  });
  for (int64_t i = 0; i < g.B; ++i) {
    log_prob.mutable_data_ptr<acc_t>()[i] = -ss[i][0] / acc_t(g.D) * coef[i].inv_2var - coef[i].log_norm;
    inv_lambda.mutable_data_ptr<acc_t>()[i] = coef[i].inv_lambda;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flow_sde_step_cpu(
    const at::Tensor& x, const at::Tensor& v, const at::Tensor& sigma, const at::Tensor& sigma_next,
    const at::Tensor& eps, int64_t std_rule, double std_coef) {
  const Geometry g =
      check_latents(kStepOp, {"x", &x}, {{"v", &v}, {"eps", &eps}}, sigma, sigma_next, std_rule, std_coef);
  const at::ScalarType acc_dtype = at::toOpMathType(x.scalar_type());
  at::Tensor x_next = empty_output(x.sizes(), x.options()), y = empty_output(x.sizes(), x.options());
  at::Tensor log_prob = empty_output({g.B}, x.options().dtype(acc_dtype));
  at::Tensor inv_lambda = empty_output({g.B}, log_prob.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kStepOp, [&] {
    sde_step_kernel<scalar_t>(g, x, v, sigma, sigma_next, eps, std_rule, std_coef, x_next, y, log_prob, inv_lambda);
  });
  return {x_next, y, log_prob, inv_lambda};
}

template <typename scalar_t>
const scalar_t* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<scalar_t>() : nullptr;
}

// The loss's latent inputs, read a row at a time into L1 (null pointers: absent optional inputs).
template <typename scalar_t, typename acc_t>
struct LossRows {
  const scalar_t *v, *vu, *x, *target, *ref;
  acc_t w;  // cfg_scale

  // The velocity trained through: v, or v_uncond + w (v - v_uncond) under classifier-free guidance.
  const acc_t* velocity(int64_t off, int64_t n, acc_t* bv, acc_t* bu) const {
    const acc_t* __restrict vr = widen(v + off, bv, n);
    if (vu == nullptr) return vr;
    const acc_t* __restrict ur = widen(vu + off, bu, n);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) bv[j] = ur[j] + w * (vr[j] - ur[j]);
    return bv;
  }

  // Rows of target and x (nullptr without x: target is then y, else x_next).
  std::pair<const acc_t*, const acc_t*> step(int64_t off, int64_t n, acc_t* bt, acc_t* bx) const {
    return {widen(target + off, bt, n), x != nullptr ? widen(x + off, bx, n) : nullptr};
  }
};

template <typename scalar_t, typename acc_t>
LossRows<scalar_t, acc_t> loss_rows(const at::Tensor& v, const std::optional<at::Tensor>& x, const at::Tensor& target,
                                    const std::optional<at::Tensor>& v_ref, const std::optional<at::Tensor>& v_uncond,
                                    double cfg_scale) {
  return {v.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(v_uncond), data_or_null<scalar_t>(x),
          target.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(v_ref),
          v_uncond ? static_cast<acc_t>(cfg_scale) : acc_t(1)};
}

Geometry check_loss_args(const at::Tensor& v, const std::optional<at::Tensor>& x, const at::Tensor& target,
                         const at::Tensor& sigma, const at::Tensor& sigma_next, const std::optional<at::Tensor>& v_ref,
                         const std::optional<at::Tensor>& v_uncond, double cfg_scale, int64_t std_rule,
                         double std_coef) {
  const Geometry g = check_latents(kLossOp, {"v", &v},
                                   {{x ? "x_next" : "y", &target}, {"x", optional_ptr(x)}, {"v_ref", optional_ptr(v_ref)},
                                    {"v_uncond", optional_ptr(v_uncond)}},
                                   sigma, sigma_next, std_rule, std_coef);
  TORCH_CHECK_VALUE(std::isfinite(cfg_scale), kLossOp, ": cfg_scale must be finite, got ", cfg_scale);
  return g;
}

// Writes log_prob, kl and inv_lambda, [B] each.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void log_prob_kernel(const Geometry& g, const LossRows<scalar_t, acc_t>& rows, const at::Tensor& sigma,
                     const at::Tensor& sigma_next, int64_t std_rule, double std_coef, acc_t* log_prob, acc_t* kl,
                     acc_t* inv_lambda) {
  const auto coef = coefficients<acc_t>(sigma, sigma_next, std_rule, std_coef);
  const auto sums = for_rows<2, acc_t>(g, [&](int64_t i, int64_t off, int64_t n) {
    RowBuffers<acc_t>& buf = row_buffers<acc_t, 5>();
    const StepCoef<acc_t>& c = coef[i];
    const acc_t* __restrict vr = rows.velocity(off, n, buf[0], buf[1]);
    const auto [t, x] = rows.step(off, n, buf[2], buf[3]);
    const acc_t *__restrict tr = t, *__restrict xr = x;
    acc_t ss = 0, kk = 0;
    if (xr == nullptr) {
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < n; ++j) ss += sq(residual(c, tr[j], vr[j]));
    } else {
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < n; ++j) ss += sq(residual(c, tr[j], vr[j], xr[j]));
    }
    if (rows.ref != nullptr) {
      const acc_t* __restrict rr = widen(rows.ref + off, buf[4], n);
#pragma omp simd reduction(+ : kk)
      for (int64_t j = 0; j < n; ++j) kk += sq(vr[j] - rr[j]);
    }
    const std::array<acc_t, 2> out{ss, kk};
    return out;
  });
  for (int64_t i = 0; i < g.B; ++i) {
    const StepCoef<acc_t>& c = coef[i];
    log_prob[i] = -sums[i][0] / acc_t(g.D) * c.inv_2var - c.log_norm;
    // mu - mu_ref = b (v - v_ref): the x terms cancel.
    kl[i] = c.b * c.b * sums[i][1] / acc_t(g.D) * c.inv_2var;
    inv_lambda[i] = c.inv_lambda;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grpo_log_prob_cpu(
    const at::Tensor& v, const std::optional<at::Tensor>& x, const at::Tensor& target, const at::Tensor& sigma,
    const at::Tensor& sigma_next, const std::optional<at::Tensor>& v_ref, const std::optional<at::Tensor>& v_uncond,
    double cfg_scale, int64_t std_rule, double std_coef) {
  const Geometry g = check_loss_args(v, x, target, sigma, sigma_next, v_ref, v_uncond, cfg_scale, std_rule, std_coef);
  const at::ScalarType acc_dtype = at::toOpMathType(v.scalar_type());
  at::Tensor log_prob = empty_output({g.B}, v.options().dtype(acc_dtype));
  at::Tensor kl = empty_output({g.B}, log_prob.options()), inv_lambda = empty_output({g.B}, log_prob.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), kLossOp, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    log_prob_kernel<scalar_t>(g, loss_rows<scalar_t, acc_t>(v, x, target, v_ref, v_uncond, cfg_scale), sigma,
                              sigma_next, std_rule, std_coef, log_prob.mutable_data_ptr<acc_t>(),
                              kl.mutable_data_ptr<acc_t>(), inv_lambda.mutable_data_ptr<acc_t>());
  });
  return {log_prob, kl, inv_lambda};
}

template <typename scalar_t>
void log_prob_bwd_kernel(const Geometry& g, const at::Tensor& dlog_prob, const at::Tensor& dkl,
                         const LossRows<scalar_t, at::opmath_type<scalar_t>>& rows, const at::Tensor& sigma,
                         const at::Tensor& sigma_next, int64_t std_rule, double std_coef,
                         std::vector<at::Tensor>& grads) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto coef = coefficients<acc_t>(sigma, sigma_next, std_rule, std_coef);
  const acc_t *glp = dlog_prob.const_data_ptr<acc_t>(), *gkl = dkl.const_data_ptr<acc_t>();
  scalar_t* pdv = grads[0].mutable_data_ptr<scalar_t>();
  scalar_t* pdu = grads.size() > 1 ? grads[1].mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t w = rows.w;
  for_rows<0, acc_t>(g, [&](int64_t i, int64_t off, int64_t n) {
    RowBuffers<acc_t>& buf = row_buffers<acc_t, 6>();
    const StepCoef<acc_t>& c = coef[i];
    // d log_prob / dv = (x_next - mu) b / (std^2 Dt D); d kl / dv = b^2 (v - v_ref) / (std^2 Dt D)
    const acc_t k = c.b * 2 * c.inv_2var / acc_t(g.D), k_lp = glp[i] * k, k_kl = gkl[i] * k * c.b;
    const acc_t* __restrict vr = rows.velocity(off, n, buf[0], buf[1]);
    const auto [t, x] = rows.step(off, n, buf[2], buf[3]);
    const acc_t *__restrict tr = t, *__restrict xr = x;
    acc_t* __restrict d = staging(pdv + off, buf[4]);
    if (xr == nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) d[j] = k_lp * residual(c, tr[j], vr[j]);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) d[j] = k_lp * residual(c, tr[j], vr[j], xr[j]);
    }
    if (rows.ref != nullptr) {
      const acc_t* __restrict rr = widen(rows.ref + off, buf[5], n);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) d[j] += k_kl * (vr[j] - rr[j]);
    }
    if (pdu != nullptr) {
      acc_t* __restrict du = staging(pdu + off, buf[5]);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        du[j] = (acc_t(1) - w) * d[j];
        d[j] *= w;
      }
      narrow(du, pdu + off, n);
    }
    narrow(d, pdv + off, n);
    return std::array<acc_t, 0>{};
  });
}

std::vector<at::Tensor> grpo_log_prob_bwd_cpu(const at::Tensor& dlog_prob, const at::Tensor& dkl, const at::Tensor& v,
                                              const std::optional<at::Tensor>& x, const at::Tensor& target,
                                              const at::Tensor& sigma, const at::Tensor& sigma_next,
                                              const std::optional<at::Tensor>& v_ref,
                                              const std::optional<at::Tensor>& v_uncond, double cfg_scale,
                                              int64_t std_rule, double std_coef) {
  const Geometry g = check_loss_args(v, x, target, sigma, sigma_next, v_ref, v_uncond, cfg_scale, std_rule, std_coef);
  const at::ScalarType acc_dtype = at::toOpMathType(v.scalar_type());
  const std::vector<int64_t> b_shape{g.B};
  for (const auto& [name, t] : {NamedTensor{"dlog_prob", &dlog_prob}, {"dkl", &dkl}}) {
    check_same_device(kLossOp, *t, name, v, "v");
    check_contiguous_as(kLossOp, *t, name, "[B]", b_shape, acc_dtype, "the accumulation dtype");
  }
  std::vector<at::Tensor> grads{empty_output(v.sizes(), v.options())};
  if (v_uncond) grads.push_back(empty_output(v.sizes(), v.options()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), kLossOp, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    log_prob_bwd_kernel<scalar_t>(g, dlog_prob, dkl, loss_rows<scalar_t, acc_t>(v, x, target, v_ref, v_uncond, cfg_scale),
                                  sigma, sigma_next, std_rule, std_coef, grads);
  });
  return grads;
}

// The stored step as grpo_log_prob takes it: (x, x_next) for the pair, (none, y) for the residual target.
std::pair<std::optional<at::Tensor>, at::Tensor> stored_step(const std::optional<at::Tensor>& x,
                                                             const std::optional<at::Tensor>& x_next,
                                                             const std::optional<at::Tensor>& y) {
  auto given = [](const std::optional<at::Tensor>& t) { return t ? "given" : "None"; };
  TORCH_CHECK_VALUE(y ? !x && !x_next : x && x_next, kLossOp,
                    ": give the stored step either as x and x_next, or as y alone (flow_sde_step's residual target "
                    "x_next - a x); got x ", given(x), ", x_next ", given(x_next), ", y ", given(y));
  return y ? std::pair{std::optional<at::Tensor>(), *y} : std::pair{x, *x_next};
}

// A floating [B] tensor of v's batch on v's device (log_prob_old, advantages), any stride.
void check_sample_values(const char* name, const at::Tensor& t, const at::Tensor& v) {
  check_same_device(kLossOp, t, name, v, "v");
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == v.size(0) && at::isFloatingType(t.scalar_type()), kLossOp, ": ",
                    name, " must be a floating [B] = [", v.size(0), "] tensor on ", v.device(), ", got shape ",
                    t.sizes(), ", dtype ", dtype_name(t.scalar_type()), " on ", t.device());
}

// The arguments grpo_log_prob does not take, in the order and words of python/diffkern/grpo/op.py's checks.
void check_ppo_args(const at::Tensor& v, const std::optional<at::Tensor>& v_ref,
                    const std::optional<at::Tensor>& v_uncond, std::optional<double> cfg_scale,
                    const at::Tensor& log_prob_old, const at::Tensor& advantages, double clip_eps, double beta,
                    const std::optional<at::Tensor>& tgr_mean) {
  TORCH_CHECK_VALUE(cfg_scale.has_value() == v_uncond.has_value(), kLossOp,
                    ": cfg_scale and v_uncond go together (got cfg_scale=",
                    cfg_scale ? c10::str(*cfg_scale) : std::string("None"), ", v_uncond ",
                    v_uncond ? "given" : "None", ")");
  TORCH_CHECK_VALUE(clip_eps >= 0 && std::isfinite(clip_eps), kLossOp, ": clip_eps must be finite and >= 0, got ",
                    clip_eps);
  TORCH_CHECK_VALUE(beta >= 0 && std::isfinite(beta), kLossOp, ": beta must be finite and >= 0, got ", beta);
  TORCH_CHECK_VALUE(beta == 0 || v_ref, kLossOp, ": beta = ", beta,
                    " > 0 weights a KL term to the reference policy: give v_ref (or beta = 0)");
  check_sample_values("log_prob_old", log_prob_old, v);
  check_sample_values("advantages", advantages, v);
  if (tgr_mean) {
    check_same_device(kLossOp, *tgr_mean, "tgr_mean", v, "v");
    TORCH_CHECK_VALUE(tgr_mean->numel() == 1 && at::isFloatingType(tgr_mean->scalar_type()), kLossOp,
                      ": tgr_mean must be a floating one-element tensor, got shape ", tgr_mean->sizes(), ", dtype ",
                      dtype_name(tgr_mean->scalar_type()));
  }
}

// The values of a [B] floating tensor (any stride) as acc_t, rounded as Tensor.to(acc_t) rounds them.
template <typename acc_t>
std::vector<acc_t> sample_values(const at::Tensor& t) {
  const bool in_place = t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
  const at::Tensor s = in_place ? t : t.to(at::kDouble);  // float16/bfloat16: exact in double
  std::vector<acc_t> out(s.numel());
  for (int64_t i = 0; i < s.numel(); ++i) out[i] = static_cast<acc_t>(element(s, i));
  return out;
}

// The [B] epilogue of grpo_iso_loss (ppo_term per sample), from log_prob, kl and inv_lambda. Sums run
// in sample order.
template <typename acc_t>
void ppo_epilogue(int64_t B, const acc_t* log_prob, const acc_t* kl, const acc_t* inv_lambda,
                  const at::Tensor& log_prob_old, const at::Tensor& advantages, double clip_eps, bool tgr, double beta,
                  const std::optional<at::Tensor>& tgr_mean, std::array<at::Tensor, 6>& out) {
  const std::vector<acc_t> old = sample_values<acc_t>(log_prob_old), adv = sample_values<acc_t>(advantages);
  acc_t mean = 0;
  if (tgr_mean) {
    mean = static_cast<acc_t>(tgr_mean->item<double>());
  } else {
    for (int64_t i = 0; i < B; ++i) mean += inv_lambda[i];
    mean /= acc_t(std::max<int64_t>(B, 1));
  }
  const acc_t n = acc_t(std::max<int64_t>(B, 1)), lo = static_cast<acc_t>(1 - clip_eps),
              hi = static_cast<acc_t>(1 + clip_eps), eps = static_cast<acc_t>(clip_eps);
  acc_t *weights = out[4].mutable_data_ptr<acc_t>(), *d = out[5].mutable_data_ptr<acc_t>();
  acc_t loss = 0, kl_sum = 0, delta_sq = 0, clipped = 0, ratio = 0;
  for (int64_t i = 0; i < B; ++i) {
    weights[i] = tgr ? inv_lambda[i] / mean : acc_t(1);
    const acc_t delta = log_prob[i] - old[i];
    const PpoTerm<acc_t> t = ppo_term(delta, adv[i], weights[i], lo, hi);
    loss += t.loss;
    kl_sum += kl[i];
    delta_sq += delta * delta;
    clipped += std::abs(t.ratio - 1) > eps ? acc_t(1) : acc_t(0);
    ratio += t.ratio;
    d[i] = t.dlog_prob / n;
    d[B + i] = t.dadvantage / n;
    d[2 * B + i] = static_cast<acc_t>(beta) / n;
  }
  loss /= n;
  if (beta != 0) loss += static_cast<acc_t>(beta) * kl_sum / n;
  out[0].mutable_data_ptr<acc_t>()[0] = loss;
  out[1].mutable_data_ptr<acc_t>()[0] = acc_t(0.5) * delta_sq / n;
  out[2].mutable_data_ptr<acc_t>()[0] = clipped / n;
  out[3].mutable_data_ptr<acc_t>()[0] = ratio / n;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grpo_iso_loss_cpu(
    const at::Tensor& v, const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& x_next,
    const std::optional<at::Tensor>& y, const at::Tensor& sigma, const at::Tensor& sigma_next,
    const at::Tensor& log_prob_old, const at::Tensor& advantages, const std::optional<at::Tensor>& v_ref,
    const std::optional<at::Tensor>& v_uncond, std::optional<double> cfg_scale, double clip_eps, bool tgr,
    double beta, int64_t std_rule, double std_coef, const std::optional<at::Tensor>& tgr_mean) {
  const auto [x_in, target] = stored_step(x, x_next, y);
  check_ppo_args(v, v_ref, v_uncond, cfg_scale, log_prob_old, advantages, clip_eps, beta, tgr_mean);
  const std::optional<at::Tensor> ref = beta > 0 ? v_ref : std::nullopt;  // read only when weighted
  const double w = cfg_scale.value_or(1.0);
  const Geometry g = check_loss_args(v, x_in, target, sigma, sigma_next, ref, v_uncond, w, std_rule, std_coef);
  const at::TensorOptions acc = v.options().dtype(at::toOpMathType(v.scalar_type()));
  const at::IntArrayRef scalar{};
  std::array<at::Tensor, 6> out{empty_output(scalar, acc), empty_output(scalar, acc), empty_output(scalar, acc),
                                empty_output(scalar, acc), empty_output({g.B}, acc), empty_output({3, g.B}, acc)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), kLossOp, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> per_sample(3 * g.B);
    acc_t *log_prob = per_sample.data(), *kl = log_prob + g.B, *inv_lambda = kl + g.B;
    log_prob_kernel<scalar_t>(g, loss_rows<scalar_t, acc_t>(v, x_in, target, ref, v_uncond, w), sigma, sigma_next,
                              std_rule, std_coef, log_prob, kl, inv_lambda);
    ppo_epilogue<acc_t>(g.B, log_prob, kl, inv_lambda, log_prob_old, advantages, clip_eps, tgr, beta, tgr_mean, out);
  });
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

}  // namespace
}  // namespace diffkern::grpo

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("grpo_iso_loss", TORCH_FN(diffkern::grpo::grpo_iso_loss_cpu));
  m.impl("flow_sde_step", TORCH_FN(diffkern::grpo::flow_sde_step_cpu));
  m.impl("grpo_log_prob", TORCH_FN(diffkern::grpo::grpo_log_prob_cpu));
  m.impl("grpo_log_prob_bwd", TORCH_FN(diffkern::grpo::grpo_log_prob_bwd_cpu));
}
