// Torch side of the CUDA NoiseTilt step kernel, shared by the CUDA build (ntrk_step_api.cpp, CUDA
// tensors) and the CPU harness build of the tests (CPU tensors): the checks the kernel's memory
// safety rests on (the public op checks fully first, python/diffkern/ntrk/op.py), allocation, launch.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>

#include "diffkern/check.h"
#include "latents_glue.h"
#include "ntrk_step.h"

namespace diffkern::ntrk::cuda {

inline at::Tensor step_on(const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& w, const at::Tensor& rho,
                          const std::optional<at::Tensor>& eps, const std::optional<at::Tensor>& philox,
                          void* stream) {
  constexpr const char* op = "ntrk_step";
  const Latents lat = diffkern::cuda::latents_of(op, {"mu", &mu}, {{"w", &w}, {"eps", eps ? &*eps : nullptr}},
                                                 /*empty_rows=*/true);
  const PerSample s = diffkern::cuda::per_sample(op, "sigma", sigma, mu, "mu");
  const PerSample r = diffkern::cuda::per_sample(op, "rho", rho, mu, "mu");
  check_philox_state(op, philox, eps.has_value(), {"mu", &mu});
  at::Tensor x = empty_output(mu.sizes(), mu.options());
  diffkern::cuda::check_launch(op, step({diffkern::cuda::with_fresh_outputs(lat, mu), s, r, mu.const_data_ptr(),
                                         w.const_data_ptr(), eps ? eps->const_data_ptr() : nullptr,
                                         x.mutable_data_ptr(), eps ? nullptr : philox->const_data_ptr<int64_t>(),
                                         stream}));
  return x;
}

}  // namespace diffkern::ntrk::cuda
