#include "report.h"

#include <cstdio>
#include <cstdlib>

#include "block.h"

namespace diffkern::harness {

void fail(const char* kind, const std::string& what) {
  std::string where;
  if (in_kernel()) {
    const Block& b = block();
    const Thread& t = self();
    char s[200];
    snprintf(s, sizeof s, "kernel %s block (%u,%u,%u) thread (%u,%u,%u): ", b.kernel, b.block_idx.x,
             b.block_idx.y, b.block_idx.z, t.idx.x, t.idx.y, t.idx.z);
    where = s;
  }
  std::fprintf(stderr, "diffkern harness: %s: %s%s (seed %llu)\n", kind, where.c_str(), what.c_str(),
               static_cast<unsigned long long>(options().seed));
  std::fflush(stderr);
  std::_Exit(3);
}

}  // namespace diffkern::harness
