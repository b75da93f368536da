// Autograd of the Flow-GRPO ops (schemas in ops.cpp). grpo_log_prob and grpo_iso_loss differentiate to v
// (and v_uncond) through grpo_log_prob_bwd, which refuses a derivative itself; flow_sde_step is a rollout
// op whose outputs are not differentiable.
#include "autograd.h"

#include <ATen/OpMathType.h>

namespace diffkern::autograd {
namespace {

// Saved: the tensor inputs (no temporaries); inv_lambda gets no gradient.
struct LogProb : torch::autograd::Function<LogProb> {
  static variable_list forward(AutogradContext* ctx, const Tensor& v, const OptTensor& x, const Tensor& target,
                               const Tensor& sigma, const Tensor& sigma_next, const OptTensor& v_ref,
                               const OptTensor& v_uncond, double cfg_scale, int64_t std_rule, double std_coef) {
    static auto fwd = op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const Tensor&,
                                                            const Tensor&, const Tensor&, const OptTensor&,
                                                            const OptTensor&, double, int64_t, double)>("grpo_log_prob");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [log_prob, kl, inv_lambda] = fwd.call(v, x, target, sigma, sigma_next, v_ref, v_uncond, cfg_scale, std_rule,
                                               std_coef);
    ctx->save_for_backward({v, x.value_or(Tensor()), target, sigma, sigma_next, v_ref.value_or(Tensor()),
                            v_uncond.value_or(Tensor())});
    ctx->saved_data["cfg_scale"] = cfg_scale;
    ctx->saved_data["std_rule"] = std_rule;
    ctx->saved_data["std_coef"] = std_coef;
    ctx->mark_non_differentiable({inv_lambda});
    ctx->set_materialize_grads(false);
    return {log_prob, kl, inv_lambda};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<std::vector<Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                             const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                             const OptTensor&, double, int64_t, double)>("grpo_log_prob_bwd");
    variable_list out(10);
    const Tensor &dlog_prob = grads[0], &dkl = grads[1];
    if (!dlog_prob.defined() && !dkl.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const Tensor& v = saved[0];
    auto optional = [](const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; };
    // sym_size: a plain size() would specialise a compiled graph on the batch size.
    const auto zeros = at::zeros_symint({v.sym_size(0)}, v.options().dtype(at::toOpMathType(v.scalar_type())));
    OptTensor v_ref = optional(saved[5]);
    if (!dkl.defined()) v_ref = std::nullopt;  // kl unused: the backward need not read v_ref
    const OptTensor v_uncond = optional(saved[6]);
    auto d = bwd.call(dlog_prob.defined() ? dlog_prob.to(zeros.scalar_type()).contiguous() : zeros,
                      dkl.defined() ? dkl.to(zeros.scalar_type()).contiguous() : zeros, v, optional(saved[1]),
                      saved[2], saved[3], saved[4], v_ref, v_uncond, ctx->saved_data["cfg_scale"].toDouble(),
                      ctx->saved_data["std_rule"].toInt(), ctx->saved_data["std_coef"].toDouble());
    out[0] = d[0];
    if (v_uncond) out[6] = d[1];
    return out;
  }
};

// grpo_iso_loss: the loss differentiates to v and v_uncond through grpo_log_prob_bwd, with the incoming
// gradient times the forward's dloss_dsample rows (d loss / d log_prob, d loss / d kl); log_prob_old
// and advantages get their gradients from the same rows. Saved: the latent inputs and dloss_dsample.
struct IsoLoss : torch::autograd::Function<IsoLoss> {
  static constexpr int kInputs = 17, kV = 0, kLogProbOld = 6, kAdvantages = 7, kVUncond = 9;

  static variable_list forward(AutogradContext* ctx, const Tensor& v, const OptTensor& x, const OptTensor& x_next,
                               const OptTensor& y, const Tensor& sigma, const Tensor& sigma_next,
                               const Tensor& log_prob_old, const Tensor& advantages, const OptTensor& v_ref,
                               const OptTensor& v_uncond, std::optional<double> cfg_scale, double clip_eps, bool tgr,
                               double beta, int64_t std_rule, double std_coef, const OptTensor& tgr_mean) {
    static auto fwd =
        op<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
            const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
            const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, std::optional<double>, double, bool,
            double, int64_t, double, const OptTensor&)>("grpo_iso_loss");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, approx_kl, clip_fraction, ratio_mean, weights, dsample] =
        fwd.call(v, x, x_next, y, sigma, sigma_next, log_prob_old, advantages, v_ref, v_uncond, cfg_scale, clip_eps,
                 tgr, beta, std_rule, std_coef, tgr_mean);
    // the op has checked the stored step: x and x_next, or y alone
    ctx->save_for_backward({v, x.value_or(Tensor()), y ? *y : *x_next, sigma, sigma_next,
                            beta > 0 ? v_ref.value_or(Tensor()) : Tensor(), v_uncond.value_or(Tensor()), dsample});
    ctx->saved_data["cfg_scale"] = cfg_scale.value_or(1.0);
    ctx->saved_data["std_rule"] = std_rule;
    ctx->saved_data["std_coef"] = std_coef;
    ctx->mark_non_differentiable({approx_kl, clip_fraction, ratio_mean, weights, dsample});
    ctx->set_materialize_grads(false);
    return {loss, approx_kl, clip_fraction, ratio_mean, weights, dsample};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<std::vector<Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                             const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                             const OptTensor&, double, int64_t, double)>("grpo_log_prob_bwd");
    variable_list out(kInputs);
    if (!grads[0].defined()) return out;
    const auto saved = ctx->get_saved_variables();
    auto optional = [](const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; };
    const Tensor d = saved[7].mul(grads[0]);  // rows: d loss / d log_prob, / d advantages, / d kl
    const OptTensor v_uncond = optional(saved[6]);
    // v is edge 0 (needs_input_grad counts the tensors present); v_uncond's gradient comes with v's
    if (ctx->needs_input_grad(0) || v_uncond) {
      auto dv = bwd.call(d.select(0, 0), d.select(0, 2), saved[0], optional(saved[1]), saved[2], saved[3], saved[4],
                         optional(saved[5]), v_uncond, ctx->saved_data["cfg_scale"].toDouble(),
                         ctx->saved_data["std_rule"].toInt(), ctx->saved_data["std_coef"].toDouble());
      out[kV] = dv[0];
      if (v_uncond) out[kVUncond] = dv[1];
    }
    out[kLogProbOld] = d.select(0, 0).neg();  // [B] each: cheaper than finding whether they need it
    out[kAdvantages] = d.select(0, 1);
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> iso_loss(
    const Tensor& v, const OptTensor& x, const OptTensor& x_next, const OptTensor& y, const Tensor& sigma,
    const Tensor& sigma_next, const Tensor& log_prob_old, const Tensor& advantages, const OptTensor& v_ref,
    const OptTensor& v_uncond, std::optional<double> cfg_scale, double clip_eps, bool tgr, double beta,
    int64_t std_rule, double std_coef, const OptTensor& tgr_mean) {
  auto out = IsoLoss::apply(v, x, x_next, y, sigma, sigma_next, log_prob_old, advantages, v_ref, v_uncond, cfg_scale,
                            clip_eps, tgr, beta, std_rule, std_coef, tgr_mean);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

std::tuple<Tensor, Tensor, Tensor> log_prob(const Tensor& v, const OptTensor& x, const Tensor& target,
                                            const Tensor& sigma, const Tensor& sigma_next, const OptTensor& v_ref,
                                            const OptTensor& v_uncond, double cfg_scale, int64_t std_rule,
                                            double std_coef) {
  auto out = LogProb::apply(v, x, target, sigma, sigma_next, v_ref, v_uncond, cfg_scale, std_rule, std_coef);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, Autograd, m) {
  m.impl("grpo_log_prob", &log_prob);
  m.impl("grpo_iso_loss", &iso_loss);
  m.impl("grpo_log_prob_bwd", refuse_backward(no_double_backward("diffkern.grpo_iso_loss", "grpo_log_prob_bwd")));
  // x_next is sampled: nothing is differentiated through a rollout step (training differentiates grpo_iso_loss).
  m.impl("flow_sde_step", non_differentiable());
  m.impl("flow_sde_step_cuda", non_differentiable());
  m.impl("grpo_log_prob_cuda", refuse_backward(internal_backend("grpo_log_prob")));
  m.impl("grpo_log_prob_bwd_cuda",
         refuse_backward(no_double_backward("diffkern.grpo_iso_loss", "grpo_log_prob_bwd_cuda")));
}

}  // namespace diffkern::autograd
