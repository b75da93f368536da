// Host interface of the CUDA routing kernels (dar_route.cu): plain structs and launch functions with
// no torch or CUDA types, included by the torch glue (dar_route_glue.h) of both the CUDA build and the
// CPU harness build. Pointers are device pointers; extents count the elements reachable from them
// (the harness bounds-checks every access against them; the GPU build ignores them).
#pragma once

#include <stdint.h>

#include "diffkern/dar_math.h"

namespace diffkern::dar::cuda {

enum class DType : int32_t { kFloat32, kFloat16, kBFloat16 };

// Elements of a row each thread owns (two 16-byte vectors of 16-bit data, four of float32), and the
// widest row: 256 threads, the largest block whose ~100 live floats per thread (backward) fit the
// register file with no spill at 255 registers.
constexpr int kElemsPerThread = 16;
constexpr int kMaxRowThreads = 256;
constexpr int64_t kMaxD = int64_t(kElemsPerThread) * kMaxRowThreads;

// One entry of a device table of sources (or of their gradients): row (b, t) starts at element
// b * sb + t * st of data.
struct RouteSource {
  const void* data;
  int64_t extent, sb, st;
};
static_assert(sizeof(RouteSource) == 32, "the glue fills the table as int64 rows of 4");

// What both kernels read.
struct RouteInputs {
  const RouteSource* sources;  // n entries, in device memory
  const void* q;               // q_dtype, row (b, t) at b * q_sb + t * q_st
  const float* gain;           // [d]
  int64_t q_extent, q_sb, q_st;
  QKind q_kind;
  DType dtype, q_dtype;
  int64_t B, T, d, n;
  float eps;
};

struct RouteFwdParams {
  RouteInputs in;
  void* h;     // [B, T, d] contiguous, dtype
  float* lse;  // [B, T]
  void* stream;
};

// Tokens are split per batch row into n_chunks chunks of tokens_per_chunk; each backward block owns
// one chunk and leaves one float32 [d] partial sum of it, reduced afterwards in a fixed order.
struct RouteChunks {
  int64_t n_chunks, tokens_per_chunk;
};
RouteChunks route_bwd_chunks(int64_t B, int64_t T, int64_t d, int sm_count);
// The multiprocessor count of the current device (the harness models one).
int route_sm_count();

struct RouteBwdParams {
  RouteInputs in;
  const void* dh;                // [B, T, d] contiguous, dtype
  const void* h;                 // [B, T, d] contiguous, dtype
  const float* lse;              // [B, T]
  const RouteSource* dsources;   // n entries, in device memory; written
  void* dq;                      // q's shape, contiguous, q_dtype
  float* partial;                // [B, n_chunks, d] scratch
  float* dgain;                  // [d]
  RouteChunks chunks;
  void* stream;
};

// Each returns nullptr, or the description of a launch error.
const char* route_fwd(const RouteFwdParams& p);
const char* route_bwd(const RouteBwdParams& p);

}  // namespace diffkern::dar::cuda
