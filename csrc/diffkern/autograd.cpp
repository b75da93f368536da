// The boxed Autograd kernels of csrc/diffkern/autograd.h.
#include "autograd.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <memory>
#include <utility>

namespace diffkern::autograd {
namespace {

// The grad_fn of a refused op's outputs: raises when the engine reaches it.
struct NoBackward final : torch::autograd::Node {
  explicit NoBackward(std::string message) : message_(std::move(message)) {}
  variable_list apply(variable_list&&) override { C10_THROW_ERROR(NotImplementedError, message_); }
  std::string name() const override { return "diffkern::NoBackward"; }
  std::string message_;
};

void collect_requiring_grad(const c10::IValue& value, variable_list& out) {
  if (value.isTensor()) {
    if (value.toTensor().requires_grad()) out.push_back(value.toTensor());
  } else if (value.isTensorList()) {
    for (const at::Tensor& t : value.toTensorList().vec())
      if (t.requires_grad()) out.push_back(t);
  }
}

// t cut from the graph its kernel recorded (a kernel composed of ATen ops records one under grad mode), then
// given `node` as its grad_fn when there is one.
at::Tensor cut(const at::Tensor& t, const c10::intrusive_ptr<torch::autograd::Node>& node) {
  if (!t.defined() || (!node && !t.requires_grad())) return t;
  auto alias = t.detach();
  if (node && (alias.is_floating_point() || alias.is_complex())) torch::autograd::create_gradient_edge(alias, node);
  return alias;
}

// Runs the op below autograd; with a message, attaches a NoBackward grad_fn as refuse_backward says. The op
// is redispatched rather than run with autograd excluded, so a backend that differentiates internally (the
// Python reference of rmdm_recurse_bwd) still can; whatever graph it leaves on the outputs is cut.
class BelowAutograd final : public c10::OperatorKernel {
 public:
  explicit BelowAutograd(std::string message) : message_(std::move(message)) {}

  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
    const bool grad_mode = torch::autograd::GradMode::is_enabled();
    const auto n_args = op.schema().arguments().size();
    variable_list requiring;
    if (grad_mode && !message_.empty())
      for (auto it = stack->end() - static_cast<std::ptrdiff_t>(n_args); it != stack->end(); ++it)
        collect_requiring_grad(*it, requiring);
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
    if (!grad_mode) return;
    c10::intrusive_ptr<torch::autograd::Node> node;
    if (!requiring.empty()) {
      node = c10::make_intrusive<NoBackward>(message_);
      node->set_next_edges(torch::autograd::collect_next_edges(requiring));
    }
    const auto n_out = op.schema().returns().size();
    for (auto it = stack->end() - static_cast<std::ptrdiff_t>(n_out); it != stack->end(); ++it) {
      if (it->isTensor()) {
        *it = cut(it->toTensor(), node);
      } else if (it->isTensorList()) {
        auto list = it->toTensorList();
        for (size_t i = 0; i < list.size(); ++i) list.set(i, cut(list.get(i), node));
        *it = std::move(list);
      }
    }
  }

 private:
  std::string message_;
};

}  // namespace

bool nothing_to_record(std::initializer_list<TensorList> inputs) {
  const bool grad_mode = at::GradMode::is_enabled();
  for (const TensorList list : inputs)
    for (const Tensor& t : list)
      if ((grad_mode && t.requires_grad()) || t._fw_grad(/*level=*/0).defined()) return false;
  return true;
}

torch::CppFunction refuse_backward(std::string message) {
  return torch::CppFunction::makeFromBoxedFunctor(std::make_unique<BelowAutograd>(std::move(message)));
}

torch::CppFunction non_differentiable() {
  return torch::CppFunction::makeFromBoxedFunctor(std::make_unique<BelowAutograd>(std::string()));
}

std::string no_double_backward(const std::string& public_name, const std::string& backward_op) {
  return "double backward of " + public_name + " is not supported: its backward (diffkern::" + backward_op +
         ") has no derivative. Differentiate it once (no create_graph through it)";
}

std::string internal_backend(const std::string& op) {
  return "diffkern::" + op + "_cuda is an internal backend op without autograd; call diffkern::" + op;
}

}  // namespace diffkern::autograd

// The benchmarks' bandwidth yardstick writes its outputs in place and has no derivative.
TORCH_LIBRARY_IMPL(diffkern, Autograd, m) { m.impl("stream_pass", diffkern::autograd::non_differentiable()); }
