// Autograd of the DAR ops (schemas in ops.cpp): dar_route_fwd and dar_gather_fwd differentiate through
// their backward ops, which themselves refuse a derivative (double backward is not supported).
#include "autograd.h"

#include <initializer_list>

namespace diffkern::autograd {
namespace {

using RouteBwd = std::tuple<std::vector<Tensor>, Tensor, Tensor>(const Tensor&, TensorList, const Tensor&,
                                                                 const Tensor&, const Tensor&, const Tensor&, double);
using GatherBwd = std::tuple<std::vector<Tensor>, Tensor, Tensor>(
    const Tensor&, TensorList, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const std::optional<Tensor>&, double);

const auto& route_fwd() {
  static auto fwd = op<std::tuple<Tensor, Tensor>(TensorList, const Tensor&, const Tensor&, double)>("dar_route_fwd");
  return fwd;
}

const auto& gather_fwd() {
  static auto fwd =
      op<std::tuple<Tensor, Tensor, Tensor>(TensorList, TensorList, const Tensor&, const Tensor&, double)>("dar_gather_fwd");
  return fwd;
}

// Saved: q, gain, h, lse and the routed sources; lse gets no gradient (never materialised as zeros).
struct Route : torch::autograd::Function<Route> {
  static variable_list forward(AutogradContext* ctx, TensorList sources, const Tensor& q, const Tensor& gain,
                               double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [h, lse] = route_fwd().call(sources, q, gain, eps);
    variable_list saved{q, gain, h, lse};
    saved.insert(saved.end(), sources.begin(), sources.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);
    return {h, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<RouteBwd>("dar_route_bwd");
    const auto saved = ctx->get_saved_variables();
    const auto n = saved.size() - 4;
    variable_list out(n + 3);
    if (!grads[0].defined()) return out;  // h's gradient undefined
    auto [dsources, dq, dgain] = call_backward(bwd, grads[0].contiguous(), TensorList(saved).slice(4), saved[0],
                                               saved[1], saved[2], saved[3], ctx->saved_data["eps"].toDouble());
    std::move(dsources.begin(), dsources.end(), out.begin());
    out[n] = dq;
    out[n + 1] = dgain;
    return out;
  }
};

// Saved: q, gain, h, lse and the routed sources [*sources, c] (not the addends: each gets c's gradient).
struct Gather : torch::autograd::Function<Gather> {
  static variable_list forward(AutogradContext* ctx, TensorList sources, TensorList addends, const Tensor& q,
                               const Tensor& gain, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [h, lse, c] = gather_fwd().call(sources, addends, q, gain, eps);
    variable_list saved{q, gain, h, lse};
    saved.insert(saved.end(), sources.begin(), sources.end());
    if (!addends.empty()) saved.push_back(c);
    ctx->save_for_backward(saved);
    ctx->saved_data["n"] = static_cast<int64_t>(sources.size());
    ctx->saved_data["k"] = static_cast<int64_t>(addends.size());
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);
    return {h, lse, c};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<GatherBwd>("dar_gather_bwd");
    const auto n = ctx->saved_data["n"].toInt(), k = ctx->saved_data["k"].toInt();
    const Tensor &dh = grads[0], &dc = grads[2];
    variable_list out(n + k + 3);
    if (!dh.defined()) {  // only the summary's gradient reached this op: it passes to every addend unchanged
      std::fill(out.begin() + n, out.begin() + n + k, dc);
      return out;
    }
    const auto saved = ctx->get_saved_variables();
    std::optional<Tensor> dlast;
    if (k && dc.defined()) dlast = dc.contiguous();
    auto [dsources, dq, dgain] = call_backward(bwd, dh.contiguous(), TensorList(saved).slice(4), saved[0], saved[1],
                                               saved[2], saved[3], dlast, ctx->saved_data["eps"].toDouble());
    std::copy(dsources.begin(), dsources.begin() + n, out.begin());
    if (k) std::fill(out.begin() + n, out.begin() + n + k, dsources.back());
    out[n + k] = dq;
    out[n + k + 1] = dgain;
    return out;
  }
};

std::tuple<Tensor, Tensor> route(TensorList sources, const Tensor& q, const Tensor& gain, double eps) {
  if (nothing_to_record({sources, q, gain})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return route_fwd().call(sources, q, gain, eps);
  }
  auto out = Route::apply(sources, q, gain, eps);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor, Tensor> gather(TensorList sources, TensorList addends, const Tensor& q, const Tensor& gain,
                                          double eps) {
  if (nothing_to_record({sources, addends, q, gain})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return gather_fwd().call(sources, addends, q, gain, eps);
  }
  auto out = Gather::apply(sources, addends, q, gain, eps);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, Autograd, m) {
  m.impl("dar_route_fwd", &route);
  m.impl("dar_gather_fwd", &gather);
  m.impl("dar_route_bwd", refuse_backward(no_double_backward("diffkern.dar_route", "dar_route_bwd")));
  m.impl("dar_gather_bwd", refuse_backward(no_double_backward("diffkern.dar.dar_gather", "dar_gather_bwd")));
  m.impl("dar_route_fwd_cuda", refuse_backward(internal_backend("dar_route_fwd")));
  m.impl("dar_route_bwd_cuda", refuse_backward(no_double_backward("diffkern.dar_route", "dar_route_bwd_cuda")));
}

}  // namespace diffkern::autograd
