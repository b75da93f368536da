// The harness's traffic count (csrc/harness/traffic.h) as test-only ops:
// diffkern_harness::traffic_start() and traffic_stop() -> [distinct bytes touched, launches].
#include <torch/library.h>

#include "../../csrc/harness/traffic.h"

namespace {

void start() { diffkern::harness::traffic_start(); }

std::vector<int64_t> stop() {
  const diffkern::harness::Traffic t = diffkern::harness::traffic_stop();
  return {t.bytes, t.launches};
}

}  // namespace

TORCH_LIBRARY(diffkern_harness, m) {
  m.def("traffic_start() -> ()", &start);
  m.def("traffic_stop() -> int[]", &stop);
}
