// Every diffkern schema, in one place. Kernels register against these per dispatch key:
// C++ CPU kernels in csrc/cpu/, GPU backends from Python (Triton) and csrc/cuda/ (CUDA C++).
// Fake (meta) implementations and autograd formulas are registered from Python; each technique's
// fragment names the module that holds them, so a C++ program that loads these ops can find them.
#include <torch/library.h>

TORCH_LIBRARY(diffkern, m) {}

TORCH_LIBRARY_FRAGMENT(diffkern, m) {
  m.set_python_module("diffkern.dar.op");
  // DAR cross-layer routing (specs/dar.md):
  //   rstd_i = (mean(v_i^2) + eps)^-1/2,  s_i = rstd_i <q*g, v_i> / sqrt(d),
  //   h = sum_i softmax_i(s)_i v_i,       lse = log sum_i exp(s_i)   (per token, saved for backward)
  m.def("dar_route_fwd(Tensor[] sources, Tensor q, Tensor gain, float eps) -> (Tensor h, Tensor lse)");
  m.def(
      "dar_route_bwd(Tensor dh, Tensor[] sources, Tensor q, Tensor gain, Tensor h, Tensor lse, float eps)"
      " -> (Tensor[] dsources, Tensor dq, Tensor dgain)");
}

TORCH_LIBRARY_FRAGMENT(diffkern, m) {
  m.set_python_module("diffkern.dar.op");
  // Internal: the CUDA C++ kernels of the two ops above (csrc/cuda/dar_route.cu), with their exact
  // signatures. The `cuda` backend of dar_route_fwd/bwd calls these; users call dar_route_fwd/bwd.
  m.def("dar_route_fwd_cuda(Tensor[] sources, Tensor q, Tensor gain, float eps) -> (Tensor h, Tensor lse)");
  m.def(
      "dar_route_bwd_cuda(Tensor dh, Tensor[] sources, Tensor q, Tensor gain, Tensor h, Tensor lse, float eps)"
      " -> (Tensor[] dsources, Tensor dq, Tensor dgain)");
}

TORCH_LIBRARY_FRAGMENT(diffkern, m) {
  m.set_python_module("diffkern.grpo.op");
  // Flash-GRPO (specs/grpo.md). Per sample i, over its D latent elements, with std_rule 0 (Wan: std =
  // c sigma) or 1 (Flow-GRPO SD3: std = c sqrt(sigma / (1 - sigma))):
  //   mu = a x + b v,  a = 1 + std^2 dt / (2 sigma),  b = (1 + std^2 (1 - sigma) / (2 sigma)) dt
  //   log_prob = -mean((x_next - mu)^2) / (2 std^2 Dt) - log(std sqrt(Dt)) - log sqrt(2 pi)
  m.def(
      "flow_sde_step(Tensor x, Tensor v, Tensor sigma, Tensor sigma_next, Tensor eps, int std_rule, float std_coef)"
      " -> (Tensor x_next, Tensor mu, Tensor log_prob, Tensor inv_lambda)");
  // log_prob as above, kl = mean((mu - mu_ref)^2) / (2 std^2 Dt) (0 without v_ref) and TGR's 1/lambda;
  // with v_uncond the velocity is v_uncond + cfg_scale (v - v_uncond). The backward writes [dv] or
  // [dv, dv_uncond].
  m.def(
      "grpo_log_prob(Tensor v, Tensor x, Tensor x_next, Tensor sigma, Tensor sigma_next, Tensor? v_ref,"
      " Tensor? v_uncond, float cfg_scale, int std_rule, float std_coef)"
      " -> (Tensor log_prob, Tensor kl, Tensor inv_lambda)");
  m.def(
      "grpo_log_prob_bwd(Tensor dlog_prob, Tensor dkl, Tensor v, Tensor x, Tensor x_next, Tensor sigma,"
      " Tensor sigma_next, Tensor? v_ref, Tensor? v_uncond, float cfg_scale, int std_rule, float std_coef)"
      " -> Tensor[]");
}

TORCH_LIBRARY_FRAGMENT(diffkern, m) {
  m.set_python_module("diffkern.rmdm.op");
  // R-MDM shared-block recursion (specs/rmdm.md). weights holds K pre-norm blocks of 12 tensors each:
  //   ln1_w, ln1_b [d], w_qkv [3d, d], b_qkv [3d], w_o [d, d], b_o [d], ln2_w, ln2_b [d],
  //   w_1 [f, d], b_1 [f], w_2 [d, f], b_2 [d];
  // mod (optional adaLN) is [B, K, 6, d]: shift1, scale1, gate1, shift2, scale2, gate2 per block.
  // One block:  u = LN(h)(1 + scale1) + shift1,  h += gate1 * MHA(u);
  //             u = LN(h)(1 + scale2) + shift2,  h += gate2 * W_2 gelu(W_1 u + b_1) + b_2
  // (without mod: shifts 0, scales 0, gates 1). h_k = Blocks(h_{k-1}), k = 1..n_iter, h_0 = x;
  // states[k-1] = h_k. The backward recomputes one iteration at a time from the saved states.
  m.def("rmdm_recurse(Tensor x, Tensor[] weights, Tensor? mod, int n_iter, int heads, float eps) -> Tensor states");
  m.def(
      "rmdm_recurse_bwd(Tensor dstates, Tensor x, Tensor states, Tensor[] weights, Tensor? mod, int heads,"
      " float eps) -> (Tensor dx, Tensor[] dweights, Tensor dmod)");
  // Sudoku data (not differentiable): n unique-solution puzzles with `clues` clues and their solutions,
  // int64 [n, 81] with 0 for a blank; and the number of solutions of given puzzles, up to `limit`.
  m.def("rmdm_sudoku(int n, int clues, int seed) -> (Tensor puzzles, Tensor solutions)");
  m.def("rmdm_sudoku_count(Tensor puzzles, int limit) -> Tensor counts");
}
