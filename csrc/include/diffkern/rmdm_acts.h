// The activations R-MDM's training forward keeps for its backward (rmdm_recurse_keep / rmdm_recurse_keep_bwd,
// csrc/cpu/rmdm_recurse.cpp and csrc/cpu/rmdm_recurse_keep_bwd.cpp; python/diffkern/rmdm/op.py `acts_numel` is
// the same count).
//
// One flat buffer in the accumulation type. Per block k, field by field, every iteration's rows follow each
// other: field F of block k is [n_iter, M, width(F)] (M = B*T), so the backward forms a weight gradient over all
// n_iter iterations with one GEMM. Fields per row of one block evaluation: the LayerNorms' normalised inputs and
// reciprocal deviations, the GEMM inputs u1, ctx, u2, g = gelu(z), the qkv projection, the attention
// probabilities (heads * T per row: [B, heads, T, T] per iteration), the MLP pre-activation z, and, with adaLN,
// the ungated branch outputs a and y (the gates' gradients need them).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/CPUAllocator.h>

namespace diffkern::rmdm {

enum ActField : int { kXhat1, kRstd1, kU1, kQkv, kProbs, kCtx, kAttnOut, kXhat2, kRstd2, kU2, kZ, kG, kMlpOut,
                      kActFields };

struct ActsLayout {
  int64_t rows = 0, n_iter = 0, width[kActFields] = {}, offset[kActFields] = {}, per_block = 0;

  ActsLayout(int64_t B, int64_t T, int64_t d, int64_t f, int64_t heads, int64_t n_iter_, bool with_mod)
      : rows(B * T), n_iter(n_iter_) {
    const int64_t mod_d = with_mod ? d : 0;
    const int64_t w[kActFields] = {d, 1, d, 3 * d, heads * T, d, mod_d, d, 1, d, f, f, mod_d};
    for (int i = 0; i < kActFields; ++i) {
      width[i] = w[i];
      offset[i] = per_block;
      per_block += n_iter * rows * w[i];
    }
  }

  int64_t numel(int64_t K) const { return K * per_block; }

  // Field `f` of block k: its iteration `it` rows, or (it = 0) the start of all n_iter iterations' rows.
  template <typename T>
  T* at(T* base, int64_t k, ActField f, int64_t it = 0) const {
    return base + k * per_block + offset[f] + it * rows * width[f];
  }
};

// Memory for the training pair's large buffers, reused across calls: a fresh tensor of tens of MB faults in
// every page of its storage on every step (glibc hands large blocks back to the system when they are freed),
// which cost a third of a B=1 Sudoku training step. `reusable` hands out the slot's block while no tensor made
// from it is alive (the last step's activations were released by autograd), else a new block that becomes the
// slot's; a block lives while its slot or a tensor made from it does. The slot keeps the last call's size.
struct ReusedBlock {
  c10::DataPtr mem;
  int64_t bytes = 0;
  std::atomic<bool> in_use{false};
};

inline at::Tensor reusable(std::shared_ptr<ReusedBlock>& slot, int64_t numel, const at::TensorOptions& options) {
  const int64_t bytes = numel * static_cast<int64_t>(options.dtype().itemsize());
  if (!slot || slot->in_use.load() || slot->bytes != bytes) {
    slot.reset();  // the old block goes first (unless a tensor holds it): the new one may take its place
    slot = std::make_shared<ReusedBlock>();
    slot->mem = c10::GetCPUAllocator()->allocate(bytes);
    slot->bytes = bytes;
  }
  slot->in_use.store(true);
  std::shared_ptr<ReusedBlock> block = slot;
  return at::from_blob(block->mem.get(), {numel}, [block](void*) { block->in_use.store(false); }, options);
}

}  // namespace diffkern::rmdm
