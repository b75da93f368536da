// The CPU output cache (diffkern/cpu_cache.h) and its two ops: cpu_cache_bytes() and cpu_cache_clear().
#include "diffkern/cpu_cache.h"

#include <cmath>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <utility>
#include <vector>

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "diffkern/check.h"

namespace diffkern::cache {
namespace {

constexpr int64_t kDefaultLimit = int64_t(2) << 30;

// DIFFKERN_CPU_CACHE_BYTES, or the default when unset.
int64_t limit_from_env() {
  const char* v = std::getenv("DIFFKERN_CPU_CACHE_BYTES");
  if (v == nullptr || *v == '\0') return kDefaultLimit;
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && n >= 0, "DIFFKERN_CPU_CACHE_BYTES must be a byte count >= 0 (0 turns the CPU ",
                    "output cache off), got '", v, "'");
  return n;
}

struct Block {
  c10::DataPtr mem;
  int64_t bytes;
};

class Cache {
 public:
  // A released block of exactly `bytes`, the latest released first, else a new one.
  Block take(int64_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
        if (it->bytes != bytes) continue;
        Block b = std::move(*it);
        free_.erase(std::next(it).base());
        held_ -= bytes;
        return b;
      }
    }
    return {c10::GetCPUAllocator()->allocate(bytes), bytes};
  }

  // Holds a released block, freeing the oldest held ones past the bounds.
  void give(Block b) {
    std::vector<Block> dropped;  // freed once the lock is released
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (b.bytes > limit_) {
        dropped.push_back(std::move(b));
      } else {
        held_ += b.bytes;
        free_.push_back(std::move(b));
      }
      while (held_ > limit_ || static_cast<int64_t>(free_.size()) > kMaxBlocks) {
        held_ -= free_.front().bytes;
        dropped.push_back(std::move(free_.front()));
        free_.pop_front();
      }
    }
  }

  void clear() {
    std::deque<Block> dropped;
    std::lock_guard<std::mutex> lock(mutex_);
    dropped.swap(free_);
    held_ = 0;
  }

  int64_t held() {
    std::lock_guard<std::mutex> lock(mutex_);
    return held_;
  }

  bool on() const { return limit_ > 0; }

 private:
  const int64_t limit_ = limit_from_env();
  std::mutex mutex_;
  std::deque<Block> free_;  // released blocks, oldest first
  int64_t held_ = 0;
};

// Never destroyed: a tensor freed during the process's exit still finds it.
Cache& cache() {
  static Cache* const c = new Cache();
  return *c;
}

// The deleter of a handed-out block: it goes back to the cache.
void give_back(void* ctx) {
  Block* b = static_cast<Block*>(ctx);
  cache().give(std::move(*b));
  delete b;
}

// The allocator of the cache's tensors (a resize allocates through it too): blocks of at least kMinBytes from
// the cache, smaller ones (and every one with the cache off) from the CPU allocator.
class CacheAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const int64_t bytes = static_cast<int64_t>(n);
    if (bytes < kMinBytes || !cache().on()) return c10::GetCPUAllocator()->allocate(n);
    Block* b = new Block(cache().take(bytes));
    return {b->mem.get(), b, &give_back, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  static CacheAllocator* const allocator = new CacheAllocator();  // never destroyed, as the cache
  at::Tensor t = at::detail::empty_generic(sizes, allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                           c10::typeMetaToScalarType(options.dtype()), std::nullopt);
  if (debug_fill_nan()) t.fill_(NAN);
  return t;
}

int64_t held_bytes() { return cache().held(); }

void clear() { cache().clear(); }

}  // namespace diffkern::cache

TORCH_LIBRARY_IMPL(diffkern, CompositeExplicitAutograd, m) {
  m.impl("cpu_cache_bytes", TORCH_FN(diffkern::cache::held_bytes));
  m.impl("cpu_cache_clear", TORCH_FN(diffkern::cache::clear));
}
