// stream_pass: the machine-limit yardstick of a one-pass elementwise kernel (python/diffkern/bench/machine.py).
//
// One pass over R float32 arrays read and W written (1 <= R <= 4, 1 <= W <= 3, all of n elements):
// writes[j][i] = reads[0][i] + ... + reads[R-1][i] for every j, parallel over blocks of elements like diffkern's
// elementwise kernels. Each (R, W) is its own unrolled loop (no per-element pointer indirection), so it streams at
// what a plain compiled loop reaches. `nontemporal`: the stores bypass the caches (SSE2 streaming stores; plain
// stores on other ISAs), which saves the read-for-ownership of every written line when the working set does not
// stay in the last-level cache, and costs the next reader a miss when it would.
#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "diffkern/check.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace diffkern::stream {
namespace {

constexpr const char* kOp = "stream_pass";
constexpr int64_t kBlock = 16384;  // elements per parallel task, as ntrk_step's
constexpr int kMaxReads = 4, kMaxWrites = 3;

template <int R>
inline float sum_at(const std::array<const float*, R>& in, int64_t i) {
  float s = in[0][i];
  for (int k = 1; k < R; ++k) s += in[k][i];
  return s;
}

// Elements [lo, hi) with plain stores.
template <int R, int W>
void plain(const std::array<const float*, R>& in, const std::array<float*, W>& out, int64_t lo, int64_t hi) {
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) {
    const float s = sum_at<R>(in, i);
    for (int j = 0; j < W; ++j) out[j][i] = s;
  }
}

// Elements [lo, hi) with streaming stores: plain up to the first index where every output is 16-byte aligned (the
// outputs share their alignment when allocated alike; otherwise all plain), four lanes at a time after, plain tail.
template <int R, int W>
void streamed(const std::array<const float*, R>& in, const std::array<float*, W>& out, int64_t lo, int64_t hi) {
#if defined(__SSE2__)
  auto misaligned = [&](int64_t i) {
    for (int j = 0; j < W; ++j)
      if (reinterpret_cast<uintptr_t>(out[j] + i) % 16 != 0) return true;
    return false;
  };
  int64_t i = lo;
  while (i < hi && i < lo + 4 && misaligned(i)) ++i;
  if (misaligned(i)) return plain<R, W>(in, out, lo, hi);
  plain<R, W>(in, out, lo, i);
  for (; i + 4 <= hi; i += 4) {
    __m128 s = _mm_loadu_ps(in[0] + i);
    for (int k = 1; k < R; ++k) s = _mm_add_ps(s, _mm_loadu_ps(in[k] + i));
    for (int j = 0; j < W; ++j) _mm_stream_ps(out[j] + i, s);
  }
  plain<R, W>(in, out, i, hi);
  _mm_sfence();  // the streamed lines reach memory before the pool's join publishes them
#else
  plain<R, W>(in, out, lo, hi);
#endif
}

template <int R, int W>
void run(const std::vector<at::Tensor>& reads, const std::vector<at::Tensor>& writes, bool nontemporal) {
  std::array<const float*, R> in;
  std::array<float*, W> out;
  for (int k = 0; k < R; ++k) in[k] = reads[k].const_data_ptr<float>();
  for (int j = 0; j < W; ++j) out[j] = writes[j].mutable_data_ptr<float>();
  const int64_t n = reads[0].numel();
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
    const int64_t lo = begin * kBlock, hi = std::min(n, end * kBlock);
    nontemporal ? streamed<R, W>(in, out, lo, hi) : plain<R, W>(in, out, lo, hi);
  });
}

template <int R>
void run_reads(const std::vector<at::Tensor>& reads, const std::vector<at::Tensor>& writes, bool nontemporal) {
  switch (writes.size()) {
    case 1: return run<R, 1>(reads, writes, nontemporal);
    case 2: return run<R, 2>(reads, writes, nontemporal);
    default: return run<R, 3>(reads, writes, nontemporal);
  }
}

void check(const at::TensorList& reads, const at::TensorList& writes) {
  TORCH_CHECK_VALUE(!reads.empty() && reads.size() <= kMaxReads, kOp, ": reads must hold 1 to ", kMaxReads,
                    " tensors, got ", reads.size());
  TORCH_CHECK_VALUE(!writes.empty() && writes.size() <= kMaxWrites, kOp, ": writes must hold 1 to ", kMaxWrites,
                    " tensors, got ", writes.size());
  const int64_t n = reads[0].numel();
  for (const auto& [list, name] : {std::pair{reads, "reads"}, std::pair{writes, "writes"}}) {
    for (size_t k = 0; k < list.size(); ++k) {
      const at::Tensor& t = list[k];
      TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n,
                        kOp, ": ", name, "[", k, "] must be a contiguous float32 CPU tensor of ", n,
                        " elements (reads[0]'s), got ", dtype_name(t.scalar_type()), " on ", t.device(), " with ",
                        t.numel(), " elements", t.is_contiguous() ? "" : ", not contiguous");
    }
  }
}

void stream_pass_cpu(at::TensorList reads, at::TensorList writes, bool nontemporal) {
  check(reads, writes);
  const std::vector<at::Tensor> r(reads.begin(), reads.end()), w(writes.begin(), writes.end());
  switch (r.size()) {
    case 1: return run_reads<1>(r, w, nontemporal);
    case 2: return run_reads<2>(r, w, nontemporal);
    case 3: return run_reads<3>(r, w, nontemporal);
    default: return run_reads<4>(r, w, nontemporal);
  }
}

}  // namespace
}  // namespace diffkern::stream

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("stream_pass", TORCH_FN(diffkern::stream::stream_pass_cpu)); }
