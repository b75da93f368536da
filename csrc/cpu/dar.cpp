// CPU kernels of the DAR routing and chunked-gathering ops (specs/dar.md; schemas in csrc/diffkern/ops.cpp).
// dar_gather is dar_route over [sources..., c] where the new chunk summary c = sum(addends) is formed
// in the same pass (written once, routed as stored); its backward is dar_route's plus an incoming
// gradient added to the last source's. Both ops run the kernels below.
//
// Tokens are walked in blocks of Tiling::block, in parallel over (b, block). Per token each source row
// is read once from memory: its second use (the softmax accumulator; dv and u in the backward)
// re-reads it from L1, where one d-row sits. Traffic, in elements: the forward reads n*B*T*d and
// writes B*T*(d+1); the backward reads (n+2)*B*T*d + B*T and writes n*B*T*d, plus B*T*d each way
// for a per-token q. Forming a summary adds k*B*T*d reads (its k addends) and B*T*d writes.
#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "convert.h"
#include "diffkern/check.h"
#include "diffkern/dar_args.h"
#include "diffkern/dar_math.h"

namespace diffkern::dar {
namespace {

using cpu::narrow;
using cpu::staging;
using cpu::widen;

// Most tokens per parallel task, hence per partial sum of the dq/dgain reductions.
constexpr int64_t kTokenBlock = 64;
// Columns of d per task of the final reduction over the partial sums.
constexpr int64_t kColumnBlock = 256;
// Least element-ops worth a thread: ATen's own GRAIN_SIZE for elementwise loops.
constexpr int64_t kMinTaskWork = 32768;
// Least element-ops per token block: a quarter of a thread's least work, so that the blocks of a few
// tokens split evenly over threads (each thread still gets >= kMinTaskWork: task_grain).
constexpr int64_t kMinBlockWork = kMinTaskWork / 4;

// The checked geometry plus the CPU kernels' tiling of each batch row into token blocks. A block is
// the fewest tokens (at most kTokenBlock) whose n * d element-ops add up to kMinBlockWork, so that a
// few tokens over many sources split evenly across threads (a DiT at B=1, T=8 over 10 sources of
// d = 1152: 8 one-token blocks, 4 + 4 tokens on two threads, where blocks of kMinTaskWork gave 3
// blocks and 6 + 2 tokens), while a block never costs more to schedule than it computes. The block
// depends on the shape only, so the reductions over blocks add up in the same order at every thread
// count.
struct Tiling : Geometry {
  int64_t block, n_blocks;
  explicit Tiling(const Geometry& g)
      : Geometry(g),
        block(std::clamp<int64_t>((kMinBlockWork + g.n * g.d - 1) / (g.n * g.d), 1, kTokenBlock)),
        n_blocks((g.T + block - 1) / block) {}
};

template <typename scalar_t>
struct SourceRows {
  const scalar_t* data;
  int64_t sb, st;
  const scalar_t* row(int64_t b, int64_t t) const { return data + b * sb + t * st; }
};

// The forward's inputs, as both kernels read them: q in its own dtype, gain in the accumulation type.
template <typename scalar_t, typename q_t>
struct RouteInputs {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<SourceRows<scalar_t>> src;
  std::vector<SourceRows<scalar_t>> add;  // addends of the summary routed after src (dar_gather), or none
  const q_t* q;
  const acc_t* gain;
  acc_t eps;
};

// Tasks per parallel chunk, so that tiny problems run on one thread instead of paying for the pool.
int64_t task_grain(const Tiling& g) {
  return std::max<int64_t>(1, kMinTaskWork / (g.block * g.n * g.d));
}

template <typename scalar_t, typename q_t>
RouteInputs<scalar_t, q_t> route_inputs(at::TensorList sources, at::TensorList addends, const at::Tensor& q,
                                        const at::Tensor& gain_acc, double eps) {
  RouteInputs<scalar_t, q_t> in{{}, {}, q.const_data_ptr<q_t>(),
                                gain_acc.const_data_ptr<at::opmath_type<scalar_t>>(),
                                static_cast<at::opmath_type<scalar_t>>(eps)};
  for (const at::Tensor& v : sources) in.src.push_back({v.const_data_ptr<scalar_t>(), v.stride(0), v.stride(1)});
  for (const at::Tensor& a : addends) in.add.push_back({a.const_data_ptr<scalar_t>(), a.stride(0), a.stride(1)});
  return in;
}

// Calls f(scalar_t{}, q_t{}) for the sources' dtype and q's. q is read in its own dtype, so a float32
// q beside float16/bfloat16 sources costs no cast pass (a per-token q is as large as a source).
template <typename F>
void dispatch_route(at::ScalarType dtype, at::ScalarType q_dtype, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dar_route", [&] {
    q_dtype == dtype ? f(scalar_t{}, scalar_t{}) : f(scalar_t{}, at::opmath_type<scalar_t>{});
  });
}

template <typename acc_t>
inline void scale_by_gain(const acc_t* __restrict q, const acc_t* __restrict gain, acc_t* __restrict qg, int64_t d) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) qg[j] = q[j] * gain[j];
}

// The sums of one source row v: ss = sum v^2, p = sum qg v and, with kGrad, da = sum dh v. Each runs in
// four independent chains, one per quarter of the row, added in a fixed order: one chain of vector FMAs
// waits on every add's latency (4 cycles per vector), four keep the FMA units busy.
template <bool kGrad, typename W>
inline void row_sums(const W* __restrict v, const W* __restrict qg, const W* __restrict dh, int64_t d, W& ss, W& p,
                     W& da) {
  const int64_t m = d / 4;
  const W *v1 = v + m, *v2 = v + 2 * m, *v3 = v + 3 * m;
  const W *g1 = qg + m, *g2 = qg + 2 * m, *g3 = qg + 3 * m;
  const W *h1 = kGrad ? dh + m : nullptr, *h2 = kGrad ? dh + 2 * m : nullptr, *h3 = kGrad ? dh + 3 * m : nullptr;
  W s0 = 0, s1 = 0, s2 = 0, s3 = 0, p0 = 0, p1 = 0, p2 = 0, p3 = 0, a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, p0, p1, p2, p3, a0, a1, a2, a3)
  for (int64_t j = 0; j < m; ++j) {
    s0 += v[j] * v[j];
    s1 += v1[j] * v1[j];
    s2 += v2[j] * v2[j];
    s3 += v3[j] * v3[j];
    p0 += qg[j] * v[j];
    p1 += g1[j] * v1[j];
    p2 += g2[j] * v2[j];
    p3 += g3[j] * v3[j];
    if constexpr (kGrad) {
      a0 += dh[j] * v[j];
      a1 += h1[j] * v1[j];
      a2 += h2[j] * v2[j];
      a3 += h3[j] * v3[j];
    }
  }
  for (int64_t j = 4 * m; j < d; ++j) {
    s0 += v[j] * v[j];
    p0 += qg[j] * v[j];
    if constexpr (kGrad) a0 += dh[j] * v[j];
  }
  ss = (s0 + s1) + (s2 + s3);
  p = (p0 + p1) + (p2 + p3);
  da = (a0 + a1) + (a2 + a3);
}

// Folds one source row v into the running softmax `state` and the weighted sum `acc` (started by the first).
// Returns 0 when its sums (of squares, <q*g, v>) are finite, NaN when one overflowed or met a NaN/inf.
template <typename acc_t>
inline acc_t fold_source(const acc_t* __restrict v, const acc_t* __restrict qg, int64_t d, acc_t inv_d,
                        acc_t inv_sqrt_d, acc_t eps, bool first, SoftmaxState<acc_t>& state, acc_t* __restrict acc) {
  acc_t ss, p, unused;
  row_sums<false>(v, qg, static_cast<const acc_t*>(nullptr), d, ss, p, unused);
  const acc_t s = route_score(rstd_from_sumsq(ss, inv_d, eps), p, inv_sqrt_d);
  acc_t scale, w;
  if (first) {
    state = softmax_start(s);
    std::copy(v, v + d, acc);
  } else if (softmax_push(state, s, scale, w)) {
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) acc[j] = acc[j] * scale + v[j];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) acc[j] += w * v[j];
  }
  return (ss + p) * acc_t(0);
}

// The q*g row of a token in the work type W.
template <typename W, typename q_t, typename acc_t>
void query_row_times_gain(const q_t* q_row, const acc_t* gain, W* __restrict qg, int64_t d) {
  for (int64_t j = 0; j < d; ++j) qg[j] = static_cast<W>(static_cast<acc_t>(q_row[j])) * static_cast<W>(gain[j]);
}

// Routes one token over its source rows (and the stored summary row c_row, when not null) in the work
// type W, writes its h row and returns lse. `probe` becomes 0 when every sum and every element of h is
// finite, NaN otherwise. buf: 3 rows of d.
template <typename W, typename scalar_t, typename q_t>
W route_token(const RouteInputs<scalar_t, q_t>& in, int64_t b, int64_t t, int64_t d, const W* qg,
              const scalar_t* c_row, scalar_t* h_out, W* buf, W& probe) {
  const W inv_d = W(1) / W(d), inv_sqrt_d = W(1) / std::sqrt(W(d)), eps = static_cast<W>(in.eps);
  W *acc = buf, *vbuf = buf + d;
  SoftmaxState<W> state{};
  W zero = 0;
  const size_t n = in.src.size();
  for (size_t i = 0; i < n; ++i) {
    zero += fold_source(widen(in.src[i].row(b, t), vbuf, d), qg, d, inv_d, inv_sqrt_d, eps, i == 0, state, acc);
  }
  if (c_row != nullptr) zero += fold_source(widen(c_row, vbuf, d), qg, d, inv_d, inv_sqrt_d, eps, false, state, acc);
  const W inv_l = softmax_inv_l(state);
  W* __restrict h_row = staging(h_out, buf + 2 * d);
#pragma omp simd reduction(+ : zero)
  for (int64_t j = 0; j < d; ++j) {
    h_row[j] = acc[j] * inv_l;
    zero += h_row[j] * W(0);
  }
  narrow(h_row, h_out, d);
  probe = zero;
  return softmax_lse(state);
}

// Writes h and lse; with addends, also the summary row c = sum_k addends[k] (fp32 sum, rounded once),
// which is routed as stored: later ops and the backward read that same rounded c.
// A token whose float32 result is not finite is routed again in double (route_token<double>): finite
// inputs near the float32 maximum overflow a float32 sum of squares, <q*g, v> or the weighted sum,
// never a double one, so such a token gets the reference's finite answer; a token of NaN or inf inputs
// stays NaN/inf, as in the reference.
template <typename scalar_t, typename q_t>
void route_fwd_kernel(const Tiling& g, const RouteInputs<scalar_t, q_t>& in, scalar_t* h,
                      at::opmath_type<scalar_t>* lse, scalar_t* c) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t d = g.d;
  at::parallel_for(0, g.B * g.n_blocks, task_grain(g), [&](int64_t begin, int64_t end) {
    // uninitialised: every row is written before it is read (a zeroed 6 d rows cost a few percent of a small op)
    const auto scratch = std::make_unique_for_overwrite<acc_t[]>(6 * d);
    acc_t* __restrict qg = scratch.get();
    acc_t *q_buf = qg + d, *c_buf = q_buf + d, *work = c_buf + d;
    std::vector<double> fallback;
    const q_t* q_cached = nullptr;  // a static or per-batch q row is scaled by gain once per chunk
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.n_blocks, t0 = task % g.n_blocks * g.block;
      const int64_t t_end = std::min(g.T, t0 + g.block);
      for (int64_t t = t0; t < t_end; ++t) {
        const q_t* q_row = in.q + b * g.q_sb + t * g.q_st;
        if (q_row != q_cached) scale_by_gain(widen(q_row, q_buf, d), in.gain, qg, d);
        q_cached = q_row;
        const int64_t tok = b * g.T + t;
        const scalar_t* c_row = nullptr;
        if (!in.add.empty()) {
          acc_t* __restrict c_acc = staging(c + tok * d, c_buf);
          std::fill(c_acc, c_acc + d, acc_t(0));
          for (const SourceRows<scalar_t>& a : in.add) {
            const acc_t* __restrict v = widen(a.row(b, t), work, d);
#pragma omp simd
            for (int64_t j = 0; j < d; ++j) c_acc[j] += v[j];
          }
          narrow(c_acc, c + tok * d, d);
          c_row = c + tok * d;
        }
        acc_t probe;
        lse[tok] = route_token(in, b, t, d, qg, c_row, h + tok * d, work, probe);
        if constexpr (!std::is_same_v<acc_t, double>) {
          if (!(std::isfinite(lse[tok]) && probe == 0)) {
            fallback.resize(4 * d);
            query_row_times_gain(q_row, in.gain, fallback.data(), d);
            double probe_d;
            lse[tok] = static_cast<acc_t>(
                route_token(in, b, t, d, fallback.data(), c_row, h + tok * d, fallback.data() + d, probe_d));
          }
        }
      }
    }
  });
}

// One token's gradients in the work type W: each source's dv (plus dlast into the last one's) written
// to dsrc[i] + tok * d, and u = sum_i c_i v_i. Returns 0 when every sum and every dv and u element is
// finite, NaN otherwise. buf: 5 rows of d.
template <typename W, typename scalar_t, typename q_t>
W bwd_token(const RouteInputs<scalar_t, q_t>& in, int64_t b, int64_t t, int64_t tok, int64_t d, const W* qg,
            const scalar_t* dh, const scalar_t* h, W lse, const scalar_t* dlast, const std::vector<scalar_t*>& dsrc,
            W* __restrict u, W* buf) {
  const W inv_d = W(1) / W(d), inv_sqrt_d = W(1) / std::sqrt(W(d)), eps = static_cast<W>(in.eps);
  W *vbuf = buf, *dh_buf = buf + d, *h_buf = buf + 2 * d, *out_buf = buf + 3 * d, *dlast_buf = buf + 4 * d;
  const W* __restrict dh_row = widen(dh + tok * d, dh_buf, d);
  const W* __restrict h_row = widen(h + tok * d, h_buf, d);
  W delta = 0, zero = 0;
#pragma omp simd reduction(+ : delta)
  for (int64_t j = 0; j < d; ++j) delta += dh_row[j] * h_row[j];
  zero += delta * W(0);
  std::fill(u, u + d, W(0));
  const size_t n = in.src.size();
  for (size_t i = 0; i < n; ++i) {
    const W* __restrict v = widen(in.src[i].row(b, t), vbuf, d);
    W ss, p, da;
    row_sums<true>(v, qg, dh_row, d, ss, p, da);
    zero += (ss + p + da) * W(0);
    const RouteGrad<W> gr = route_grad(rstd_from_sumsq(ss, inv_d, eps), p, da, delta, lse, inv_d, inv_sqrt_d);
    W* __restrict dv = staging(dsrc[i] + tok * d, out_buf);
#pragma omp simd reduction(+ : zero)
    for (int64_t j = 0; j < d; ++j) {
      dv[j] = gr.alpha * dh_row[j] + gr.c * qg[j] - gr.beta * v[j];
      u[j] += gr.c * v[j];
      zero += dv[j] * W(0);
    }
    if (dlast != nullptr && i == n - 1) {
      const W* __restrict dl = widen(dlast + tok * d, dlast_buf, d);
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) dv[j] += dl[j];
    }
    narrow(dv, dsrc[i] + tok * d, d);
  }
#pragma omp simd reduction(+ : zero)
  for (int64_t j = 0; j < d; ++j) zero += u[j] * W(0);
  return zero;
}

// Writes dsources (plus dlast, when given, into the last one's) and, for a per-token q, dq; leaves
// in partial[task] (a [d] row per (b, block)) the block's sum over tokens of u (static and per-batch
// q) or of q_tok * u (per-token q). A token whose float32 gradients are not finite is recomputed in
// double, as in the forward (route_fwd_kernel).
template <typename scalar_t, typename q_t>
void route_bwd_kernel(const Tiling& g, const RouteInputs<scalar_t, q_t>& in, const scalar_t* dh, const scalar_t* h,
                      const at::opmath_type<scalar_t>* lse, const scalar_t* dlast, const std::vector<scalar_t*>& dsrc,
                      q_t* dq, at::opmath_type<scalar_t>* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t d = g.d;
  const bool per_token = g.q_kind == QKind::kPerToken;
  at::parallel_for(0, g.B * g.n_blocks, task_grain(g), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(9 * d);
    acc_t* __restrict qg = scratch.data();
    acc_t* __restrict u = qg + d;
    acc_t *q_buf = u + d, *out_buf = q_buf + d, *work = out_buf + d;
    std::vector<double> fallback;
    const q_t* q_cached = nullptr;
    const acc_t* q_tok = nullptr;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.n_blocks, t0 = task % g.n_blocks * g.block;
      const int64_t t_end = std::min(g.T, t0 + g.block);
      acc_t* __restrict part = partial + task * d;
      std::fill(part, part + d, acc_t(0));
      for (int64_t t = t0; t < t_end; ++t) {
        const q_t* q_row = in.q + b * g.q_sb + t * g.q_st;
        if (q_row != q_cached) {
          q_tok = widen(q_row, q_buf, d);
          scale_by_gain(q_tok, in.gain, qg, d);
        }
        q_cached = q_row;
        const int64_t tok = b * g.T + t;
        const acc_t probe = bwd_token(in, b, t, tok, d, qg, dh, h, lse[tok], dlast, dsrc, u, work);
        if constexpr (!std::is_same_v<acc_t, double>) {
          if (probe != 0) {
            fallback.resize(7 * d);
            double *qg_d = fallback.data(), *u_d = qg_d + d;
            query_row_times_gain(q_row, in.gain, qg_d, d);
            bwd_token(in, b, t, tok, d, qg_d, dh, h, static_cast<double>(lse[tok]), dlast, dsrc, u_d, u_d + d);
            for (int64_t j = 0; j < d; ++j) u[j] = static_cast<acc_t>(u_d[j]);
          }
        }
        if (per_token) {
          acc_t* __restrict dq_row = staging(dq + tok * d, out_buf);
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) {
            dq_row[j] = u[j] * in.gain[j];
            part[j] += q_tok[j] * u[j];
          }
          narrow(dq_row, dq + tok * d, d);
        } else {
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) part[j] += u[j];
        }
      }
    }
  });
}

// Sums the partials in a fixed order (a row's blocks, then rows) into dgain and, for a static or
// per-batch q, dq = g * sum u: deterministic and independent of the thread count.
template <typename scalar_t, typename q_t, typename acc_t = at::opmath_type<scalar_t>>
void reduce_partials(const Tiling& g, const RouteInputs<scalar_t, q_t>& in, const acc_t* partial, q_t* dq,
                     acc_t* dgain) {
  const q_t* q = in.q;
  const acc_t* gain = in.gain;
  // Column chunks of at least kColumnBlock columns and kMinTaskWork partial-sum reads each.
  const int64_t grain = std::max(kColumnBlock, kMinTaskWork / std::max<int64_t>(1, g.B * g.n_blocks));
  at::parallel_for(0, g.d, grain, [&](int64_t j0, int64_t j1) {
    std::vector<acc_t> row(j1 - j0), total(j1 - j0, acc_t(0));
    for (int64_t b = 0; b < g.B; ++b) {
      std::fill(row.begin(), row.end(), acc_t(0));
      for (int64_t blk = 0; blk < g.n_blocks; ++blk) {
        const acc_t* part = partial + (b * g.n_blocks + blk) * g.d;
        for (int64_t j = j0; j < j1; ++j) row[j - j0] += part[j];
      }
      for (int64_t j = j0; j < j1; ++j) {
        if (g.q_kind == QKind::kPerBatch) {
          dq[b * g.d + j] = static_cast<q_t>(row[j - j0] * gain[j]);
          total[j - j0] += static_cast<acc_t>(q[b * g.q_sb + j]) * row[j - j0];
        } else {
          total[j - j0] += row[j - j0];
        }
      }
    }
    for (int64_t j = j0; j < j1; ++j) {
      if (g.q_kind == QKind::kStatic) {
        dq[j] = static_cast<q_t>(total[j - j0] * gain[j]);
        dgain[j] = static_cast<acc_t>(q[j]) * total[j - j0];
      } else {
        dgain[j] = total[j - j0];
      }
    }
  });
}

// Routing over sources (+ the summary formed from addends, when there are any): (h, lse, c).
std::tuple<at::Tensor, at::Tensor, at::Tensor> route_forward(const Tiling& g, at::TensorList sources,
                                                             at::TensorList addends, const at::Tensor& q,
                                                             const at::Tensor& gain, double eps) {
  const at::ScalarType dtype = sources[0].scalar_type(), acc_dtype = at::toOpMathType(dtype);
  at::Tensor h = empty_output({g.B, g.T, g.d}, sources[0].options());
  at::Tensor lse = empty_output({g.B, g.T}, sources[0].options().dtype(acc_dtype));
  at::Tensor c = empty_output(addends.empty() ? std::vector<int64_t>{0} : std::vector<int64_t>{g.B, g.T, g.d},
                              sources[0].options());
  const at::Tensor gain_acc = gain.to(acc_dtype).contiguous();
  dispatch_route(dtype, q.scalar_type(), [&](auto scalar_tag, auto q_tag) {
    using scalar_t = decltype(scalar_tag);
    route_fwd_kernel(g, route_inputs<scalar_t, decltype(q_tag)>(sources, addends, q, gain_acc, eps),
                     h.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<at::opmath_type<scalar_t>>(),
                     addends.empty() ? nullptr : c.mutable_data_ptr<scalar_t>());
  });
  return {h, lse, c};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> route_backward(
    const Tiling& g, const at::Tensor& dh, at::TensorList sources, const at::Tensor& q, const at::Tensor& gain,
    const at::Tensor& h, const at::Tensor& lse, const at::Tensor* dlast, double eps) {
  const at::ScalarType dtype = sources[0].scalar_type(), acc_dtype = at::toOpMathType(dtype);
  const std::vector<int64_t> btd{g.B, g.T, g.d};

  std::vector<at::Tensor> dsources;
  for (int64_t i = 0; i < g.n; ++i) dsources.push_back(empty_output(btd, sources[0].options()));
  at::Tensor dq = empty_output(q.sizes(), q.options());
  at::Tensor dgain = empty_output({g.d}, gain.options().dtype(acc_dtype));
  const at::Tensor gain_acc = gain.to(acc_dtype).contiguous();
  dispatch_route(dtype, q.scalar_type(), [&](auto scalar_tag, auto q_tag) {
    using scalar_t = decltype(scalar_tag);
    using q_t = decltype(q_tag);
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = route_inputs<scalar_t, q_t>(sources, {}, q, gain_acc, eps);
    std::vector<scalar_t*> dsrc;
    for (at::Tensor& dv : dsources) dsrc.push_back(dv.mutable_data_ptr<scalar_t>());
    // per (b, block) sums, each filled by its task: scratch, not an ATen allocation through the dispatcher
    const auto partial = std::make_unique_for_overwrite<acc_t[]>(g.B * g.n_blocks * g.d);
    route_bwd_kernel(g, in, dh.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(),
                     dlast == nullptr ? nullptr : dlast->const_data_ptr<scalar_t>(), dsrc, dq.mutable_data_ptr<q_t>(),
                     partial.get());
    reduce_partials(g, in, partial.get(), dq.mutable_data_ptr<q_t>(), dgain.mutable_data_ptr<acc_t>());
  });
  return {std::move(dsources), dq, dgain.to(gain.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> dar_route_fwd_cpu(at::TensorList sources, const at::Tensor& q,
                                                     const at::Tensor& gain, double eps) {
  auto [h, lse, c] = route_forward(Tiling(check_route_args(sources, q, gain, eps)), sources, {}, q, gain, eps);
  return {h, lse};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> dar_route_bwd_cpu(
    const at::Tensor& dh, at::TensorList sources, const at::Tensor& q, const at::Tensor& gain, const at::Tensor& h,
    const at::Tensor& lse, double eps) {
  const Tiling g(check_route_bwd_args(dh, sources, q, gain, h, lse, eps));
  return route_backward(g, dh, sources, q, gain, h, lse, nullptr, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dar_gather_fwd_cpu(at::TensorList sources, at::TensorList addends,
                                                                  const at::Tensor& q, const at::Tensor& gain,
                                                                  double eps) {
  return route_forward(Tiling(check_gather_args(sources, addends, q, gain, eps)), sources, addends, q, gain, eps);
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> dar_gather_bwd_cpu(
    const at::Tensor& dh, at::TensorList sources, const at::Tensor& q, const at::Tensor& gain, const at::Tensor& h,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlast, double eps) {
  const Tiling g(check_gather_bwd_args(dh, sources, q, gain, h, lse, dlast, eps));
  return route_backward(g, dh, sources, q, gain, h, lse, dlast.has_value() ? &*dlast : nullptr, eps);
}

}  // namespace
}  // namespace diffkern::dar

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("dar_route_fwd", TORCH_FN(diffkern::dar::dar_route_fwd_cpu));
  m.impl("dar_route_bwd", TORCH_FN(diffkern::dar::dar_route_bwd_cpu));
  m.impl("dar_gather_fwd", TORCH_FN(diffkern::dar::dar_gather_fwd_cpu));
  m.impl("dar_gather_bwd", TORCH_FN(diffkern::dar::dar_gather_bwd_cpu));
}
