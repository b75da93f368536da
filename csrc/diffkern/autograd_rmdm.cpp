// Autograd of R-MDM's shared-block recursion (schemas in ops.cpp): rmdm_recurse differentiates through
// rmdm_recurse_bwd and the training pair rmdm_recurse_keep through rmdm_recurse_keep_bwd, which refuse a
// derivative themselves (their C++ kernels use ATen ops, which must not record a graph: that would be a wrong
// second-order gradient).
#include "autograd.h"

namespace diffkern::autograd {
namespace {

using Bwd = std::tuple<Tensor, std::vector<Tensor>, Tensor>;

// The gradients of (x, weights, mod, n_iter, heads, eps) from the backward op's (dx, dweights, dmod).
variable_list input_grads(Bwd grads, bool has_mod) {
  auto& [dx, dweights, dmod] = grads;
  variable_list out{dx};
  out.insert(out.end(), dweights.begin(), dweights.end());
  out.insert(out.end(), {has_mod ? dmod : Tensor(), Tensor(), Tensor(), Tensor()});
  return out;
}

// Saves x, the states, mod (undefined if none), `extra` (the kept activations, if any) and the weights.
void save(AutogradContext* ctx, const Tensor& x, const Tensor& states, const OptTensor& mod, const Tensor& extra,
          TensorList weights, int64_t heads, double eps) {
  variable_list saved{x, states, mod.value_or(Tensor()), extra};
  saved.insert(saved.end(), weights.begin(), weights.end());
  ctx->save_for_backward(saved);
  ctx->saved_data["heads"] = heads;
  ctx->saved_data["eps"] = eps;
}

// Saved: x, the states (the iteration inputs) and the weights (and mod); the backward re-runs one iteration
// at a time.
struct Recurse : torch::autograd::Function<Recurse> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, TensorList weights, const OptTensor& mod,
                        int64_t n_iter, int64_t heads, double eps) {
    static auto fwd = op<Tensor(const Tensor&, TensorList, const OptTensor&, int64_t, int64_t, double)>("rmdm_recurse");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto states = fwd.call(x, weights, mod, n_iter, heads, eps);
    save(ctx, x, states, mod, Tensor(), weights, heads, eps);
    return states;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<Bwd(const Tensor&, const Tensor&, const Tensor&, TensorList, const OptTensor&, int64_t,
                             double)>("rmdm_recurse_bwd");
    const auto saved = ctx->get_saved_variables();
    const bool has_mod = saved[2].defined();
    return input_grads(bwd.call(grads[0].contiguous(), saved[0], saved[1], TensorList(saved).slice(4),
                                has_mod ? OptTensor(saved[2]) : std::nullopt, ctx->saved_data["heads"].toInt(),
                                ctx->saved_data["eps"].toDouble()),
                       has_mod);
  }
};

// The training pair: saved as Recurse plus the activations rmdm_recurse_keep returned (not differentiable),
// which the backward reads instead of recomputing.
struct RecurseKeep : torch::autograd::Function<RecurseKeep> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, TensorList weights, const OptTensor& mod,
                               int64_t n_iter, int64_t heads, double eps) {
    static auto fwd = op<std::tuple<Tensor, Tensor>(const Tensor&, TensorList, const OptTensor&, int64_t, int64_t,
                                                    double)>("rmdm_recurse_keep");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [states, acts] = fwd.call(x, weights, mod, n_iter, heads, eps);
    save(ctx, x, states, mod, acts, weights, heads, eps);
    ctx->mark_non_differentiable({acts});
    ctx->set_materialize_grads(false);  // acts gets no gradient: no zero-filled one either (a memset per step)
    return {states, acts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<Bwd(const Tensor&, const Tensor&, const Tensor&, const Tensor&, TensorList, const OptTensor&,
                             int64_t, double)>("rmdm_recurse_keep_bwd");
    const auto saved = ctx->get_saved_variables();
    const bool has_mod = saved[2].defined();
    return input_grads(bwd.call(grads[0].contiguous(), saved[0], saved[1], saved[3], TensorList(saved).slice(4),
                                has_mod ? OptTensor(saved[2]) : std::nullopt, ctx->saved_data["heads"].toInt(),
                                ctx->saved_data["eps"].toDouble()),
                       has_mod);
  }
};

std::tuple<Tensor, Tensor> recurse_keep(const Tensor& x, TensorList weights, const OptTensor& mod, int64_t n_iter,
                                        int64_t heads, double eps) {
  auto out = RecurseKeep::apply(x, weights, mod, n_iter, heads, eps);
  return {out[0], out[1]};
}

Tensor recurse(const Tensor& x, TensorList weights, const OptTensor& mod, int64_t n_iter, int64_t heads, double eps) {
  return Recurse::apply(x, weights, mod, n_iter, heads, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, Autograd, m) {
  m.impl("rmdm_recurse", &recurse);
  m.impl("rmdm_recurse_keep", &recurse_keep);
  m.impl("rmdm_recurse_keep_bwd",
         refuse_backward(no_double_backward("diffkern.recurse", "rmdm_recurse_keep_bwd")));
  m.impl("rmdm_recurse_bwd", refuse_backward(no_double_backward("diffkern.recurse", "rmdm_recurse_bwd")));
  m.impl("rmdm_recurse_bwd_cuda", refuse_backward(no_double_backward("diffkern.recurse", "rmdm_recurse_bwd_cuda")));
}

}  // namespace diffkern::autograd
