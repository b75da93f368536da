#include "warp.h"

#include <cstdio>
#include <string>

#include "block.h"
#include "report.h"

namespace diffkern::harness {
namespace {

const char* op_name(int op) {
  static const char* names[] = {"", "__syncwarp", "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                "__shfl_xor_sync", "__ballot_sync", "__all_sync", "__any_sync"};
  return names[op];
}

std::string hex(unsigned m) {
  char s[16];
  snprintf(s, sizeof s, "0x%08x", m);
  return s;
}

// The lane whose value `t` receives, following PTX shfl.sync: a source past the end of the caller's
// width-segment (or before its start, for up) yields the caller's own value.
int source_lane(const Thread& t) {
  const int seg = t.lane & ~(t.width - 1), last = seg + t.width - 1;
  int src = t.lane;
  switch (t.op) {
    case kShfl: src = seg + (t.arg & (t.width - 1)); break;
    case kShflUp: src = t.lane - t.arg; break;
    case kShflDown: src = t.lane + t.arg; break;
    case kShflXor: src = t.lane ^ t.arg; break;
  }
  if (t.op == kShflUp ? src < seg : src > last) src = t.lane;
  return src;
}

// Every lane of the mask has arrived: compute all results, then let the others go.
void complete(Block& b, Thread& me) {
  Thread* lanes[32] = {};
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l)
    if (me.mask >> l & 1u) {
      lanes[l] = &b.threads[size_t(me.warp * 32 + l)];
      if (lanes[l]->value) ballot |= 1u << l;
    }
  for (int l = 0; l < 32; ++l) {
    Thread* t = lanes[l];
    if (!t) continue;
    switch (t->op) {
      case kSyncwarp: t->result = 0; break;
      case kBallot: t->result = ballot; break;
      case kAll: t->result = ballot == t->mask; break;
      case kAny: t->result = ballot != 0; break;
      default: {
        int src = source_lane(*t);
        if (!(t->mask >> src & 1u)) {
          b.current = t;
          fail("warp", std::string(op_name(t->op)) + " reads lane " + std::to_string(src) +
                           ", which is not in the mask " + hex(t->mask) + " (its value is undefined)");
        }
        t->result = lanes[src]->value;
      }
    }
  }
  if (me.op == kSyncwarp) b.syncwarp_masks[size_t(me.warp)].push_back(me.mask);
  for (Thread* t : lanes)
    if (t && t != &me) wake(*t);
}

}  // namespace

uint64_t warp_collective(Op op, unsigned mask, uint64_t value, int arg, int width) {
  Block& b = block();
  Thread& me = self();
  const std::string call = std::string(op_name(op)) + " with mask " + hex(mask);
  if (!(mask >> me.lane & 1u)) fail("warp", call + " called by lane " + std::to_string(me.lane) + ", not in the mask");
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail("warp", call + ": width " + std::to_string(width) + " is not a power of two in [1, 32]");
  me.op = op, me.mask = mask, me.value = value, me.arg = arg, me.width = width;
  me.wait = Wait::warp;
  bool all_here = true;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const size_t tid = size_t(me.warp * 32 + l);
    if (tid >= b.threads.size()) fail("warp", call + " names lane " + std::to_string(l) + ", which does not exist");
    const Thread& o = b.threads[tid];
    if (o.wait == Wait::done) fail("warp", call + ": lane " + std::to_string(l) + " has exited");
    if (o.wait == Wait::barrier) fail("warp", call + ": lane " + std::to_string(l) + " waits in __syncthreads()");
    if (o.wait == Wait::warp && (o.op != op || o.mask != mask))
      fail("warp", call + ": lane " + std::to_string(l) + " waits in " + op_name(o.op) + " with mask " + hex(o.mask));
    all_here = all_here && o.wait == Wait::warp;
  }
  if (all_here) {
    complete(b, me);
    me.wait = Wait::none;
  }
  // Switch even when this lane completed the collective, so lanes resume in a random order.
  yield();
  return me.result;
}

}  // namespace diffkern::harness
