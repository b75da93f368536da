// Autograd of the attention-sink ops (schemas in ops.cpp): forward only. Their outputs of inputs that require
// grad raise when differentiated (the public functions refuse such inputs up front).
#include "autograd.h"

namespace diffkern::autograd {

TORCH_LIBRARY_IMPL(diffkern, Autograd, m) {
  for (const char* name : {"sink_mass", "sink_attention_fwd", "sink_suppress", "sink_attention_given"})
    m.impl(name, refuse_backward(std::string("diffkern::") + name +
                                 " is forward-only: it has no backward. Call it under torch.no_grad() "
                                 "(attention-sink analysis is an inference-time tool)"));
  m.impl("sink_topk", non_differentiable());
}

}  // namespace diffkern::autograd
