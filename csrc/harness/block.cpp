#include "block.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <string>

#include "report.h"
#include "shared.h"

namespace diffkern::harness {
namespace {

// 64 KiB covers the small device functions kernels call; the guard page below each stack turns an
// overflow into a segfault rather than a silent overwrite of the neighbouring thread's stack.
constexpr size_t kStackBytes = 64 << 10;

struct Stack {
  char* base = nullptr;  // guard page, then kStackBytes of stack
  Stack() {
    size_t page = sysconf(_SC_PAGESIZE);
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) fail("harness", "cannot map a fiber stack");
    mprotect(p, page, PROT_NONE);
    base = static_cast<char*>(p) + page;
  }
};

// Stacks outlive blocks and launches: mapping 1024 stacks per block would dominate the run time.
std::vector<Stack>& stacks(size_t n) {
  static std::vector<Stack> pool;
  while (pool.size() < n) pool.emplace_back();
  return pool;
}

Block* g_block = nullptr;

void fiber_main() {
  Block& b = *g_block;
  b.body();
  Thread& t = *b.current;
  if (b.at_barrier > 0)
    fail("divergent barrier", "thread exited while " + std::to_string(b.at_barrier) +
                                  " other threads of its block wait in __syncthreads()");
  t.wait = Wait::done;
  ++b.finished;
  swapcontext(&t.ctx, &b.scheduler);
}

// Names the first stuck thread (the report prints its index) and why it is stuck.
std::string describe_stuck(Block& b) {
  for (Thread& t : b.threads)
    if (t.wait == Wait::warp) {
      b.current = &t;
      char s[120];
      snprintf(s, sizeof s, "waits in a warp collective with mask 0x%08x that some lanes of the mask never reach",
               t.mask);
      return s;
    }
  for (Thread& t : b.threads)
    if (t.wait == Wait::barrier) b.current = &t;
  return "waits in __syncthreads() while other threads wait in warp collectives";
}

}  // namespace

Options& options() {
  static Options o;
  return o;
}

uint64_t next_launch_stream() {
  static uint64_t launches = 0;
  return options().seed * 0x9e3779b97f4a7c15ull + launches++;
}

Block& block() { return *g_block; }
Thread& self() { return *g_block->current; }
bool in_kernel() { return g_block != nullptr && g_block->current != nullptr; }

void run_block(Block& b) {
  const int n = int(b.block_dim.x * b.block_dim.y * b.block_dim.z);
  if (n < 1 || n > 1024) fail("launch", "block of " + std::to_string(n) + " threads (CUDA allows 1..1024)");
  auto& pool = stacks(size_t(n));
  b.threads.assign(size_t(n), Thread{});
  b.runnable.clear();
  b.syncwarp_masks.assign(size_t((n + 31) / 32), {});
  g_block = &b;
  for (int i = 0; i < n; ++i) {
    Thread& t = b.threads[size_t(i)];
    t.tid = i;
    t.lane = i % 32;
    t.warp = i / 32;
    t.idx = {unsigned(i) % b.block_dim.x, unsigned(i) / b.block_dim.x % b.block_dim.y,
             unsigned(i) / (b.block_dim.x * b.block_dim.y)};
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = pool[size_t(i)].base;
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, fiber_main, 0);
    b.runnable.push_back(i);
  }
  while (b.finished < n) {
    if (b.runnable.empty()) fail("deadlock", describe_stuck(b));
    size_t k = b.rng() % b.runnable.size();
    b.current = &b.threads[size_t(b.runnable[k])];
    swapcontext(&b.scheduler, &b.current->ctx);
    if (b.current->wait != Wait::none) {
      // Blocked or finished. Wakes only append, so the thread is still at position k.
      b.runnable[k] = b.runnable.back();
      b.runnable.pop_back();
    }
  }
  b.current = nullptr;
  g_block = nullptr;
}

void yield() {
  Thread& t = self();
  swapcontext(&t.ctx, &g_block->scheduler);
}

void maybe_yield() {
  Block& b = block();
  if (std::uniform_real_distribution<double>(0.0, 1.0)(b.rng) < options().yield_prob) yield();
}

void wake(Thread& t) {
  t.wait = Wait::none;
  g_block->runnable.push_back(t.tid);
}

void syncthreads() {
  Block& b = block();
  Thread& t = self();
  if (b.finished > 0)
    fail("divergent barrier", "__syncthreads() reached after " + std::to_string(b.finished) +
                                  " threads of the block exited");
  if (++b.at_barrier < int(b.threads.size())) {
    t.wait = Wait::barrier;
    yield();
    return;
  }
  // The last arrival opens the barrier: every access before it happens-before every access after.
  b.at_barrier = 0;
  ++b.epoch;
  for (Thread& o : b.threads)
    if (o.wait == Wait::barrier) wake(o);
  yield();
}

}  // namespace diffkern::harness
