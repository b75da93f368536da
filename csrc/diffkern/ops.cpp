// Every diffkern schema, in one place. Kernels register against these per dispatch key:
// C++ CPU kernels in csrc/cpu/, GPU backends from Python (Triton) and csrc/cuda/ (CUDA C++), autograd
// in csrc/diffkern/autograd_<technique>.cpp (the Autograd key). Fake (meta) implementations are
// registered from Python; each technique's fragment names the module that holds them, so a C++ program
// that loads these ops can find them.
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
  m.set_python_module("diffkern.dar.gather");
  // DAR chunked residual gathering: dar_route over [sources..., c], where the just-finished chunk's
  // summary c = sum_k addends[k] is formed in the same pass and returned (an empty [0] tensor when
  // there are no addends). The backward is dar_route_bwd over [sources..., c] with the incoming
  // gradient dlast of c (if any) added to the last source's gradient.
  m.def(
      "dar_gather_fwd(Tensor[] sources, Tensor[] addends, Tensor q, Tensor gain, float eps)"
      " -> (Tensor h, Tensor lse, Tensor summary)");
  m.def(
      "dar_gather_bwd(Tensor dh, Tensor[] sources, Tensor q, Tensor gain, Tensor h, Tensor lse, Tensor? dlast,"
      " float eps) -> (Tensor[] dsources, Tensor dq, Tensor dgain)");
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
  // x_next - mu = y - b v with the residual target y = x_next - a x = b v + std sqrt(Dt) eps, which the
  // step returns (log_prob is of y as stored) and the loss can read instead of x and x_next.
  m.def(
      "flow_sde_step(Tensor x, Tensor v, Tensor sigma, Tensor sigma_next, Tensor eps, int std_rule, float std_coef)"
      " -> (Tensor x_next, Tensor y, Tensor log_prob, Tensor inv_lambda)");
  // log_prob as above, kl = mean((mu - mu_ref)^2) / (2 std^2 Dt) (0 without v_ref) and TGR's 1/lambda;
  // target is x_next when x is given, else y (x_next - mu = target - a x - b v, the a x term only with
  // x); with v_uncond the velocity is v_uncond + cfg_scale (v - v_uncond). The backward writes [dv] or
  // [dv, dv_uncond].
  m.def(
      "grpo_log_prob(Tensor v, Tensor? x, Tensor target, Tensor sigma, Tensor sigma_next, Tensor? v_ref,"
      " Tensor? v_uncond, float cfg_scale, int std_rule, float std_coef)"
      " -> (Tensor log_prob, Tensor kl, Tensor inv_lambda)");
  m.def(
      "grpo_log_prob_bwd(Tensor dlog_prob, Tensor dkl, Tensor v, Tensor? x, Tensor target, Tensor sigma,"
      " Tensor sigma_next, Tensor? v_ref, Tensor? v_uncond, float cfg_scale, int std_rule, float std_coef)"
      " -> Tensor[]");
  // The whole one-step PPO loss in one call: grpo_log_prob (the stored step as x and x_next, or as y;
  // v_ref read only when beta > 0; cfg_scale and v_uncond together) and the [B] epilogue, per sample
  //   r = exp(log_prob - log_prob_old),  w = inv_lambda / mean(inv_lambda) (tgr; else 1),
  //   loss = mean(max(-w A r, -w A clip(r, 1 - clip_eps, 1 + clip_eps))) + beta mean(kl)
  // tgr_mean: the mean of inv_lambda over the global batch (None: this batch's). Also returned: the
  // statistics, and dloss_dsample [3, B] = d loss / d (log_prob, advantages, kl), which the backward
  // scales by the incoming gradient (dv through grpo_log_prob_bwd).
  m.def(
      "grpo_iso_loss(Tensor v, Tensor? x, Tensor? x_next, Tensor? y, Tensor sigma, Tensor sigma_next,"
      " Tensor log_prob_old, Tensor advantages, Tensor? v_ref, Tensor? v_uncond, float? cfg_scale, float clip_eps,"
      " bool tgr, float beta, int std_rule, float std_coef, Tensor? tgr_mean)"
      " -> (Tensor loss, Tensor approx_kl, Tensor clip_fraction, Tensor ratio_mean, Tensor weights,"
      " Tensor dloss_dsample)");
}

TORCH_LIBRARY_FRAGMENT(diffkern, m) {
  m.set_python_module("diffkern.sinks.op");
  // Attention sinks (specs/sinks.md), forward only. q [B, H, N_q, d], k/v [B, H, N_k, d], s = scale q k^T,
  // P = softmax_j(s); every op is O(N) in memory (no N_q x N_k matrix).
  //   mass[b,h,j] = (1/n_query) sum_{i<n_query} P[b,h,i,j],   lse[b,h,i] = log sum_j exp(s[b,h,i,j])
  m.def("sink_mass(Tensor q, Tensor k, int n_query, float scale) -> (Tensor mass, Tensor lse)");
  // The unmasked attention o = P v (accumulation dtype), with lse, mass, the row entropy -sum_j P log P and
  // top_p [B, H, N_q, row_top]: each row's row_top (0..8) largest P_ij, descending, 0 past N_k.
  m.def(
      "sink_attention_fwd(Tensor q, Tensor k, Tensor v, int n_query, float scale, int row_top=0)"
      " -> (Tensor o, Tensor lse, Tensor mass, Tensor entropy, Tensor top_p)");
  // Indices [B, G, k] of the k largest (or smallest) scores of each row of score [B, G, N]; ties -> lower index.
  m.def("sink_topk(Tensor score, int k, bool largest) -> Tensor");
  // Rows i < n_rows with the keys idx [B, G, K] (G in {1, H}) of S changed by g = e^bias, from o and lse.
  // renormalize: `bias` added to their logits and the row re-softmaxed (g may be > 1; S = every key cancels):
  //   out = (o - w sum_S P v) / (1 - w sum_S P), w = 1 - g;  post = g P[..., idx[0]] / (1 - w sum_S P)
  // !renormalize (value path): their values scaled by g:  out = o - w sum_S P v;  post = P[..., idx[0]]
  m.def(
      "sink_suppress(Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor idx, int n_rows, float scale,"
      " float bias, bool renormalize=True) -> (Tensor out, Tensor post)");
  // Keys known before the call: rows i < n_rows attend with `bias` added to the logits of the keys idx [B, G, K]
  // (G in {1, H}; a key listed twice is biased once), in one pass: out = softmax_j(s_ij + bias [j in S]) v in
  // q's dtype; a (b, h) whose every key is in S keeps its unmasked rows (the bias cancels), as sink_suppress.
  m.def(
      "sink_attention_given(Tensor q, Tensor k, Tensor v, Tensor idx, int n_rows, float scale, float bias)"
      " -> Tensor");
}

TORCH_LIBRARY_FRAGMENT(diffkern, m) {
  m.set_python_module("diffkern.grpo.cuda_ops");
  // Internal: the CUDA C++ kernels of the three ops above (csrc/cuda/grpo.cu), with their exact
  // signatures. The `cuda` backend of each op calls these; users call the ops above.
  m.def(
      "flow_sde_step_cuda(Tensor x, Tensor v, Tensor sigma, Tensor sigma_next, Tensor eps, int std_rule,"
      " float std_coef) -> (Tensor x_next, Tensor y, Tensor log_prob, Tensor inv_lambda)");
  m.def(
      "grpo_log_prob_cuda(Tensor v, Tensor? x, Tensor target, Tensor sigma, Tensor sigma_next, Tensor? v_ref,"
      " Tensor? v_uncond, float cfg_scale, int std_rule, float std_coef)"
      " -> (Tensor log_prob, Tensor kl, Tensor inv_lambda)");
  m.def(
      "grpo_log_prob_bwd_cuda(Tensor dlog_prob, Tensor dkl, Tensor v, Tensor? x, Tensor target, Tensor sigma,"
      " Tensor sigma_next, Tensor? v_ref, Tensor? v_uncond, float cfg_scale, int std_rule, float std_coef)"
      " -> Tensor[]");
}

TORCH_LIBRARY_FRAGMENT(diffkern, m) {
  m.set_python_module("diffkern.ntrk.op");
  // NoiseTilt (specs/ntrk.md). The tilted reverse step, per sample i of [B, ...] latents:
  //   x = mu + sigma_i (sqrt(rho_i) w + sqrt(1 - rho_i) eps)
  // with eps the given tensor, or (eps = None) eps[n] = philox randn(seed, offset + n) for the flat
  // element index n (csrc/include/diffkern/philox.h, on tl.randint4x's Philox words). sigma, rho: [B].
  // philox: the int64 [2] tensor (seed, offset) on mu's device, read by the kernel (no host sync, so a
  // seed drawn from torch's generator stays in a compiled graph); needed when eps is None, else unread.
  m.def("ntrk_step(Tensor mu, Tensor sigma, Tensor w, Tensor rho, Tensor? eps, Tensor? philox) -> Tensor x");
  // Internal: the CUDA C++ kernel of ntrk_step, same signature and semantics (the `cuda` backend).
  m.def(
      "ntrk_step_cuda(Tensor mu, Tensor sigma, Tensor w, Tensor rho, Tensor? eps, Tensor? philox)"
      " -> Tensor x");
  // Internal: ntrk_step's backward on CPU, dw = sigma sqrt(rho) dx (when w_grad) and deps = sigma sqrt(1 - rho) dx
  // (when eps_grad) from one read of dx; returns those requested, in that order. The autograd of ntrk_step calls
  // it (first order only).
  m.def("ntrk_step_bwd(Tensor dx, Tensor sigma, Tensor rho, bool w_grad, bool eps_grad) -> Tensor[]");
  // 2OS projection of each sample's N = M * D entries onto the Gaussian confidence set of the [M, D]
  // band table: sort each tile of D, sort each rank across the M tiles, clip Z[r, j] to
  // [lower[r, j], upper[r, j]], undo both sorts; repeated (at most max_passes clips) until every entry
  // lies in its band. in_set: [B], the fraction of the output's entries inside their bands.
  m.def("twoos_project(Tensor x, Tensor lower, Tensor upper, int max_passes) -> (Tensor out, Tensor in_set)");
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
  // The training pair on CPU (python/diffkern/rmdm/op.py picks it when the kept activations fit its memory
  // rule): the forward also returns every block evaluation's activations (a flat tensor in the accumulation
  // type, csrc/include/diffkern/rmdm_acts.h), and the backward reads them instead of recomputing.
  m.def(
      "rmdm_recurse_keep(Tensor x, Tensor[] weights, Tensor? mod, int n_iter, int heads, float eps)"
      " -> (Tensor states, Tensor acts)");
  m.def(
      "rmdm_recurse_keep_bwd(Tensor dstates, Tensor x, Tensor states, Tensor acts, Tensor[] weights, Tensor? mod,"
      " int heads, float eps) -> (Tensor dx, Tensor[] dweights, Tensor dmod)");
  // The backward's GPU backend (the `cuda` backend of rmdm_recurse_bwd): the same C++ as the CPU kernel,
  // composed of ATen ops, so on CUDA tensors its GEMMs run in cuBLAS (csrc/cpu/rmdm_recurse_bwd.cpp).
  m.def(
      "rmdm_recurse_bwd_cuda(Tensor dstates, Tensor x, Tensor states, Tensor[] weights, Tensor? mod, int heads,"
      " float eps) -> (Tensor dx, Tensor[] dweights, Tensor dmod)");
  // Sudoku data (not differentiable): n unique-solution puzzles with `clues` clues and their solutions,
  // int64 [n, 81] with 0 for a blank; and the number of solutions of given puzzles, up to `limit`.
  m.def("rmdm_sudoku(int n, int clues, int seed) -> (Tensor puzzles, Tensor solutions)");
  m.def("rmdm_sudoku_count(Tensor puzzles, int limit) -> Tensor counts");
}

TORCH_LIBRARY_FRAGMENT(diffkern, m) {
  // The ISA variant of the CPU kernels loaded in this process, as its -march name ("x86-64-v3"):
  // csrc/diffkern/cpu_dispatch.cpp picks it when the library loads. Raises when none could be loaded.
  m.def("cpu_isa() -> str");
  // The CPU output cache (csrc/include/diffkern/cpu_cache.h): the bytes of released output blocks it holds for
  // reuse, and freeing them all (diffkern.empty_cache()).
  m.def("cpu_cache_bytes() -> int");
  m.def("cpu_cache_clear() -> ()");
  // The benchmarks' machine-limit yardstick of a one-pass elementwise kernel (csrc/cpu/stream.cpp): every
  // writes[j] = the sum of reads, float32, in one pass; `nontemporal` stores bypass the caches.
  m.def("stream_pass(Tensor[] reads, Tensor(a!)[] writes, bool nontemporal) -> ()");
}
