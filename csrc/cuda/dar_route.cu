// CUDA kernels of DAR routing (specs/dar.md "Routing"), torch-free: nvcc builds them for the GPU and
// the CPU tests run this very file in the host-execution harness (csrc/include/diffkern/cuda_compat.h).
//
// Layout: one token row per group of threads, the whole of d in registers (dar_rows.cuh); the
// sources are reached through a device table of (pointer, batch stride, token stride). All math is
// float32; offsets are 64-bit.
//
// Traffic, in elements: the forward reads n*B*T*d sources (+ q) and writes B*T*d + B*T; the backward
// reads (n+2)*B*T*d + B*T (+ q) and writes n*B*T*d (+ B*T*d for a per-token q) plus the float32
// [B, n_chunks, d] partial sums, which the reduce kernel reads once.
#include "dar_route.h"

#include "dar_rows.cuh"
#include "diffkern/cuda_compat.h"
#include "diffkern/dar_math.h"

namespace diffkern::dar::cuda {
namespace {

// Backward blocks wanted per SM: enough to fill it, few enough that the partial sums stay small.
constexpr int kBlocksPerSm = 4;
// The reduce kernel's block: kReduceCols columns of d (one 128-byte row segment of the partials) x
// kReduceRows thread rows over the partials; it moves B * n_chunks * d floats once.
constexpr int kReduceCols = 32, kReduceRows = 16;

template <typename S, typename Q>  // S: the sources' storage type
struct FwdArgs {
  gptr<const RouteSource> sources;
  gptr<const Q> q;
  gptr<const float> gain;
  gptr<S> h;
  gptr<float> lse;
  int64_t q_sb, q_st, B, T, d;
  int n;
  float inv_d, inv_sqrt_d, eps;
};

template <typename S, typename Q>
struct BwdArgs {
  FwdArgs<S, Q> in;  // h is read here
  gptr<const S> dh;
  gptr<const RouteSource> dsources;
  gptr<Q> dq;
  gptr<float> partial;
  int64_t tokens_per_chunk, n_chunks;
  bool per_token_q;
};

template <typename Q>
struct ReduceArgs {
  gptr<const float> partial;
  gptr<const Q> q;
  gptr<const float> gain;
  gptr<Q> dq;
  gptr<float> dgain;
  int64_t B, d, n_chunks, q_sb;
  QKind q_kind;
};

template <typename T>
DIFFKERN_DEVICE gptr<T> table_row(gptr<const RouteSource> table, int i, int64_t b, int64_t t, const char* name) {
  const RouteSource e = table[i];
  return global_ptr(static_cast<T*>(const_cast<void*>(e.data)), e.extent, name) + (b * e.sb + t * e.st);
}


// q * gain for token (b, t) (zeros for a padding row).
template <int V, typename T, typename Q>
DIFFKERN_DEVICE void scaled_query(const FwdArgs<T, Q>& a, bool valid, int64_t b, int64_t t, float (&q)[E],
                                  float (&qg)[E]) {
  float g[E] = {};
  for (int e = 0; e < E; ++e) q[e] = 0.0f;
  if (valid) {
    load_row<V>(a.q + (b * a.q_sb + t * a.q_st), a.d, q);
    load_row<V>(a.gain, a.d, g);
  }
#pragma unroll
  for (int e = 0; e < E; ++e) qg[e] = q[e] * g[e];
}

// The overflow fallback's m (dar_math.h): the largest mean((v * kOverflowRescale)^2) over the token's
// source rows, the same on all the row's threads.
template <int V, typename T, typename Q>
DIFFKERN_DEVICE float overflow_mean_square(const FwdArgs<T, Q>& a, bool valid, int64_t b, int64_t t,
                                           sptr<float> scratch, int& parity) {
  float m = 0.0f;
  for (int i = 0; i < a.n; ++i) {
    float v[E] = {};
    if (valid) load_row<V>(table_row<const T>(a.sources, i, b, t, "sources"), a.d, v);
    float ss[1] = {0.0f};
#pragma unroll
    for (int e = 0; e < E; ++e) ss[0] += (v[e] * kOverflowRescale) * (v[e] * kOverflowRescale);
    row_sum(ss, scratch, parity);
    m = fmaxf(m, ss[0] * a.inv_d);
  }
  return m;
}

// Folds a token's sources, each row scaled by pre * sigma (eps by its square, so the scores do not
// change), into acc and state: an online softmax, each source read once. Returns 0 when every row sum
// was finite, NaN otherwise (the same on all the row's threads).
template <int V, typename T, typename Q>
DIFFKERN_DEVICE float fold_sources(const FwdArgs<T, Q>& a, bool valid, int64_t b, int64_t t, const float (&qg)[E],
                                   float pre, float sigma, float (&acc)[E], SoftmaxState<float>& state,
                                   sptr<float> scratch, int& parity) {
  const float eps = a.eps * (pre * sigma) * (pre * sigma);
  float probe = 0.0f;
  for (int i = 0; i < a.n; ++i) {
    float v[E] = {};
    if (valid) load_row<V>(table_row<const T>(a.sources, i, b, t, "sources"), a.d, v);
    float sums[2] = {0.0f, 0.0f};
#pragma unroll
    for (int e = 0; e < E; ++e) {
      v[e] = v[e] * pre * sigma;
      sums[0] += v[e] * v[e];
      sums[1] += qg[e] * v[e];
    }
    row_sum(sums, scratch, parity);
    probe += (sums[0] + sums[1]) * 0.0f;
    const float s = route_score(rstd_from_sumsq(sums[0], a.inv_d, eps), sums[1], a.inv_sqrt_d);
    float scale, w;
    if (i == 0) {
      state = softmax_start(s);
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] = v[e];
    } else if (softmax_push(state, s, scale, w)) {
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] = acc[e] * scale + v[e];
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] += w * v[e];
    }
  }
  return probe;
}

// One token per row of the block. A token whose sums overflowed or whose h is not finite is routed again
// with its rows scaled by kOverflowRescale (dar_math.h); a whole warp takes part, as its shuffles need.
template <typename T, typename Q>
__global__ void __launch_bounds__(kMaxRowThreads) route_fwd_kernel(FwdArgs<T, Q> a) {
  DIFFKERN_SHARED(float, scratch, 2 * kMaxSums * kMaxWarps);
  constexpr int V = kVec<T>;
  const int64_t tok = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = tok < a.B * a.T;  // padding rows still take part in the row's shuffles
  const int64_t b = valid ? tok / a.T : 0, t = valid ? tok % a.T : 0;
  float q[E], qg[E], acc[E] = {};
  scaled_query<V>(a, valid, b, t, q, qg);
  SoftmaxState<float> state{-INFINITY, 0.0f};
  int parity = 0;
  float check[1] = {fold_sources<V>(a, valid, b, t, qg, 1.0f, 1.0f, acc, state, scratch, parity)};
  float inv_l = softmax_inv_l(state);
#pragma unroll
  for (int e = 0; e < E; ++e) {
    acc[e] *= inv_l;
    check[0] += acc[e] * 0.0f;
  }
  row_sum(check, scratch, parity);
  const bool redo = valid && !(check[0] == 0.0f);
  if (valid && !redo) {
    store_row<V>(a.h + tok * a.d, a.d, acc);
    if (threadIdx.x == 0) a.lse[tok] = softmax_lse(state);
  }
  if (!__any_sync(kFullMask, redo)) return;
  const float sigma = overflow_rms_scale(overflow_mean_square<V>(a, valid, b, t, scratch, parity));
  state = {-INFINITY, 0.0f};
  fold_sources<V>(a, valid, b, t, qg, kOverflowRescale, sigma, acc, state, scratch, parity);
  if (!redo) return;
  inv_l = softmax_inv_l(state) / sigma;
#pragma unroll
  for (int e = 0; e < E; ++e) acc[e] = acc[e] * inv_l * (1.0f / kOverflowRescale);
  store_row<V>(a.h + tok * a.d, a.d, acc);
  if (threadIdx.x == 0) a.lse[tok] = softmax_lse(state);
}

// A token's gradients with its rows (and h) scaled by pre * sigma, eps by its square (dv does not
// change): stores each source's dv when `store`, leaves u = sum_i c_i v_i in u. Returns 0 when every row
// sum and this thread's dv and u elements are finite, NaN otherwise.
template <int V, typename T, typename Q>
DIFFKERN_DEVICE float bwd_sources(const BwdArgs<T, Q>& a, bool valid, bool store, int64_t b, int64_t t,
                                  const float (&qg)[E], const float (&dh)[E], float lse, float pre, float sigma,
                                  float (&u)[E], sptr<float> scratch, int& parity) {
  const FwdArgs<T, Q>& in = a.in;
  const int64_t tok = b * in.T + t;
  float h[E] = {};
  if (valid) load_row<V>(gptr<const T>(in.h) + tok * in.d, in.d, h);
  float delta[1] = {0.0f};  // <dh, h> = sum_i alpha_i <dh, v_i>: spares a second pass over the sources
#pragma unroll
  for (int e = 0; e < E; ++e) delta[0] += dh[e] * (h[e] * pre * sigma);
  row_sum(delta, scratch, parity);
  const float eps = in.eps * (pre * sigma) * (pre * sigma);
  float probe = delta[0] * 0.0f;
#pragma unroll
  for (int e = 0; e < E; ++e) u[e] = 0.0f;
  for (int i = 0; i < in.n; ++i) {
    float v[E] = {};
    if (valid) load_row<V>(table_row<const T>(in.sources, i, b, t, "sources"), in.d, v);
    float sums[3] = {0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int e = 0; e < E; ++e) {
      v[e] = v[e] * pre * sigma;
      sums[0] += v[e] * v[e];
      sums[1] += qg[e] * v[e];
      sums[2] += dh[e] * v[e];
    }
    row_sum(sums, scratch, parity);
    probe += (sums[0] + sums[1] + sums[2]) * 0.0f;
    const RouteGrad<float> gr =
        route_grad(rstd_from_sumsq(sums[0], in.inv_d, eps), sums[1], sums[2], delta[0], lse, in.inv_d, in.inv_sqrt_d);
    float dv[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
      dv[e] = gr.alpha * dh[e] + gr.c * qg[e] - gr.beta * v[e];
      u[e] += gr.c * v[e];
      probe += dv[e] * 0.0f;
    }
    if (store) store_row<V>(table_row<T>(a.dsources, i, b, t, "dsources"), in.d, dv);
  }
  const float inv_sigma = 1.0f / sigma, inv_pre = 1.0f / pre;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    u[e] = u[e] * inv_sigma * inv_pre;
    probe += u[e] * 0.0f;
  }
  return probe;
}

// Each block walks one chunk of one batch row's tokens, blockDim.y rows at a time: writes dsources
// and (per-token q) dq, and leaves partial[b, chunk] = the chunk's sum of u (static/per-batch q) or
// of q * u (per-token q), where u = sum_i c_i v_i. A token whose sums overflowed or whose gradients are
// not finite is computed again with its rows scaled by kOverflowRescale, as in the forward.
template <typename T, typename Q>
__global__ void __launch_bounds__(kMaxRowThreads) route_bwd_kernel(BwdArgs<T, Q> a) {
  DIFFKERN_SHARED(float, scratch, 2 * kMaxSums * kMaxWarps);
  DIFFKERN_EXTERN_SHARED(float, row_partials);  // [blockDim.y, d] when rows share the block
  constexpr int V = kVec<T>;
  const FwdArgs<T, Q>& in = a.in;
  const int64_t b = blockIdx.x / a.n_chunks, t_begin = blockIdx.x % a.n_chunks * a.tokens_per_chunk;
  const int64_t t_end = t_begin + a.tokens_per_chunk < in.T ? t_begin + a.tokens_per_chunk : in.T;
  float part[E] = {};
  int parity = 0;
  for (int64_t t0 = t_begin; t0 < t_end; t0 += blockDim.y) {
    const int64_t t = t0 + threadIdx.y, tok = b * in.T + t;
    const bool valid = t < t_end;
    float q[E], qg[E], dh[E] = {};
    scaled_query<V>(in, valid, b, t, q, qg);
    if (valid) load_row<V>(a.dh + tok * in.d, in.d, dh);
    const float lse = valid ? float(in.lse[tok]) : 0.0f;
    float u[E];
    // a padding row's u may be NaN (eps = 0 makes its rstd infinite): only valid rows count
    float check[1] = {bwd_sources<V>(a, valid, valid, b, t, qg, dh, lse, 1.0f, 1.0f, u, scratch, parity)};
    row_sum(check, scratch, parity);
    const bool redo = valid && !(check[0] == 0.0f);
    const auto take = [&] {
      if (a.per_token_q) {
        float dq[E], g[E];
        load_row<V>(in.q + (b * in.q_sb + t * in.q_st), in.d, q);  // reloaded (cache hit) rather than held
        load_row<V>(in.gain, in.d, g);
#pragma unroll
        for (int e = 0; e < E; ++e) {
          dq[e] = u[e] * g[e];
          part[e] += q[e] * u[e];
        }
        store_row<V>(a.dq + tok * in.d, in.d, dq);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) part[e] += u[e];
      }
    };
    if (valid && !redo) take();
    if (__any_sync(kFullMask, redo)) {
      const float sigma = overflow_rms_scale(overflow_mean_square<V>(in, valid, b, t, scratch, parity));
      bwd_sources<V>(a, valid, redo, b, t, qg, dh, lse, kOverflowRescale, sigma, u, scratch, parity);
      if (redo) take();
    }
  }
  const gptr<float> out = a.partial + int64_t(blockIdx.x) * in.d;
  if (blockDim.y == 1) {
    store_row<V>(out, in.d, part);
    return;
  }
  // Rows sharing the block add up in a fixed order through shared memory.
  for_each_access<V, V>(out, in.d, [&](int64_t j, int r, bool) {
#pragma unroll
    for (int e = 0; e < V; ++e)
      if (j + e < in.d) row_partials[threadIdx.y * in.d + j + e] = part[r + e];
  });
  __syncthreads();
  for (int64_t j = threadIdx.y * blockDim.x + threadIdx.x; j < in.d; j += int64_t(blockDim.x) * blockDim.y) {
    float s = 0.0f;
    for (int y = 0; y < int(blockDim.y); ++y) s += row_partials[y * in.d + j];
    out[j] = s;
  }
}

// The thread rows per segment of route_reduce_kernel: the power of two S <= kReduceRows with the least serial
// depth ceil(segments / G) * (ceil(chunks / S) + log2 S), G = kReduceRows / S; a tie goes to the wider tree.
DIFFKERN_DEVICE int reduce_group(int64_t segments, int64_t chunks) {
  int best = 1;  // S = 1: no tree, each thread row walks whole segments
  int64_t best_depth = (segments + kReduceRows - 1) / kReduceRows * chunks;
  for (int S = 2, log2 = 1; S <= kReduceRows; S *= 2, ++log2) {
    const int64_t G = kReduceRows / S;
    const int64_t depth = (segments + G - 1) / G * ((chunks + S - 1) / S + log2);
    if (depth <= best_depth) best = S, best_depth = depth;
  }
  return best;
}

// The partial sums of a column, summed by a block of kReduceCols columns x kReduceRows thread rows in a
// fixed order (the shape's alone, never timing): a dq row needs the sum over one batch row's chunks (a
// per-batch q), dgain and a static q's dq the sum over every partial. The partials are cut into segments
// (a batch row's chunks for a per-batch q, else all B * n_chunks as one); the thread rows form G groups of S
// (reduce_group: a power of two, the shape's alone), and each group takes every G-th segment in turn.
// Within a group, thread s sums chunks s, s + S, ... serially, then a shared-memory tree adds the S sums
// pairwise (sum[s] += sum[s + stride], stride S/2 ... 1). The group's first thread writes the batch row's
// dq and accumulates its share of the total in segment order; a last tree over the thread rows adds the G
// shares. Serial depth: ceil(segments / G) * (ceil(chunks / S) + log2 S) + log2 kReduceRows adds, where
// one thread per column took B * n_chunks (512 at SiT-XL/2's B=8, T=256, d=1152 on 132 SMs: now 37).
template <typename Q>
__global__ void __launch_bounds__(kReduceCols* kReduceRows) route_reduce_kernel(ReduceArgs<Q> a) {
  DIFFKERN_SHARED(float, tree, kReduceRows * kReduceCols);
  const int x = int(threadIdx.x), y = int(threadIdx.y);
  const int64_t j = int64_t(blockIdx.x) * kReduceCols + x;
  const bool col = j < a.d;
  const bool per_batch = a.q_kind == QKind::kPerBatch;
  const int64_t segments = per_batch ? a.B : 1, chunks = per_batch ? a.n_chunks : a.B * a.n_chunks;
  const int S = reduce_group(segments, chunks);
  const int G = kReduceRows / S, group = y / S, s = y % S;
  const float g = col ? a.gain[j] : 0.0f;
  float share = 0.0f;  // this group's sum over its segments (the first thread of each group)
  for (int64_t first = 0; first < segments; first += G) {
    const int64_t b = first + group;
    float v = 0.0f;
    if (col && b < segments)
      for (int64_t c = s; c < chunks; c += S) v += a.partial[(b * chunks + c) * a.d + j];
    if (S > 1) {
      tree[y * kReduceCols + x] = v;
      __syncthreads();
      for (int stride = S / 2; stride > 0; stride /= 2) {
        if (s < stride) tree[y * kReduceCols + x] += tree[(y + stride) * kReduceCols + x];
        __syncthreads();
      }
      v = tree[y * kReduceCols + x];  // each thread writes only its own slot: no barrier before the next segment
    }
    if (col && s == 0 && b < segments) {
      if (per_batch) {
        a.dq[b * a.d + j] = from_float<Q>(v * g);
        share += to_float(a.q[b * a.q_sb + j]) * v;
      } else {
        share += v;
      }
    }
  }
  tree[y * kReduceCols + x] = share;
  __syncthreads();
  for (int stride = kReduceRows / 2; stride > 0; stride /= 2) {
    if (y < stride) tree[y * kReduceCols + x] += tree[(y + stride) * kReduceCols + x];
    __syncthreads();
  }
  if (!col || y != 0) return;
  const float total = tree[x];
  if (a.q_kind == QKind::kStatic) {
    a.dq[j] = from_float<Q>(total * g);
    a.dgain[j] = to_float(a.q[j]) * total;
  } else {
    a.dgain[j] = total;
  }
}

// Calls f(T{}, Q{}) for the sources' and q's storage types.
template <typename F>
const char* dispatch(DType dtype, DType q_dtype, const F& f) {
  const bool q_float = q_dtype == DType::kFloat32;
  switch (dtype) {
    case DType::kFloat16: return q_float ? f(__half{}, float{}) : f(__half{}, __half{});
    case DType::kBFloat16: return q_float ? f(__nv_bfloat16{}, float{}) : f(__nv_bfloat16{}, __nv_bfloat16{});
    default: return f(float{}, float{});
  }
}

template <typename T, typename Q>
FwdArgs<T, Q> fwd_args(const RouteInputs& in, void* h, float* lse) {
  const int64_t rows = in.B * in.T;
  return {global_ptr(in.sources, in.n, "sources table"),
          global_ptr(static_cast<const Q*>(in.q), in.q_extent, "q"),
          global_ptr(in.gain, in.d, "gain"),
          global_ptr(static_cast<T*>(h), rows * in.d, "h"),
          global_ptr(lse, rows, "lse"),
          in.q_sb, in.q_st, in.B, in.T, in.d, int(in.n),
          1.0f / float(in.d), 1.0f / sqrtf(float(in.d)), in.eps};
}

}  // namespace

RouteChunks route_bwd_chunks(int64_t B, int64_t T, int64_t d, int sm_count) {
  const int64_t R = row_layout(d).R;
  if (B == 0 || T == 0) return {0, R};
  const int64_t steps = (T + R - 1) / R;  // blockDim.y-row steps per batch row
  const int64_t want = (int64_t(kBlocksPerSm) * sm_count + B - 1) / B;
  const int64_t per_row = want < 1 ? 1 : want > steps ? steps : want;
  const int64_t steps_per_chunk = (steps + per_row - 1) / per_row;
  return {(steps + steps_per_chunk - 1) / steps_per_chunk, steps_per_chunk * R};
}

int route_sm_count() { return sm_count(); }

const char* route_fwd(const RouteFwdParams& p) {
  const RouteInputs& in = p.in;
  if (in.B * in.T == 0) return nullptr;
  const RowLayout L = row_layout(in.d);
  const int64_t blocks = (in.B * in.T + L.R - 1) / L.R;
  return dispatch(in.dtype, in.q_dtype, [&](auto t_tag, auto q_tag) {
    using T = decltype(t_tag);
    using Q = decltype(q_tag);
    return launch_kernel("route_fwd_kernel", route_fwd_kernel<T, Q>, dim3(unsigned(blocks)), dim3(L.G, L.R), 0,
                         p.stream, fwd_args<T, Q>(in, p.h, p.lse));
  });
}

const char* route_bwd(const RouteBwdParams& p) {
  const RouteInputs& in = p.in;
  const RowLayout L = row_layout(in.d);
  const int64_t rows = in.B * in.T;
  return dispatch(in.dtype, in.q_dtype, [&](auto t_tag, auto q_tag) -> const char* {
    using T = decltype(t_tag);
    using Q = decltype(q_tag);
    const int64_t n_partial = in.B * p.chunks.n_chunks;
    const gptr<Q> dq = global_ptr(static_cast<Q*>(p.dq), in.q_kind == QKind::kPerToken ? rows * in.d
                                                         : in.q_kind == QKind::kPerBatch ? in.B * in.d : in.d, "dq");
    const gptr<float> partial = global_ptr(p.partial, n_partial * in.d, "partial");
    if (n_partial > 0) {
      BwdArgs<T, Q> args{fwd_args<T, Q>(in, const_cast<void*>(p.h), const_cast<float*>(p.lse)),
                         global_ptr(static_cast<const T*>(p.dh), rows * in.d, "dh"),
                         global_ptr(p.dsources, in.n, "dsources table"),
                         dq, partial, p.chunks.tokens_per_chunk, p.chunks.n_chunks, in.q_kind == QKind::kPerToken};
      const size_t smem = L.R > 1 ? size_t(L.R) * size_t(in.d) * sizeof(float) : 0;
      if (const char* err = launch_kernel("route_bwd_kernel", route_bwd_kernel<T, Q>, dim3(unsigned(n_partial)),
                                          dim3(L.G, L.R), smem, p.stream, args))
        return err;
    }
    const ReduceArgs<Q> reduce{partial, global_ptr(static_cast<const Q*>(in.q), in.q_extent, "q"),
                               global_ptr(in.gain, in.d, "gain"), dq, global_ptr(p.dgain, in.d, "dgain"),
                               in.B, in.d, p.chunks.n_chunks, in.q_sb, in.q_kind};
    return launch_kernel("route_reduce_kernel", route_reduce_kernel<Q>,
                         dim3(unsigned((in.d + kReduceCols - 1) / kReduceCols)), dim3(kReduceCols, kReduceRows), 0,
                         p.stream, reduce);
  });
}

}  // namespace diffkern::dar::cuda
