// kernel<<<grid, block, smem>>>(args...) for the host pass: every block of the grid, one at a time,
// in a seeded random order (CUDA promises no order, so a kernel must not depend on one).
#pragma once

#include <algorithm>
#include <cstddef>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "block.h"
#include "report.h"
#include "traffic.h"

namespace diffkern::harness {

// The largest dynamic shared memory a block may opt into (sm_90: 227 KiB).
constexpr size_t kDynamicSmemLimit = 227 << 10;

template <typename... P, typename... A>
void launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block_dim, size_t smem_bytes, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "wrong number of kernel arguments");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    fail("launch", std::string("kernel ") + name + ": invalid grid");
  if (smem_bytes > kDynamicSmemLimit) fail("launch", std::string("kernel ") + name + ": too much dynamic shared memory");
  // Converted once, as the launch copies arguments once; each thread then gets its own copy.
  std::tuple<P...> params(std::forward<A>(args)...);
  const uint64_t stream = next_launch_stream();

  const size_t blocks = size_t(grid.x) * grid.y * grid.z;
  std::vector<size_t> order(blocks);
  std::iota(order.begin(), order.end(), size_t{0});
  if (options().shuffle_blocks) std::shuffle(order.begin(), order.end(), std::mt19937_64(stream));

  Block b;
  b.kernel = name;
  b.grid_dim = grid;
  b.block_dim = block_dim;
  b.dynamic_smem_bytes = smem_bytes;
  b.body = [&] { std::apply(kernel, params); };
  for (size_t linear : order) {
    b.block_idx = {unsigned(linear % grid.x), unsigned(linear / grid.x % grid.y), unsigned(linear / (size_t(grid.x) * grid.y))};
    b.regions.clear();
    b.epoch = 1;
    b.at_barrier = b.finished = 0;
    b.rng.seed(stream ^ (linear * 0xbf58476d1ce4e5b9ull));
    run_block(b);
  }
  end_launch();
}

}  // namespace diffkern::harness
