// Shared pieces of the ops' autograd kernels (csrc/diffkern/autograd_<technique>.cpp). Each op's
// autograd lives on the Autograd dispatch key, next to its schema: a torch::autograd::Function for the
// differentiable ops, and one of the two boxed kernels below for the others. Every kernel runs its op
// below autograd, so the CPU kernels, the CUDA key's Python backends and a `diffkern.backend(...)`
// override all run under it unchanged.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>

#include <string>
#include <utility>

namespace diffkern::autograd {

using at::Tensor;
using at::TensorList;
using OptTensor = std::optional<at::Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The typed handle of diffkern::<name> (looked up once per call site: keep it in a function-local static).
template <class Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow((std::string("diffkern::") + name).c_str(), "")
      .typed<Signature>();
}

// Calls backward op `bwd` from a differentiable op's graph node. Under grad mode off (a plain backward) it runs
// below autograd: there is nothing to record, and the boxed refuse_backward kernel, which boxes every argument
// (a TensorList of them for DAR's ops) to learn that, is skipped. Under grad mode (create_graph=True) it goes
// through that kernel, which makes a double backward fail loudly. Only for backward ops none of whose backends
// differentiates internally (refuse_backward's redispatch exists for those).
template <class Signature, class... Args>
auto call_backward(const c10::TypedOperatorHandle<Signature>& bwd, Args&&... args) {
  if (at::GradMode::is_enabled()) return bwd.call(std::forward<Args>(args)...);
  at::AutoDispatchBelowADInplaceOrView guard;
  return bwd.call(std::forward<Args>(args)...);
}

// Whether autograd has nothing to record for these inputs: grad mode off or none requires grad, and none carries a
// forward-mode tangent. A forward op is then called directly below autograd (the same kernel, the same outputs),
// without Function::apply's graph node, per-input metadata and saved variables: a few microseconds per call, which
// matter for an op called many times on small inputs (DAR's routing ops) and for one whose caller's working set has
// just evicted that code from the caches (NoiseTilt's step after its sweeps).
bool nothing_to_record(std::initializer_list<TensorList> inputs);

// An Autograd kernel whose op has no derivative. Its floating outputs of inputs that require grad (under
// grad mode) get a grad_fn that raises NotImplementedError(message) when a gradient reaches it, so
// differentiating through the op fails loudly instead of giving a silent None or a wrong gradient.
torch::CppFunction refuse_backward(std::string message);

// An Autograd kernel for an op whose outputs are not differentiable: they never require grad.
torch::CppFunction non_differentiable();

// The message of a backward op's refuse_backward: "double backward of <public> is not supported ...".
std::string no_double_backward(const std::string& public_name, const std::string& backward_op);

// The message of an internal backend op's refuse_backward: "diffkern::<op>_cuda is an internal backend op
// without autograd; call diffkern::<op>".
std::string internal_backend(const std::string& op);

}  // namespace diffkern::autograd
