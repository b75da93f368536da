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
  m.set_python_module("diffkern.ntrk.op");
  // NoiseTilt (specs/ntrk.md). The tilted reverse step, per sample i of [B, ...] latents:
  //   x = mu + sigma_i (sqrt(rho_i) w + sqrt(1 - rho_i) eps)
  // with eps the given tensor, or (eps = None) eps[n] = philox randn(seed, offset + n) for the flat
  // element index n (csrc/include/diffkern/philox.h, on tl.randint4x's Philox words). sigma, rho: [B].
  m.def("ntrk_step(Tensor mu, Tensor sigma, Tensor w, Tensor rho, Tensor? eps, int seed, int offset) -> Tensor x");
  // Internal: the CUDA C++ kernel of ntrk_step, same signature and semantics (the `cuda` backend).
  m.def(
      "ntrk_step_cuda(Tensor mu, Tensor sigma, Tensor w, Tensor rho, Tensor? eps, int seed, int offset)"
      " -> Tensor x");
  // 2OS projection of each sample's N = M * D entries onto the Gaussian confidence set of the [M, D]
  // band table: sort each tile of D, sort each rank across the M tiles, clip Z[r, j] to
  // [lower[r, j], upper[r, j]], undo both sorts; repeated (at most max_passes clips) until every entry
  // lies in its band. in_set: [B], the fraction of the output's entries inside their bands.
  m.def("twoos_project(Tensor x, Tensor lower, Tensor upper, int max_passes) -> (Tensor out, Tensor in_set)");
}
