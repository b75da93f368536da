// CPU kernels of the attention-sink ops (specs/sinks.md; schemas in csrc/diffkern/ops.cpp).
//
// Blocked ATen, never the [N_q, N_k] matrix: a block of kRows queries meets every key at once, so one
// pass gives the exact row log-sum-exp, the unmasked output, the row entropy and the block's share of
// the column mass (no online-softmax rescaling on CPU). Every step is GEMM-shaped, and at::matmul runs
// it through oneDNN/MKL at the machine's peak, which a hand-written loop would not match without its
// own GEMM micro-kernel. Extra memory: a few [B, H, kRows, N_k] fp32 blocks, linear in N_k, plus fp32
// copies of k and v. The suppression corrects the unmasked output with the K selected keys' terms only,
// except in rows where the suppressed keys hold most of the mass (sinks_math.h recompute_below): those
// are recomputed, a block at a time, as the masked softmax.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "diffkern/check.h"
#include "diffkern/sinks_math.h"

namespace diffkern::sinks {
namespace {

// 64 rows x 4.4K keys x 24 heads x B=2 is 54 MB of fp32 logits per block (the explicit matrix is 3.5 GB),
// and wide enough that each matmul stays GEMM-efficient.
constexpr int64_t kRows = 64;
// Most probabilities per row sink_attention_fwd returns (top_p); python/diffkern/sinks/op.py MAX_ROW_TOP.
constexpr int64_t kMaxRowTop = 8;
constexpr const char* kMassOp = "sink_mass";
constexpr const char* kAttnOp = "sink_attention";
constexpr const char* kGivenOp = "sink_attention_given";

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor* v) {
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be [B, H, N_q, head_dim], got shape ", q.sizes());
  const at::ScalarType t = q.scalar_type();
  TORCH_CHECK_VALUE(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble, op,
                    ": q dtype must be float16, bfloat16, float32 or float64, got ", dtype_name(t));
  for (const auto& [name, x] : {std::pair<const char*, const at::Tensor*>{"k", &k}, {"v", v}}) {
    if (x == nullptr) continue;
    TORCH_CHECK_VALUE(x->dim() == 4, op, ": ", name, " must be [B, H, N_k, head_dim], got shape ", x->sizes());
    TORCH_CHECK_VALUE(x->scalar_type() == t, op, ": ", name, " dtype ", dtype_name(x->scalar_type()),
                      " differs from q dtype ", dtype_name(t));
    check_same_device(op, *x, name, q, "q");
    TORCH_CHECK_VALUE(x->size(0) == q.size(0) && x->size(1) == q.size(1) && x->size(3) == q.size(3), op, ": ", name,
                      " has shape ", x->sizes(), " but q has shape ", q.sizes(), ": B, H and head_dim must agree");
  }
  if (v != nullptr) {
    TORCH_CHECK_VALUE(v->size(2) == k.size(2), op, ": v has shape ", v->sizes(), " but k has shape ", k.sizes());
  }
  check_unit_last_stride(op, q, "q");
  check_unit_last_stride(op, k, "k");
  if (v != nullptr) check_unit_last_stride(op, *v, "v");
  TORCH_CHECK_VALUE(q.size(3) >= 1, op, ": head_dim must be at least 1");
  TORCH_CHECK_VALUE(k.size(2) >= 1, op, ": k must hold at least one key (N_k >= 1)");
}

void check_scalars(const char* op, const at::Tensor& q, int64_t n_query, double scale) {
  const int64_t N_q = q.size(2), lo = std::min<int64_t>(1, N_q);
  TORCH_CHECK_VALUE(n_query >= lo && n_query <= N_q, op, ": n_query must be in [", lo, ", N_q] = [", lo, ", ", N_q,
                    "], got ", n_query);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, op, ": scale must be finite and > 0, got ", scale);
}

// The row_top largest of p[0, n), descending, into best (zeros on entry: values past n stay 0), by insertion
// into the sorted list (equal values fill separate slots); a chunk of kChunk values none of which can enter the
// list is skipped after one vectorised count. A NaN row (l NaN) gets NaN, as its lse does.
template <typename acc_t>
void top_of_row(const acc_t* __restrict p, int64_t n, acc_t* __restrict best, int64_t row_top, acc_t l) {
  constexpr int64_t kChunk = 64;
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t j1 = std::min(n, j0 + kChunk);
    const acc_t low = best[row_top - 1];
    int above = 0;
#pragma omp simd reduction(+ : above)
    for (int64_t j = j0; j < j1; ++j) above += p[j] > low;
    if (above == 0) continue;
    for (int64_t j = j0; j < j1; ++j) {
      if (!(p[j] > best[row_top - 1])) continue;
      int64_t t = row_top - 1;
      for (; t > 0 && best[t - 1] < p[j]; --t) best[t] = best[t - 1];
      best[t] = p[j];
    }
  }
  if (std::isnan(l)) std::fill(best, best + row_top, l);
}

// Each row of a block of logits x [rows, n] (unscaled, contiguous) becomes its softmax P in place, with
// lse = m + log l and the entropy -sum P log P = lse - sum P s written per row: a pass for the max, one
// for exp and the two sums, one to normalise (unfused ATen takes ~10 passes over the block). With
// row_top > 0, top [rows, row_top] (zeros on entry) receives each row's row_top largest P (top_of_row).
template <typename acc_t>
void softmax_rows(acc_t* x, int64_t rows, int64_t n, acc_t scale, acc_t* lse, acc_t* entropy, acc_t* top,
                  int64_t row_top) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      acc_t* __restrict s = x + r * n;
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        s[j] *= scale;
        m = std::max(m, s[j]);
      }
      acc_t l = 0, t = 0;
      for (int64_t j = 0; j < n; ++j) {
        const acc_t e = std::exp(s[j] - m);
        t += e * s[j];
        l += e;
        s[j] = e;
      }
      const acc_t inv_l = acc_t(1) / l;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) s[j] *= inv_l;
      if (row_top > 0) top_of_row(s, n, top + r * row_top, row_top, l);
      lse[r] = m + std::log(l);
      entropy[r] = lse[r] - t * inv_l;
    }
  });
}

// (o, lse, mass, entropy, top_p) in the accumulation dtype; o and entropy are undefined without v. top_p
// [B, H, N_q, row_top]: each row's row_top largest probabilities, descending (ties counted separately), 0 past
// N_k.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> blocked_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor* v, int64_t n_query, double scale, int64_t row_top) {
  const int64_t B = q.size(0), H = q.size(1), N_q = q.size(2), N_k = k.size(2);
  const at::ScalarType acc = at::toOpMathType(q.scalar_type());
  const auto opts = q.options().dtype(acc);
  const at::Tensor kt = k.to(acc).transpose(-1, -2);
  const at::Tensor va = v != nullptr ? v->to(acc) : at::Tensor();
  at::Tensor lse = empty_output({B, H, N_q}, opts), mass = at::zeros({B, H, N_k}, opts), o, entropy;
  const at::Tensor top_p = at::zeros({B, H, N_q, row_top}, opts);
  if (v != nullptr) {
    o = empty_output({B, H, N_q, v->size(3)}, opts);
    entropy = empty_output({B, H, N_q}, opts);
  }
  for (int64_t r0 = 0; r0 < N_q; r0 += kRows) {
    const int64_t r1 = std::min(N_q, r0 + kRows);
    const at::Tensor p = at::matmul(q.slice(2, r0, r1).to(acc), kt).contiguous();
    const at::Tensor row_lse = at::empty({B, H, r1 - r0}, opts), row_entropy = at::empty_like(row_lse);
    const at::Tensor row_top_p = at::zeros({B, H, r1 - r0, row_top}, opts);
    AT_DISPATCH_FLOATING_TYPES(acc, kAttnOp, [&] {
      softmax_rows<scalar_t>(p.mutable_data_ptr<scalar_t>(), B * H * (r1 - r0), N_k, static_cast<scalar_t>(scale),
                             row_lse.mutable_data_ptr<scalar_t>(), row_entropy.mutable_data_ptr<scalar_t>(),
                             row_top_p.mutable_data_ptr<scalar_t>(), row_top);
    });
    lse.slice(2, r0, r1).copy_(row_lse);
    if (r0 < n_query) mass.add_(p.slice(2, 0, std::min(r1, n_query) - r0).sum(2));
    if (row_top > 0) top_p.slice(2, r0, r1).copy_(row_top_p);
    if (v != nullptr) {
      o.slice(2, r0, r1).copy_(at::matmul(p, va));
      entropy.slice(2, r0, r1).copy_(row_entropy);
    }
  }
  mass.div_(static_cast<double>(std::max<int64_t>(n_query, 1)));
  return {o, lse, mass, entropy, top_p};
}

std::tuple<at::Tensor, at::Tensor> sink_mass_cpu(const at::Tensor& q, const at::Tensor& k, int64_t n_query,
                                                 double scale) {
  check_qkv(kMassOp, q, k, nullptr);
  check_scalars(kMassOp, q, n_query, scale);
  auto [o, lse, mass, entropy, top_p] = blocked_forward(q, k, nullptr, n_query, scale, 0);
  return {mass, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sink_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t n_query, double scale, int64_t row_top) {
  check_qkv(kAttnOp, q, k, &v);
  check_scalars(kAttnOp, q, n_query, scale);
  TORCH_CHECK_VALUE(row_top >= 0 && row_top <= kMaxRowTop, kAttnOp, ": row_top must be in [0, ", kMaxRowTop,
                    "], got ", row_top);
  return blocked_forward(q, k, &v, n_query, scale, row_top);
}

at::Tensor sink_topk_cpu(const at::Tensor& score, int64_t k, bool largest) {
  TORCH_CHECK_VALUE(score.dim() == 3, kAttnOp, ": score must be [B, G, N], got shape ", score.sizes());
  TORCH_CHECK_VALUE(score.scalar_type() == at::kFloat || score.scalar_type() == at::kDouble, kAttnOp,
                    ": score dtype must be float32 or float64, got ", dtype_name(score.scalar_type()));
  check_unit_last_stride(kAttnOp, score, "score");
  TORCH_CHECK_VALUE(k >= 0 && k <= score.size(2), kAttnOp, ": k must be in [0, N] = [0, ", score.size(2), "], got ", k);
  const at::Tensor order = std::get<1>(at::sort(score, /*stable=*/true, /*dim=*/-1, /*descending=*/largest));
  return order.narrow(-1, 0, k).contiguous();
}

// idx [B, G, K] (G in {1, H}) of q's (b, h): its layout and, on the host, its values.
void check_idx(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& idx) {
  const int64_t B = q.size(0), H = q.size(1), N_k = k.size(2);
  check_same_device(op, idx, "idx", q, "q");
  TORCH_CHECK_VALUE(idx.dim() == 3 && idx.scalar_type() == at::kLong && idx.is_contiguous() && idx.size(0) == B &&
                        (idx.size(1) == 1 || idx.size(1) == H) && idx.size(2) >= 1 && idx.size(2) <= N_k,
                    op, ": idx must be a contiguous int64 [B, G, K] tensor with B = ", B, ", G = 1 or H = ", H,
                    " and 1 <= K <= N_k = ", N_k, ", got shape ", idx.sizes(), ", dtype ",
                    dtype_name(idx.scalar_type()));
  if (idx.numel() > 0) {
    const auto [lo, hi] = at::aminmax(idx);
    TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < N_k, op,
                      ": idx values must be in [0, N_k) = [0, ", N_k, "), got [", lo.item<int64_t>(), ", ",
                      hi.item<int64_t>(), "]");
  }
}

void check_rows_scale_bias(const char* op, const at::Tensor& q, int64_t n_rows, double scale, double bias) {
  const int64_t N_q = q.size(2);
  TORCH_CHECK_VALUE(n_rows >= 0 && n_rows <= N_q, op, ": n_rows must be in [0, N_q] = [0, ", N_q, "], got ",
                    n_rows);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, op, ": scale must be finite and > 0, got ", scale);
  TORCH_CHECK_VALUE(!std::isnan(bias) && bias < std::numeric_limits<double>::infinity(), op,
                    ": bias must be finite or -inf, got ", bias);
}

void check_suppress(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
                    const at::Tensor& lse, const at::Tensor& idx, int64_t n_rows, double scale, double bias) {
  check_qkv(kAttnOp, q, k, &v);
  const at::ScalarType acc = at::toOpMathType(q.scalar_type());
  check_same_device(kAttnOp, o, "o", q, "q");
  check_contiguous_as(kAttnOp, o, "o", "[B, H, N_q, head_dim]", q.sizes(), acc, "the accumulation dtype");
  check_same_device(kAttnOp, lse, "lse", q, "q");
  check_contiguous_as(kAttnOp, lse, "lse", "[B, H, N_q]", q.sizes().slice(0, 3), acc, "the accumulation dtype");
  check_idx(kAttnOp, q, k, idx);
  check_rows_scale_bias(kAttnOp, q, n_rows, scale, bias);
}

// The K selected rows of x per head as [B, H, K, d] in the accumulation dtype (G = 1: one set for all heads).
at::Tensor gather_keys(const at::Tensor& x, const at::Tensor& idx, at::ScalarType acc) {
  const int64_t B = x.size(0), H = x.size(1), K = idx.size(2);
  return at::gather(x, 2, idx.expand({B, H, K}).unsqueeze(-1).expand({B, H, K, x.size(3)})).to(acc);
}

// [B, G, N_k]: bias on the keys idx [B, G, K] selects (a key listed twice is biased once), 0 elsewhere.
at::Tensor key_bias_row(const at::Tensor& idx, int64_t N_k, double bias, const at::TensorOptions& opts) {
  return at::zeros({idx.size(0), idx.size(1), N_k}, opts).scatter_(-1, idx, bias);
}

// softmax_j(scale q_blk k^T + bias_row[j]) of a block of rows q_blk [B, H, rows, d] (accumulation dtype) against
// every key, kt = k^T [B, H, d, N_k]; bias_row [B, G, N_k] (G in {1, H}), or undefined for none.
at::Tensor biased_softmax(const at::Tensor& q_blk, const at::Tensor& kt, const at::Tensor& bias_row, double scale) {
  at::Tensor s = at::matmul(q_blk, kt).mul_(scale);
  return at::softmax(bias_row.defined() ? s.add_(bias_row.unsqueeze(2)) : s, -1);
}

// Rows of a block whose normalised correction factor is at most recompute_below (sinks_math.h), recomputed
// as the masked softmax itself: the block's logits against every key plus the bias row, times va (the value
// path: v with the selected keys' rows scaled), so its memory stays that of the forward's blocks. Writes
// those rows of `out_blk` and `post_blk` ([B, H, rows, d], [B, H, rows]).
void recompute_rows(const at::Tensor& q_blk, const at::Tensor& kt, const at::Tensor& va, const at::Tensor& bias_row,
                    const at::Tensor& idx, const at::Tensor& exact, double scale, at::Tensor& out_blk,
                    at::Tensor& post_blk) {
  const int64_t B = q_blk.size(0), H = q_blk.size(1), rows = q_blk.size(2);
  const at::Tensor p = biased_softmax(q_blk, kt, bias_row, scale);
  const at::Tensor top = idx.narrow(2, 0, 1).expand({B, H, 1}).unsqueeze(2).expand({B, H, rows, 1});
  out_blk = at::where(exact.unsqueeze(-1), at::matmul(p, va), out_blk);
  post_blk = at::where(exact, at::gather(p, -1, top).squeeze(-1), post_blk);
}

std::tuple<at::Tensor, at::Tensor> sink_suppress_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& o, const at::Tensor& lse, const at::Tensor& idx,
                                                     int64_t n_rows, double scale, double bias, bool renormalize) {
  check_suppress(q, k, v, o, lse, idx, n_rows, scale, bias);
  const int64_t B = q.size(0), H = q.size(1), N_k = k.size(2);
  const at::ScalarType acc = at::toOpMathType(q.scalar_type());
  const SuppressionWeights wg = suppression_weights(bias, idx.size(2), N_k, renormalize);
  const double below = recompute_below(q.element_size());
  at::Tensor out = empty_output(q.sizes(), q.options());
  out.copy_(o);
  at::Tensor post = empty_output({B, H, n_rows}, q.options().dtype(acc));
  const at::Tensor kst = gather_keys(k, idx, acc).transpose(-1, -2), vs = gather_keys(v, idx, acc);
  at::Tensor kt, va, bias_row;  // for recomputed rows only, made on first need
  for (int64_t r0 = 0; r0 < n_rows; r0 += kRows) {
    const int64_t r1 = std::min(n_rows, r0 + kRows);
    const at::Tensor q_blk = q.slice(2, r0, r1).to(acc);
    const at::Tensor s = at::matmul(q_blk, kst).mul_(scale);
    const at::Tensor p = (s - lse.slice(2, r0, r1).unsqueeze(-1)).exp_();
    const at::Tensor c = p.sum(-1);
    const at::Tensor denom = wg.a - wg.d * c;
    at::Tensor out_blk = (wg.a * o.slice(2, r0, r1) - wg.w * at::matmul(p, vs)) / denom.unsqueeze(-1);
    at::Tensor post_blk = wg.g * p.select(-1, 0) / denom;
    const at::Tensor exact = (wg.a - wg.w * c) <= below * wg.a;
    if (exact.any().item<bool>()) {
      if (!kt.defined()) {  // value path: no bias, the selected keys' values scaled by e^bias instead
        kt = k.to(acc).transpose(-1, -2);
        const at::Tensor zeros = at::zeros({B, idx.size(1), N_k}, q.options().dtype(acc));
        bias_row = renormalize ? key_bias_row(idx, N_k, bias, q.options().dtype(acc)) : zeros;
        va = renormalize ? v.to(acc) : v.to(acc) * (zeros + 1.0).scatter_(-1, idx, std::exp(bias)).unsqueeze(-1);
      }
      recompute_rows(q_blk, kt, va, bias_row, idx, exact, scale, out_blk, post_blk);
    }
    out.slice(2, r0, r1).copy_(out_blk);
    post.slice(2, r0, r1).copy_(post_blk);
  }
  return {out, post};
}

// Attention with the keys idx [B, G, K] biased in rows i < n_rows: softmax_j(s_ij + bias [j in S]) v, in q's
// dtype, by the forward's blocks (one pass, no correction). A (b, h) whose every key is selected keeps its
// unmasked rows: the bias shifts the whole row and cancels (for -inf too, the limit), as in sink_suppress.
at::Tensor sink_attention_given_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& idx, int64_t n_rows, double scale, double bias) {
  check_qkv(kGivenOp, q, k, &v);
  check_idx(kGivenOp, q, k, idx);
  check_rows_scale_bias(kGivenOp, q, n_rows, scale, bias);
  const int64_t N_q = q.size(2), N_k = k.size(2);
  const auto opts = q.options().dtype(at::toOpMathType(q.scalar_type()));
  const at::Tensor kt = k.to(opts.dtype()).transpose(-1, -2), va = v.to(opts.dtype());
  at::Tensor row = key_bias_row(idx, N_k, bias, opts);
  row = at::where(row.eq(bias).all(-1, /*keepdim=*/true), at::zeros({}, opts), row);
  at::Tensor out = empty_output(q.sizes(), q.options());
  // blocks end at n_rows, so each block is biased or not as a whole
  for (int64_t r0 = 0; r0 < N_q;) {
    const int64_t r1 = std::min(r0 < n_rows ? n_rows : N_q, r0 + kRows);
    const at::Tensor p = biased_softmax(q.slice(2, r0, r1).to(opts.dtype()), kt, r0 < n_rows ? row : at::Tensor(),
                                        scale);
    out.slice(2, r0, r1).copy_(at::matmul(p, va));
    r0 = r1;
  }
  return out;
}

}  // namespace
}  // namespace diffkern::sinks

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("sink_mass", TORCH_FN(diffkern::sinks::sink_mass_cpu));
  m.impl("sink_attention_fwd", TORCH_FN(diffkern::sinks::sink_attention_fwd_cpu));
  m.impl("sink_topk", TORCH_FN(diffkern::sinks::sink_topk_cpu));
  m.impl("sink_suppress", TORCH_FN(diffkern::sinks::sink_suppress_cpu));
  m.impl("sink_attention_given", TORCH_FN(diffkern::sinks::sink_attention_given_cpu));
}
