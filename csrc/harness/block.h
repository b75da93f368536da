// One thread block executed as fibers: the scheduler, the block barrier and the per-thread state.
//
// Why fibers (ucontext, one stack per CUDA thread, all on one OS thread) rather than OS threads:
// * every CUDA thread keeps its own stack and program counter, so a __syncthreads() in the middle of
//   a loop really suspends it and the block's threads genuinely interleave;
// * the interleaving is chosen by a seeded generator, so a failing schedule reproduces exactly;
// * the harness's own bookkeeping (race shadow, warp slots) needs no locks and cannot itself race;
// * a switch is cheap: measured ~450 ns per fiber switch (glibc swapcontext, which also saves the
//   signal mask) against ~3.1 us per condition-variable handoff between two OS threads on the
//   2-core CI machine, and a 1024-thread block needs 1024 small stacks, not 1024 kernel threads.
// Threads switch at every barrier and warp collective, and at shared-memory accesses and atomics
// with probability Options::yield_prob, so orderings that a missing barrier depends on do occur.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <vector>

#include "cuda_types.h"

namespace diffkern::harness {

struct Options {
  uint64_t seed = 1;           // drives the block order and every thread switch
  bool shuffle_blocks = true;  // run blocks in a seeded random order, not grid order
  double yield_prob = 0.5;     // chance of a switch at each shared-memory access or atomic
  bool detect_races = true;    // the shared-memory hazard detector (shared.h)
};
Options& options();
// A seed for the next launch's block order and schedules: the seed mixed with a launch count, so
// launches differ from one another and a run reproduces.
uint64_t next_launch_stream();

enum class Wait { none, barrier, warp, done };

struct Thread {
  ucontext_t ctx;
  uint3 idx;
  int tid;   // linear index in the block (x fastest), as CUDA numbers lanes and warps
  int lane;  // tid % 32
  int warp;  // tid / 32
  Wait wait = Wait::none;
  // The warp collective this thread is waiting in (warp.cpp fills these in).
  int op = 0;
  unsigned mask = 0;
  uint64_t value = 0;
  int arg = 0;
  int width = 0;
  uint64_t result = 0;
};

struct SharedRegion;  // shared.h

struct Block {
  const char* kernel = "";
  uint3 block_idx{}, grid_dim{}, block_dim{};
  std::vector<Thread> threads;
  std::vector<int> runnable;  // indices of threads with Wait::none
  Thread* current = nullptr;
  int at_barrier = 0, finished = 0;
  uint32_t epoch = 1;  // barrier generation: shared accesses in different epochs never race
  std::vector<std::vector<unsigned>> syncwarp_masks;  // per warp: the mask of each __syncwarp so far
  std::vector<std::unique_ptr<SharedRegion>> regions;
  size_t dynamic_smem_bytes = 0;
  std::mt19937_64 rng;
  std::function<void()> body;
  ucontext_t scheduler;
};

// The block being run and its running thread; valid only inside a kernel.
Block& block();
Thread& self();
bool in_kernel();

// Runs every thread of one block to completion (or reports a deadlock / divergent barrier).
void run_block(Block& b);

// Gives the processor to another runnable thread of the block; returns when rescheduled.
void yield();
// A shared-memory access or atomic switches with probability Options::yield_prob.
void maybe_yield();
// Marks a blocked thread runnable again.
void wake(Thread& t);

void syncthreads();

}  // namespace diffkern::harness

#define threadIdx (::diffkern::harness::self().idx)
#define blockIdx (::diffkern::harness::block().block_idx)
#define blockDim (::diffkern::harness::block().block_dim)
#define gridDim (::diffkern::harness::block().grid_dim)

inline void __syncthreads() { ::diffkern::harness::syncthreads(); }
