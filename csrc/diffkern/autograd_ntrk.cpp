// Autograd of the NoiseTilt ops (schemas in ops.cpp). ntrk_step is linear in mu, w and eps; its backward is
// one fused CPU kernel, or under create_graph (and on GPUs) ATen ops on the incoming gradient, so it is
// differentiable again (double backward supported); sigma, rho and the Philox state get no gradient.
// twoos_project is not differentiable.
#include "autograd.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

namespace diffkern::autograd {
namespace {

const auto& step_fwd() {
  static auto fwd =
      op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&)>(
          "ntrk_step");
  return fwd;
}

struct Step : torch::autograd::Function<Step> {
  static Tensor forward(AutogradContext* ctx, const Tensor& mu, const Tensor& sigma, const Tensor& w,
                        const Tensor& rho, const OptTensor& eps, const OptTensor& philox) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({sigma, rho});
    ctx->set_materialize_grads(false);
    return step_fwd().call(mu, sigma, w, rho, eps, philox);
  }

  // dmu = dx, dw = sigma sqrt(rho) dx, deps = sigma sqrt(1 - rho) dx (per sample), each only when its input
  // needs it. One multiply per gradient in dx's dtype (the per-sample factor rounded to it, the product formed in
  // its opmath); dmu is dx itself. A contiguous CPU dx outside create_graph goes to the fused kernel
  // (diffkern::ntrk_step_bwd: dx read once, bit for bit the ATen form); otherwise ATen ops (dx read once per
  // gradient), which stay differentiable: sigma and rho are constants here, also to a second order.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto fused =
        op<std::vector<Tensor>(const Tensor&, const Tensor&, const Tensor&, bool, bool)>("ntrk_step_bwd");
    const Tensor& dx = grads[0];
    if (!dx.defined()) return variable_list(6);
    const auto saved = ctx->get_saved_variables();
    const bool w_grad = ctx->needs_input_grad(2), eps_grad = ctx->needs_input_grad(4);
    if (dx.is_cpu() && dx.is_contiguous() && !at::GradMode::is_enabled()) {
      const auto d = fused.call(dx, saved[0], saved[1], w_grad, eps_grad);
      return {dx, Tensor(), w_grad ? d[0] : Tensor(), Tensor(), eps_grad ? d.back() : Tensor(), Tensor()};
    }
    std::vector<int64_t> shape(dx.dim(), 1);
    shape[0] = -1;
    const auto acc = at::toOpMathType(dx.scalar_type());
    const auto s = saved[0].detach().to(acc).reshape(shape), r = saved[1].detach().to(acc).reshape(shape);
    const auto dw = w_grad ? dx * (s * r.sqrt()).to(dx.scalar_type()) : Tensor();
    const auto deps = eps_grad ? dx * (s * at::rsub(r, 1).sqrt()).to(dx.scalar_type()) : Tensor();
    return {dx, Tensor(), dw, Tensor(), deps, Tensor()};
  }
};

// Without anything to record (a sampler's step) the op runs below autograd directly (nothing_to_record).
Tensor step(const Tensor& mu, const Tensor& sigma, const Tensor& w, const Tensor& rho, const OptTensor& eps,
            const OptTensor& philox) {
  if (nothing_to_record({mu, sigma, w, rho, eps ? TensorList(*eps) : TensorList()})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return step_fwd().call(mu, sigma, w, rho, eps, philox);
  }
  return Step::apply(mu, sigma, w, rho, eps, philox);
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, Autograd, m) {
  m.impl("ntrk_step", &step);
  m.impl("ntrk_step_cuda", refuse_backward(internal_backend("ntrk_step")));
  m.impl("ntrk_step_bwd", refuse_backward("diffkern::ntrk_step_bwd is ntrk_step's internal backward kernel, without "
                                          "autograd; differentiate diffkern.ntrk_step (double backward supported)"));
  // The projection is piecewise: the identity on in-band entries, a constant (the band edge) on clipped ones,
  // with a sort in between. Its gradient would be zero on exactly the entries guidance cares about, so it is
  // declared non-differentiable: outputs of inputs requiring grad plainly do not.
  m.impl("twoos_project", non_differentiable());
}

}  // namespace diffkern::autograd
