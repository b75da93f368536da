// Modeled global-memory traffic of harness launches: the distinct bytes of global memory each launch
// touches, summed over launches. Each byte is counted once per launch however many threads read it
// (a broadcast per-sample scalar is one 4-byte transaction on a GPU, not one per thread), and a byte
// both read and written in one launch counts once (none of diffkern's kernels does both). Off unless
// started: counting costs a bitmap update per access.
#pragma once

#include <cstdint>

namespace diffkern::harness {

struct Traffic {
  int64_t bytes = 0, launches = 0;
};

// Starts counting from zero; returns what was counted since the last start and stops counting.
void traffic_start();
Traffic traffic_stop();
bool counting_traffic();
// Records `bytes` bytes at byte offset `at` of the buffer at `base` for the running launch.
void touch(const void* base, int64_t at, int64_t bytes);
// Called by launch() after its last block: adds the launch's distinct bytes to the count.
void end_launch();

}  // namespace diffkern::harness
