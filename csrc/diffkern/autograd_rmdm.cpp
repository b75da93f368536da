// Autograd of R-MDM's shared-block recursion (schemas in ops.cpp): rmdm_recurse differentiates through
// rmdm_recurse_bwd, which refuses a derivative itself (its C++ kernel is composed of ATen ops, which must
// not record a graph: that would be a wrong second-order gradient).
#include "autograd.h"

namespace diffkern::autograd {
namespace {

// Saved: x, the states (the iteration inputs) and the weights (and mod); the backward re-runs one iteration
// at a time.
struct Recurse : torch::autograd::Function<Recurse> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, TensorList weights, const OptTensor& mod,
                        int64_t n_iter, int64_t heads, double eps) {
    static auto fwd = op<Tensor(const Tensor&, TensorList, const OptTensor&, int64_t, int64_t, double)>("rmdm_recurse");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto states = fwd.call(x, weights, mod, n_iter, heads, eps);
    variable_list saved{x, states, mod.value_or(Tensor())};
    saved.insert(saved.end(), weights.begin(), weights.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["eps"] = eps;
    return states;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<std::tuple<Tensor, std::vector<Tensor>, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, TensorList, const OptTensor&, int64_t, double)>("rmdm_recurse_bwd");
    const auto saved = ctx->get_saved_variables();
    const bool has_mod = saved[2].defined();
    const auto weights = TensorList(saved).slice(3);
    auto [dx, dweights, dmod] = bwd.call(grads[0].contiguous(), saved[0], saved[1], weights,
                                         has_mod ? OptTensor(saved[2]) : std::nullopt,
                                         ctx->saved_data["heads"].toInt(), ctx->saved_data["eps"].toDouble());
    variable_list out{dx};
    out.insert(out.end(), dweights.begin(), dweights.end());
    out.insert(out.end(), {has_mod ? dmod : Tensor(), Tensor(), Tensor(), Tensor()});
    return out;
  }
};

Tensor recurse(const Tensor& x, TensorList weights, const OptTensor& mod, int64_t n_iter, int64_t heads, double eps) {
  return Recurse::apply(x, weights, mod, n_iter, heads, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, Autograd, m) {
  m.impl("rmdm_recurse", &recurse);
  m.impl("rmdm_recurse_bwd", refuse_backward(no_double_backward("diffkern.recurse", "rmdm_recurse_bwd")));
  m.impl("rmdm_recurse_bwd_cuda", refuse_backward(no_double_backward("diffkern.recurse", "rmdm_recurse_bwd_cuda")));
}

}  // namespace diffkern::autograd
