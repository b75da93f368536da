// The one header a torch-free .cu kernel includes. Under nvcc it is real CUDA; under the host C++
// compiler it maps the same names onto the CPU execution harness (csrc/harness/), so the very
// source that ships runs in the CPU tests with real barriers, warps and bounds checks.
//
// What a kernel writes differently from plain CUDA, and why:
//   diffkern::gptr<T>             global pointer parameter: T* under nvcc, a bounds-checked DevPtr
//   diffkern::sptr<T>             pointer into shared memory (for device-function parameters)
//   DIFFKERN_SHARED(T, name, N)   `__shared__ T name[N]`: the host needs to see every access
//   DIFFKERN_EXTERN_SHARED(T, name)   dynamic shared memory sized by the launch
//   diffkern::load_vec<N>(p, i) / store_vec   16-byte (or narrower) vector accesses of N elements
//   diffkern::global_ptr(p, extent, name)    a raw device pointer (e.g. read from a table) as a gptr
//   diffkern::launch_kernel(name, kernel, grid, block, smem, stream, args...)   kernel<<<...>>>(args...)
//   diffkern::sm_count()          the device's SM count (1 in the harness)
// Everything else (indices, __syncthreads, shuffles, votes, atomics, bf16/fp16, math) keeps its
// CUDA name.
#pragma once

#include <math.h>
#include <stdint.h>

#include <type_traits>
#include <utility>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace diffkern {
template <typename T>
using gptr = T*;
template <typename T>
using sptr = T*;
}  // namespace diffkern

#define DIFFKERN_SHARED(T, name, N) __shared__ T name[N]
// One byte array shared by every use: extern __shared__ arrays of different types would clash.
#define DIFFKERN_EXTERN_SHARED(T, name)                             \
  extern __shared__ __align__(16) unsigned char diffkern_smem_[];   \
  T* const name = reinterpret_cast<T*>(diffkern_smem_)
#define DIFFKERN_DEVICE __device__ __forceinline__

#else
#include "../../harness/harness.h"

namespace diffkern {
template <typename T>
using gptr = harness::DevPtr<T>;
template <typename T>
using sptr = harness::SharedPtr<T>;
}  // namespace diffkern

// The static tag's address names the declaration, so all threads of a block share one region.
#define DIFFKERN_SHARED(T, name, N)                  \
  static const char name##_site_ = 0;                \
  const ::diffkern::sptr<T> name = ::diffkern::harness::static_shared<T>(&name##_site_, (N), #name)
#define DIFFKERN_EXTERN_SHARED(T, name) \
  const ::diffkern::sptr<T> name = ::diffkern::harness::dynamic_shared<T>(#name)
#define DIFFKERN_DEVICE inline
#endif

namespace diffkern {

// N elements moved as one access: a 16-byte Vec<bf16, 8> or Vec<float, 4> is one LDG.128/STG.128.
// The alignment is the access's width, so a misaligned index is a fault on the GPU and an error here.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

#ifdef __CUDACC__
template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p, int64_t i) {
  return *reinterpret_cast<const Vec<T, N>*>(p + i);
}
template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, int64_t i, const Vec<T, N>& x) {
  *reinterpret_cast<Vec<T, N>*>(p + i) = x;
}
// Whether p may start an N-element vector access.
template <int N, typename T>
__device__ __forceinline__ bool vec_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Vec<std::remove_const_t<T>, N>) == 0;
}
// The extent (elements reachable from p) and name only matter to the harness's bounds checks.
template <typename T>
__host__ __device__ __forceinline__ T* global_ptr(T* p, int64_t, const char*) {
  return p;
}
// Returns nullptr, or the launch error's description.
template <typename... P, typename... A>
const char* launch_kernel(const char*, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, void* stream,
                          A&&... args) {
  kernel<<<grid, block, smem_bytes, static_cast<cudaStream_t>(stream)>>>(std::forward<A>(args)...);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
#else
template <int N, typename T>
const T* vec_span(harness::DevPtr<T> p, int64_t i) {
  const T* at = p.span(i, N);
  if (reinterpret_cast<uintptr_t>(at) % sizeof(Vec<T, N>) != 0)
    harness::fail("misaligned vector access", "element " + std::to_string(p.offset() + i) + " of " + p.name() +
                                                  " is not aligned to " + std::to_string(sizeof(Vec<T, N>)) + " bytes");
  return at;
}
template <int N, typename T>
Vec<std::remove_const_t<T>, N> load_vec(harness::DevPtr<T> p, int64_t i) {
  Vec<std::remove_const_t<T>, N> x;
  const T* at = vec_span<N>(p, i);
  for (int k = 0; k < N; ++k) x.v[k] = at[k];
  return x;
}
template <int N, typename T>
void store_vec(harness::DevPtr<T> p, int64_t i, const Vec<T, N>& x) {
  T* at = const_cast<T*>(vec_span<N>(p, i));
  for (int k = 0; k < N; ++k) at[k] = x.v[k];
}
template <int N, typename T>
bool vec_aligned(harness::DevPtr<T> p) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(p.base()) + uintptr_t(p.offset()) * sizeof(T);
  return at % sizeof(Vec<std::remove_const_t<T>, N>) == 0;
}
template <typename T>
harness::DevPtr<T> global_ptr(T* p, int64_t extent, const char* name) {
  return harness::DevPtr<T>(p, extent, name);
}
// The stream is ignored: the harness runs each launch to completion.
template <typename... P, typename... A>
const char* launch_kernel(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, void*,
                          A&&... args) {
  harness::launch(name, kernel, grid, block, smem_bytes, std::forward<A>(args)...);
  return nullptr;
}
#endif

// The multiprocessor count of the current device, for sizing persistent grids; the harness models one
// SM, so a grid sized from it is small and its blocks walk several work items each, as on a busy GPU.
inline int sm_count() {
#ifdef __CUDACC__
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return 1;
  return count;
#else
  return 1;
#endif
}

// Storage dtype <-> float, rounding to nearest even.
DIFFKERN_DEVICE float to_float(float x) { return x; }
DIFFKERN_DEVICE float to_float(__half x) { return __half2float(x); }
DIFFKERN_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
DIFFKERN_DEVICE T from_float(float x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16(x);
  } else {
    return x;
  }
}

}  // namespace diffkern
