#include "shared.h"

#include <string>

#include "report.h"

namespace diffkern::harness {
namespace {

// CUDA's limit on statically declared shared memory per block.
constexpr size_t kStaticLimit = 48 << 10;

SharedRegion& new_region(const void* site, size_t bytes, const char* name) {
  Block& b = block();
  auto r = std::make_unique<SharedRegion>();
  r->name = name;
  r->site = site;
  r->bytes.assign(bytes, 0xff);
  r->shadow.assign(bytes, Shadow{});
  b.regions.push_back(std::move(r));
  return *b.regions.back();
}

// True when a __syncwarp that both threads took part in lies after history entry `since`: it orders
// their shared-memory accesses as a barrier does, within the warp.
bool warp_synced(const Block& b, int a, int c, uint32_t since) {
  if (a < 0 || a / 32 != c / 32) return false;
  const auto& hist = b.syncwarp_masks[size_t(c / 32)];
  const unsigned both = (1u << (a % 32)) | (1u << (c % 32));
  for (size_t i = since; i < hist.size(); ++i)
    if ((hist[i] & both) == both) return true;
  return false;
}

[[noreturn]] void hazard(const SharedRegion& r, size_t byte, const char* what, int other) {
  fail("shared-memory race", std::string(what) + " of " + r.name + " byte " + std::to_string(byte) + " by thread " +
                                 std::to_string(self().tid) + " races with thread " + std::to_string(other) +
                                 " with no __syncthreads() between (thread numbers are linear)");
}

}  // namespace

void on_access(SharedRegion& r, size_t offset, size_t n, Access kind) {
  maybe_yield();
  if (!options().detect_races) return;
  Block& b = block();
  const int me = self().tid;
  const uint32_t sync_now = uint32_t(b.syncwarp_masks[size_t(me / 32)].size());
  for (size_t i = offset; i < offset + n; ++i) {
    Shadow& s = r.shadow[i];
    const bool written_now = s.write_epoch == b.epoch && s.writer != me &&
                             !warp_synced(b, s.writer, me, s.write_sync);
    if (kind == Access::read) {
      if (s.writer < 0) fail("uninitialised shared memory", std::string("read of ") + r.name + " byte " +
                                                                std::to_string(i) + ", which no thread has written");
      if (written_now) hazard(r, i, "read", s.writer);
      if (s.read_epoch != b.epoch) {
        s.reader = me, s.reader2 = -1, s.read_epoch = b.epoch, s.read_sync = sync_now;
      } else if (s.reader != me) {
        s.reader2 = me, s.read_sync2 = sync_now;
      }
      continue;
    }
    if (written_now && !(kind == Access::atomic && s.atomic)) hazard(r, i, "write", s.writer);
    // Two readers are remembered, so a write is checked against one reader other than the writer;
    // with three or more readers in an epoch a __syncwarp ordering that one is taken for all.
    const bool first = s.reader != me;
    const int other = first ? s.reader : s.reader2;
    if (s.read_epoch == b.epoch && other >= 0 && !warp_synced(b, other, me, first ? s.read_sync : s.read_sync2))
      hazard(r, i, "write after read", other);
    s.writer = me, s.write_epoch = b.epoch, s.write_sync = sync_now, s.atomic = kind == Access::atomic;
  }
}

SharedRegion& static_region(const void* site, size_t bytes, const char* name) {
  Block& b = block();
  size_t total = 0;
  for (auto& r : b.regions) {
    if (r->site == site) return *r;
    if (r->site) total += r->bytes.size();
  }
  if (total + bytes > kStaticLimit)
    fail("launch", "static shared memory of " + std::to_string(total + bytes) + " bytes exceeds 48 KiB");
  return new_region(site, bytes, name);
}

SharedRegion& dynamic_region(const char* name) {
  Block& b = block();
  for (auto& r : b.regions)
    if (!r->site) return *r;
  return new_region(nullptr, b.dynamic_smem_bytes, name);
}

void shared_out_of_bounds(const SharedRegion& r, int64_t byte, size_t n) {
  fail("shared out of bounds", std::string("access of ") + std::to_string(n) + " bytes at byte " +
                                   std::to_string(byte) + " of " + r.name + " (" + std::to_string(r.bytes.size()) +
                                   " bytes)");
}

}  // namespace diffkern::harness
