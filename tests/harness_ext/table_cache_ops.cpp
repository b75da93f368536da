// The device-table cache's rules (csrc/include/diffkern/table_cache.h) as a test-only op:
// diffkern_harness::table_cache_trace(capacity, keys, capturing) runs one get per key on a fresh cache,
// whose values number the misses, and returns the value each get gave (tests/test_tables.py).
#include <functional>

#include <torch/library.h>

#include "diffkern/table_cache.h"

namespace {

std::vector<int64_t> trace(int64_t capacity, std::vector<int64_t> keys, std::vector<int64_t> capturing) {
  TORCH_CHECK_VALUE(keys.size() == capturing.size(), "table_cache_trace: keys and capturing differ in length");
  diffkern::TableCache<int64_t, int64_t, std::hash<int64_t>> cache(static_cast<size_t>(capacity));
  int64_t made = 0;
  std::vector<int64_t> got;
  for (size_t i = 0; i < keys.size(); ++i) {
    got.push_back(cache.get(keys[i], capturing[i] != 0, [&] { return made++; }));
  }
  return got;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(diffkern_harness, m) {
  m.def("table_cache_trace(int capacity, int[] keys, int[] capturing) -> int[]", &trace);
}
