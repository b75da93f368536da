// Torch side of the CUDA routing kernels, shared by the CUDA build (dar_route_api.cpp, CUDA tensors)
// and the CPU harness build of the tests (CPU tensors): checks, allocation, the device tables of
// sources, and the launch through dar_route.h. Device-agnostic: the caller supplies the stream.
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "dar_route.h"
#include "diffkern/check.h"
#include "diffkern/dar_args.h"
#include "diffkern/table_cache.h"

namespace diffkern::dar::cuda {

inline DType kernel_dtype(at::ScalarType t) {
  return t == at::kHalf ? DType::kFloat16 : t == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat32;
}

// Elements reachable from t's data pointer: what a kernel may touch through it.
inline int64_t reach(const at::Tensor& t) {
  if (t.numel() == 0) return 0;
  int64_t r = 1;
  for (int64_t k = 0; k < t.dim(); ++k) r += (t.size(k) - 1) * t.stride(k);
  return r;
}

// A device table's cache key (device, stream, its rows) and value (the pinned host source beside it).
struct TableKey {
  int64_t device;
  const void* stream;
  std::vector<int64_t> rows;
  bool operator==(const TableKey&) const = default;
};

struct TableKeyHash {
  size_t operator()(const TableKey& k) const {
    size_t h = std::hash<int64_t>{}(k.device) ^ (std::hash<const void*>{}(k.stream) << 1);
    for (const int64_t r : k.rows) h = h * 1000003u ^ std::hash<int64_t>{}(r);
    return h;
  }
};

struct DeviceTable {
  at::Tensor host, device;
};

// Entries the LRU keeps outside capture (python/diffkern/_tables.py keeps as many): a table is at most
// n * 32 bytes, so with a few hundred sources the LRU holds at most 256 x 2 x ~10 KB.
constexpr size_t kTableCacheCapacity = 256;

// Never destroyed: freeing its CUDA and pinned tensors in static destructors would run after torch's
// allocators are gone.
inline TableCache<TableKey, DeviceTable, TableKeyHash>& table_cache() {
  static auto* cache = new TableCache<TableKey, DeviceTable, TableKeyHash>(kTableCacheCapacity);
  return *cache;
}

// The (pointer, extent, batch stride, token stride) table of `xs`, on their device.
//
// For CUDA tensors it comes from table_cache() (diffkern/table_cache.h): a hit costs a hash of the rows
// and no copy; a miss fills a pinned host table and copies it asynchronously on `stream`, keeping both.
// So a table captured in a CUDA graph (`capturing`) lives, with its pinned source, as long as the process,
// and replays read what the capture wrote. A table in the kernel parameters instead would drop the copy,
// but the backward takes two tables (sources and dsources) and the 4 KB parameter limit of sm_80 would
// cap n near 60 with no fallback. CPU tensors (the host harness) get a plain host table.
inline at::Tensor source_table(at::TensorList xs, void* stream, bool capturing) {
  const at::Device device = xs[0].device();
  std::vector<int64_t> rows(xs.size() * 4);
  auto* sources = reinterpret_cast<RouteSource*>(rows.data());
  for (size_t i = 0; i < xs.size(); ++i) {
    sources[i] = {xs[i].const_data_ptr(), reach(xs[i]), xs[i].stride(0), xs[i].stride(1)};
  }
  const auto host_table = [&](const std::vector<int64_t>& content, bool pinned) {
    at::Tensor table = at::empty({static_cast<int64_t>(xs.size()), 4},
                                 at::TensorOptions().dtype(at::kLong).pinned_memory(pinned));
    std::memcpy(table.mutable_data_ptr<int64_t>(), content.data(), content.size() * sizeof(int64_t));
    return table;
  };
  if (device.is_cpu()) return host_table(rows, false);
  const TableKey key{device.index(), stream, std::move(rows)};
  return table_cache().get(key, capturing, [&] {
    at::Tensor host = host_table(key.rows, true);
    return DeviceTable{host, host.to(device, /*non_blocking=*/true)};
  }).device;
}

inline void check_kernel_limits(const Geometry& g, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(dtype != at::kDouble, kOp, ": the cuda backend computes in float32 and takes float16, bfloat16 or ",
                    "float32 sources, got float64; use the cpu or reference backend");
  TORCH_CHECK_VALUE(g.d <= kMaxD, kOp, ": the cuda backend takes d <= ", kMaxD, " (one row per block), got d=", g.d);
  TORCH_CHECK_VALUE(g.B * g.T <= std::numeric_limits<int32_t>::max(), kOp, ": the cuda backend takes B*T < 2^31, got ",
                    g.B * g.T);
}

// Kernel inputs; `table` and `gain_f32` must outlive the launch. gain_f32 is gain itself for a float32
// gain (.to and .contiguous return their input: no copy); a float16/bfloat16 gain costs one cast of d
// elements per call (and the backward one more, of dgain), kept rather than doubling the kernels'
// instantiations with a gain dtype.
inline RouteInputs route_inputs(const Geometry& g, const at::Tensor& table, const at::Tensor& q,
                                const at::Tensor& gain_f32, at::ScalarType dtype, double eps) {
  return {static_cast<const RouteSource*>(table.const_data_ptr()), q.const_data_ptr(), gain_f32.const_data_ptr<float>(),
          reach(q), g.q_sb, g.q_st, g.q_kind, kernel_dtype(dtype), kernel_dtype(q.scalar_type()),
          g.B, g.T, g.d, g.n, static_cast<float>(eps)};
}

inline void check_launch(const char* err) { TORCH_CHECK(err == nullptr, kOp, ": kernel launch failed: ", err); }

// `capturing`: whether `stream` is capturing a CUDA graph (source_table); the host harness passes none.
inline std::tuple<at::Tensor, at::Tensor> route_fwd_on(at::TensorList sources, const at::Tensor& q,
                                                       const at::Tensor& gain, double eps, void* stream,
                                                       bool capturing = false) {
  const Geometry g = check_route_args(sources, q, gain, eps);
  const at::ScalarType dtype = sources[0].scalar_type();
  check_kernel_limits(g, dtype);
  at::Tensor h = empty_output({g.B, g.T, g.d}, sources[0].options());
  at::Tensor lse = empty_output({g.B, g.T}, sources[0].options().dtype(at::kFloat));
  const at::Tensor table = source_table(sources, stream, capturing), gain_f32 = gain.to(at::kFloat).contiguous();
  check_launch(route_fwd({route_inputs(g, table, q, gain_f32, dtype, eps), h.mutable_data_ptr(),
                          lse.mutable_data_ptr<float>(), stream}));
  return {h, lse};
}

inline std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> route_bwd_on(
    const at::Tensor& dh, at::TensorList sources, const at::Tensor& q, const at::Tensor& gain, const at::Tensor& h,
    const at::Tensor& lse, double eps, void* stream, bool capturing = false) {
  const Geometry g = check_route_bwd_args(dh, sources, q, gain, h, lse, eps);
  const at::ScalarType dtype = sources[0].scalar_type();
  check_kernel_limits(g, dtype);
  std::vector<at::Tensor> dsources;
  for (int64_t i = 0; i < g.n; ++i) dsources.push_back(empty_output({g.B, g.T, g.d}, sources[0].options()));
  const RouteChunks chunks = route_bwd_chunks(g.B, g.T, g.d, route_sm_count());
  at::Tensor dq = empty_output(q.sizes(), q.options());
  at::Tensor dgain = empty_output({g.d}, gain.options().dtype(at::kFloat));
  at::Tensor partial = empty_output({g.B, chunks.n_chunks, g.d}, dgain.options());
  const at::Tensor table = source_table(sources, stream, capturing);
  const at::Tensor dtable = source_table(dsources, stream, capturing);
  const at::Tensor gain_f32 = gain.to(at::kFloat).contiguous();
  check_launch(route_bwd({route_inputs(g, table, q, gain_f32, dtype, eps), dh.const_data_ptr(), h.const_data_ptr(),
                          lse.const_data_ptr<float>(), static_cast<const RouteSource*>(dtable.const_data_ptr()),
                          dq.mutable_data_ptr(), partial.mutable_data_ptr<float>(), dgain.mutable_data_ptr<float>(),
                          chunks, stream}));
  return {std::move(dsources), dq, dgain.to(gain.scalar_type())};
}

}  // namespace diffkern::dar::cuda
