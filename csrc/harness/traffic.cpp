#include "traffic.h"

#include <unordered_map>
#include <vector>

namespace diffkern::harness {
namespace {

struct State {
  bool on = false;
  Traffic total;
  std::unordered_map<const void*, std::vector<bool>> touched;  // per buffer base, one flag per byte
};

State& state() {
  static State s;
  return s;
}

}  // namespace

void traffic_start() { state() = State{true, {}, {}}; }

Traffic traffic_stop() {
  State& s = state();
  s.on = false;
  s.touched.clear();
  return s.total;
}

bool counting_traffic() { return state().on; }

void touch(const void* base, int64_t at, int64_t bytes) {
  std::vector<bool>& flags = state().touched[base];
  if (int64_t(flags.size()) < at + bytes) flags.resize(at + bytes, false);
  for (int64_t b = at; b < at + bytes; ++b) flags[b] = true;
}

void end_launch() {
  State& s = state();
  if (!s.on) return;
  for (const auto& [base, flags] : s.touched)
    for (bool f : flags) s.total.bytes += f;
  s.total.launches += 1;
  s.touched.clear();
}

}  // namespace diffkern::harness
