// Dtype dispatch shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>

namespace glass_fast::cpu {

// Calls f(S{}) with S the C++ type of a floating dtype; keeps the instantiations explicit (the fused step
// nests two of these for its (state, out) dtype pairs).
template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: TORCH_CHECK(false, "unsupported dtype ", t);
  }
}

}  // namespace glass_fast::cpu
