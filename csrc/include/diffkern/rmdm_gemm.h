// Packed-weight GEMM for the CPU recursion kernels: Y[M, N] = A[M, Kd] W^T + bias, W stored [N, Kd].
//
// The recursion applies the same weights K * L times per call, so each weight matrix is packed once per
// call into column panels of kNR outputs laid out [panel][Kd][kNR] (zero-padded past N): the micro-kernel
// then streams one contiguous panel per k step and keeps a tile_rows() x kNR tile of Y in registers. The panel
// of a 256-wide layer (256 * 32 * 4 bytes = 32 KB) stays in L1 while every row block of a small A passes over it.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace diffkern::rmdm {

// Columns of the register tile (one panel); its rows are tile_rows<acc_t>().
constexpr int64_t kNR = 32;
// Least multiply-adds worth a thread: below it the tile loop runs on the calling thread.
constexpr int64_t kMinParallelWork = 1 << 16;
// Most bytes of A for which packed_linear walks panel by panel (each panel reused from L1 by every row block,
// A from L2); a larger A is walked row block by row block (its rows reused from L1, the panels from L2).
constexpr int64_t kPanelOuterBytes = 256 << 10;
// k steps ahead that the AVX-512 tile prefetches its panel's rows and a column-major A's rows (the attention
// backward's dS^T and P^T: one row of T values per k). In a training step the panels (the ~3 MB of one block's
// weights) come from L3 on their first row block: the tile stalled on those loads.
constexpr int64_t kPrefetchPanelK = 48, kPrefetchColK = 16;
constexpr int64_t kCacheLine = 64;

// Rows of the register tile. fp32 on AVX-512: 12 x 32 accumulators = 24 zmm registers, with the two panel
// vectors and the broadcast A value 27 of 32; per k, 24 FMAs for 14 loads (8 x 32: 16 for 10). Otherwise 8.
template <typename acc_t>
constexpr int64_t tile_rows() {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<acc_t, float>) return 12;
#endif
  return 8;
}

// The right operand as the tile reads it: panel q's row k (kNR values) at data[q * panel_stride + k * row_stride],
// for N columns (a packed last panel is zero past N) over Kd rows; bias (null: zero) is added to every row of the
// result.
template <typename acc_t>
struct Panels {
  const acc_t* data;
  int64_t N, Kd, panel_stride, row_stride;
  const acc_t* bias;
};

#ifdef __AVX512F__
// Rows and columns of the block transpose16 transposes: one zmm of fp32.
constexpr int64_t kTransposeBlock = 16;

// dst[c * ld_dst + r] = src[r * ld_src + c] * scale for a 16 x 16 block of fp32, in registers: 16 row loads, four
// rounds of shuffles, 16 column stores (the packing of a row-major weight into panels is this transpose; element by
// element it cost a load per value).
// (GCC 12 warns that the unmasked unpacks and shuffles read an uninitialised vector: their headers pass
// _mm512_undefined_ps() as the unused pass-through operand.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
inline void transpose16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, float scale) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // r[4 g + c]: rows 4g .. 4g + 3 of the columns c, 4 + c, 8 + c, 12 + c (one per 128-bit lane)
  for (int g = 0; g < 4; ++g) {
    const __m512d lo0 = _mm512_castps_pd(t[4 * g]), lo1 = _mm512_castps_pd(t[4 * g + 2]);
    const __m512d hi0 = _mm512_castps_pd(t[4 * g + 1]), hi1 = _mm512_castps_pd(t[4 * g + 3]);
    r[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo0, lo1));
    r[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo0, lo1));
    r[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi0, hi1));
    r[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi0, hi1));
  }
  // t[c] and t[4 + c]: rows 0 .. 7 of the columns (c, 8 + c) and (4 + c, 12 + c); t[8 + c], t[12 + c]: rows 8 .. 15
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88), t[4 + c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
    t[8 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int c = 0; c < 4; ++c) {
    _mm512_storeu_ps(dst + c * ld_dst, _mm512_mul_ps(_mm512_shuffle_f32x4(t[c], t[8 + c], 0x88), s));
    _mm512_storeu_ps(dst + (8 + c) * ld_dst, _mm512_mul_ps(_mm512_shuffle_f32x4(t[c], t[8 + c], 0xdd), s));
    _mm512_storeu_ps(dst + (4 + c) * ld_dst, _mm512_mul_ps(_mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0x88), s));
    _mm512_storeu_ps(dst + (12 + c) * ld_dst, _mm512_mul_ps(_mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0xdd), s));
  }
}
#pragma GCC diagnostic pop
#endif

template <typename acc_t>
struct PackedWeight {
  int64_t N = 0, Kd = 0, panels = 0;
  std::vector<acc_t> data;  // [panels][Kd][kNR]
  std::vector<acc_t> bias;  // [N]

  // Packs the [n, kd] matrix with element (j, k) at src[j * stride_n + k * stride_k], times `scale`, and a
  // zero bias (attention's scaled K^T per head, rows_operand's fallback, and pack's weights, whose bias pack then
  // sets). A source of another storage type T (a 16-bit weight) is widened to acc_t as it is copied: a contiguous
  // row by widen(src, dst, count), a strided one element by element (both exact), so no widened copy of the whole
  // matrix is made.
  // Panels are packed in parallel when there is kMinParallelWork to share (the weights and a backward's inputs),
  // each thread a contiguous range of them, written one row of kNR at a time. With stride_n == 1 the rows are
  // walked k-outer, so the source is read row by row (sequential, prefetched; a vectorised copy); otherwise panel by
  // panel, k-inner, so the kNR source rows of a panel stay in L1 across consecutive k: with stride_k == 1 (a
  // row-major weight) this is a transpose, done for fp32 on AVX-512 in 16 x 16 blocks (transpose16) and element by
  // element for the remainders.
  template <typename T, typename Widen = std::nullptr_t>
  void pack_strided(const T* src, int64_t n, int64_t kd, int64_t stride_n, int64_t stride_k, acc_t scale,
                    const Widen& widen = nullptr) {
    static_assert(std::is_same_v<T, acc_t> || !std::is_null_pointer_v<Widen>, "a T source needs its widen");
    shape(n, kd);
    bias.assign(n, acc_t(0));
    const auto row = [&](int64_t p, int64_t k, int64_t j0) {
      const int64_t width = std::min(kNR, n - p * kNR);
      const T* __restrict sk = src + p * kNR * stride_n + k * stride_k;
      acc_t* __restrict dk = data.data() + (p * kd + k) * kNR;
      if (stride_n != 1) {
#pragma GCC unroll 4
        for (int64_t j = j0; j < width; ++j) dk[j] = static_cast<acc_t>(sk[j * stride_n]) * scale;
      } else if constexpr (std::is_same_v<T, acc_t>) {
#pragma omp simd
        for (int64_t j = j0; j < width; ++j) dk[j] = sk[j] * scale;
      } else {
        widen(sk + j0, dk + j0, width - j0);
        if (scale == acc_t(1)) return;
#pragma omp simd
        for (int64_t j = j0; j < width; ++j) dk[j] *= scale;
      }
    };
    at::parallel_for(0, panels, std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(kd * kNR, 1)),
                     [&](int64_t begin, int64_t end) {
      if (stride_n == 1) {
        for (int64_t k = 0; k < kd; ++k)
          for (int64_t p = begin; p < end; ++p) row(p, k, 0);
        return;
      }
      for (int64_t p = begin; p < end; ++p) {
        int64_t k = 0, j0 = 0;  // the panel's rows below j0 at the steps below k: transposed in 16 x 16 blocks
#ifdef __AVX512F__
        if constexpr (std::is_same_v<T, float> && std::is_same_v<acc_t, float>) {
          if (stride_k == 1) {
            j0 = std::min(kNR, n - p * kNR) / kTransposeBlock * kTransposeBlock;
            for (; j0 > 0 && k + kTransposeBlock <= kd; k += kTransposeBlock)
              for (int64_t j = 0; j < j0; j += kTransposeBlock)
                transpose16(src + (p * kNR + j) * stride_n + k, stride_n, data.data() + (p * kd + k) * kNR + j, kNR,
                            scale);
          }
        }
#endif
        for (int64_t kk = 0; kk < k; ++kk) row(p, kk, j0);
        for (; k < kd; ++k) row(p, k, 0);
      }
    });
  }

  // Packs W [N, Kd] (row stride Kd) and its bias, both of storage type T, widened to acc_t by widen(src, dst, count).
  template <typename T, typename W>
  void pack(const T* w, const T* b, int64_t n, int64_t kd, const W& widen) {
    pack_strided(w, n, kd, kd, 1, acc_t(1), widen);
    widen(b, bias.data(), n);
  }

  Panels<acc_t> view() const { return {data.data(), N, Kd, Kd * kNR, kNR, bias.data()}; }

  // Sizes the panels for an [n, kd] matrix, keeping data's storage, and zeroes the columns of the last panel
  // past n: the packing writes every other element, so nothing is zero-filled twice.
  void shape(int64_t n, int64_t kd) {
    N = n, Kd = kd, panels = (n + kNR - 1) / kNR;
    data.resize(panels * kd * kNR);
    const int64_t used = n - (panels - 1) * kNR;
    if (panels == 0 || used == kNR) return;
    acc_t* last = data.data() + (panels - 1) * kd * kNR;
    for (int64_t k = 0; k < kd; ++k) std::fill(last + k * kNR + used, last + (k + 1) * kNR, acc_t(0));
  }
};

// A row-major [kd, n] matrix b (row stride ldb) as the right operand with a zero bias: read in place when its rows
// split into whole panels (n a multiple of kNR; the tile then streams kNR values of each row, ldb apart), else
// packed into `buf`. In place saves the packing pass over b (attention's V per head, and K, Q and dctx in its backward,
// read within their [M, 3d] and [M, d] rows).
template <typename acc_t>
Panels<acc_t> rows_operand(const acc_t* b, int64_t kd, int64_t n, int64_t ldb, PackedWeight<acc_t>& buf) {
  if (n % kNR == 0) return {b, n, kd, kNR, ldb, nullptr};
  buf.pack_strided(b, n, kd, 1, ldb, acc_t(1));
  return buf.view();
}

// How A [M, Kd] is stored: by rows, A[r, k] at a[r * lda + k], or by columns, at a[k * lda + r] (a transposed
// operand read in place: the broadcasts of one k are then contiguous).
enum class Layout { kRows, kCols };

template <Layout kA>
constexpr int64_t a_index(int64_t r, int64_t k, int64_t lda) {
  return kA == Layout::kRows ? r * lda + k : k * lda + r;
}

// Asks for one panel row (kNR values) in L2, ahead of the tile that will read it.
template <typename acc_t>
inline void prefetch_row_l2(const acc_t* row) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < kNR * static_cast<int64_t>(sizeof(acc_t)); b += kCacheLine) {
    __builtin_prefetch(bytes + b, 0, 2);  // read, locality 2: prefetcht1 on x86
  }
}

// C[r, n0 + j] = sum_k A[r, k] P[k, j] + bias[j] for MR rows of A (laid out by kA, stride lda) and one panel P
// (row stride ldp; bias null: zero). Along the way the first ahead_rows rows at `ahead` (row stride ldp: a share of
// the panel the next tiles read) are prefetched into L2, one row per k step.
template <int MR, Layout kA, typename acc_t>
inline void micro_tile(const acc_t* __restrict a, int64_t lda, const acc_t* __restrict p, int64_t ldp, int64_t Kd,
                       const acc_t* __restrict bias, int64_t n_cols, acc_t* __restrict c, int64_t ldc,
                       const acc_t* ahead, int64_t ahead_rows) {
  acc_t acc[MR][kNR] = {};
  for (int64_t k = 0; k < Kd; ++k) {
    if (k < ahead_rows) prefetch_row_l2(ahead + k * ldp);
    const acc_t* __restrict pk = p + k * ldp;
    for (int r = 0; r < MR; ++r) {
      const acc_t ar = a[a_index<kA>(r, k, lda)];
#pragma omp simd
      for (int64_t j = 0; j < kNR; ++j) acc[r][j] += ar * pk[j];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int64_t j = 0; j < n_cols; ++j) c[r * ldc + j] = acc[r][j] + (bias ? bias[j] : acc_t(0));
}

#ifdef __AVX512F__
// An address `bytes` past p, for a prefetch (which never faults, so it may lie past the end of p's buffer).
inline const char* prefetch_address(const float* p, int64_t bytes) {
  return reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + bytes);
}

// The fp32 tile in AVX-512 registers: per k, two panel vectors and one broadcast per row, and the prefetches of
// the panel row kPrefetchPanelK ahead into L1 (and of A's row kPrefetchColK ahead when A is read by columns) and of
// one row at `ahead` into L2. Every pointer advances by a constant per k (no index arithmetic in the loop), and a
// row-major A is addressed in groups of three rows, group + (r % 3) lda: four pointers and lda, where one pointer
// per row ran out of registers (12 of them spilled at MR = 12).
template <int MR, Layout kA>
inline void micro_tile(const float* __restrict a, int64_t lda, const float* __restrict p, int64_t ldp, int64_t Kd,
                       const float* __restrict bias, int64_t n_cols, float* __restrict c, int64_t ldc,
                       const float* ahead, int64_t ahead_rows) {
  constexpr int kGroups = (MR + 2) / 3;
  __m512 acc0[MR], acc1[MR];
  for (int r = 0; r < MR; ++r) acc0[r] = _mm512_setzero_ps(), acc1[r] = _mm512_setzero_ps();
  const float* group[kGroups];
  for (int g = 0; g < kGroups; ++g) group[g] = kA == Layout::kRows ? a + 3 * g * lda : a + 3 * g;
  const int64_t a_step = kA == Layout::kRows ? 1 : lda;  // per k
  const int64_t panel_ahead = kPrefetchPanelK * ldp * int64_t(sizeof(float));
  const int64_t col_ahead = kPrefetchColK * lda * int64_t(sizeof(float));
  for (int64_t k = 0; k < Kd; ++k, p += ldp) {
    if (k < ahead_rows) prefetch_row_l2(ahead + k * ldp);
    _mm_prefetch(prefetch_address(p, panel_ahead), _MM_HINT_T0);
    _mm_prefetch(prefetch_address(p, panel_ahead + kCacheLine), _MM_HINT_T0);
    if constexpr (kA == Layout::kCols) {
      _mm_prefetch(prefetch_address(group[0], col_ahead), _MM_HINT_T0);
      _mm_prefetch(prefetch_address(group[0], col_ahead + (MR - 1) * int64_t(sizeof(float))), _MM_HINT_T0);
    }
    const __m512 p0 = _mm512_loadu_ps(p), p1 = _mm512_loadu_ps(p + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 ar = _mm512_set1_ps(group[r / 3][kA == Layout::kRows ? r % 3 * lda : r % 3]);
      acc0[r] = _mm512_fmadd_ps(ar, p0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(ar, p1, acc1[r]);
    }
    for (int g = 0; g < kGroups; ++g) group[g] += a_step;
  }
  const __mmask16 m0 = n_cols >= 16 ? 0xFFFF : (1u << n_cols) - 1;
  const __mmask16 m1 = n_cols >= 32 ? 0xFFFF : n_cols <= 16 ? 0 : (1u << (n_cols - 16)) - 1;
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, m0, _mm512_add_ps(acc0[r], b0));
    _mm512_mask_storeu_ps(c + r * ldc + 16, m1, _mm512_add_ps(acc1[r], b1));
  }
}
#endif

// The tile for `rows` <= MR rows: one instantiation per count, so the accumulators stay in registers.
template <int MR, Layout kA, typename acc_t>
inline void row_tile(int64_t rows, const acc_t* a, int64_t lda, const acc_t* p, int64_t ldp, int64_t Kd,
                     const acc_t* bias, int64_t n_cols, acc_t* c, int64_t ldc, const acc_t* ahead, int64_t ahead_rows) {
  if constexpr (MR >= 1) {
    if (rows == MR) return micro_tile<MR, kA>(a, lda, p, ldp, Kd, bias, n_cols, c, ldc, ahead, ahead_rows);
    row_tile<MR - 1, kA>(rows, a, lda, p, ldp, Kd, bias, n_cols, c, ldc, ahead, ahead_rows);
  }
}

// Y [M, ldy] (first N columns) = A W^T + bias, A [M, Kd] laid out by kA with stride lda, in tiles of tile_rows()
// rows x one panel. Each output is one accumulator over k ascending whatever the tile order, so the order changes
// no bit of Y. An A of up to kPanelOuterBytes is walked panel-major: a panel is reused from L1 across all row
// blocks, and each thread owns a contiguous range of panels (W is streamed once in all); a larger one
// row-block-major, each thread owning a range of row blocks and re-reading the panels (W, up to 1 MB here) from L2.
template <Layout kA = Layout::kRows, typename acc_t>
void packed_linear(const acc_t* a, int64_t M, int64_t lda, const Panels<acc_t>& w, acc_t* y, int64_t ldy) {
  constexpr int64_t MR = tile_rows<acc_t>();
  const int64_t panels = (w.N + kNR - 1) / kNR, row_blocks = (M + MR - 1) / MR, tiles = row_blocks * panels;
  const bool panel_major = M * w.Kd * static_cast<int64_t>(sizeof(acc_t)) <= kPanelOuterBytes;
  const int64_t grain = std::max<int64_t>(1, kMinParallelWork / (MR * kNR * std::max<int64_t>(w.Kd, 1)));
  // The rows of the next panel each tile prefetches into L2: panel-major, a 1/row_blocks share per row block, so the
  // next panel is in L2 when its first row block starts; row-block-major, the whole next panel, on the thread's
  // first pass over the panels only (later passes find them in L2).
  const int64_t share = panel_major ? (w.Kd + row_blocks - 1) / row_blocks : w.Kd;
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t panel = panel_major ? t / row_blocks : t % panels;
      const int64_t block = panel_major ? t % row_blocks : t / panels, r0 = block * MR;
      const int64_t n0 = panel * kNR, n_cols = std::min(kNR, w.N - n0), rows = std::min(MR, M - r0);
      const int64_t k0 = panel_major ? block * share : 0;
      const bool ahead = panel + 1 < panels && (panel_major || t < begin + panels);
      const int64_t ahead_rows = ahead ? std::clamp<int64_t>(w.Kd - k0, 0, share) : 0;
      const acc_t* p = w.data + panel * w.panel_stride;
      row_tile<MR, kA>(rows, a + a_index<kA>(r0, 0, lda), lda, p, w.row_stride, w.Kd, w.bias ? w.bias + n0 : nullptr,
                       n_cols, y + r0 * ldy + n0, ldy, ahead ? p + w.panel_stride + k0 * w.row_stride : p, ahead_rows);
    }
  });
}

template <Layout kA = Layout::kRows, typename acc_t>
void packed_linear(const acc_t* a, int64_t M, int64_t lda, const PackedWeight<acc_t>& w, acc_t* y, int64_t ldy) {
  packed_linear<kA>(a, M, lda, w.view(), y, ldy);
}

}  // namespace diffkern::rmdm
