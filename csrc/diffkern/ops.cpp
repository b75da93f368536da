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
