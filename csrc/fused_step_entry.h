// The fused_step entry points, shared by the CPU and CUDA implementations around each device's
// `Into`, which checks nothing and writes contiguous `new_` and `y` of base's shape.
#pragma once

#include <ATen/ATen.h>
#include <optional>
#include <tuple>

#include "checks.h"

namespace glass_fast {

using FusedStepInto = void (*)(const at::Tensor& base, const at::Tensor& out, const at::Tensor& coef,
                               const std::optional<at::Tensor>& x_t,
                               const std::optional<at::Tensor>& stage, const at::Tensor& new_,
                               const at::Tensor& y, int64_t rows);

template <FusedStepInto Into>
std::tuple<at::Tensor, at::Tensor> fused_step_out_of_place(const at::Tensor& base, const at::Tensor& out,
                                                           const at::Tensor& coef,
                                                           const std::optional<at::Tensor>& x_t,
                                                           const std::optional<at::Tensor>& stage) {
  const int64_t rows = check_fused_step(base, out, coef, x_t, stage);
  at::Tensor new_ = at::empty(base.sizes(), base.options());
  at::Tensor y = at::empty(base.sizes(), out.options());
  Into(base, out, coef, x_t, stage, new_, y, rows);
  return {new_, y};
}

template <FusedStepInto Into>
void fused_step_in_place(const at::Tensor& base, const at::Tensor& out, const at::Tensor& coef,
                         const std::optional<at::Tensor>& x_t, const std::optional<at::Tensor>& stage,
                         const at::Tensor& y_out) {
  const int64_t rows = check_fused_step(base, out, coef, x_t, stage);
  check_y_out(y_out, base, out);
  // Element-wise in place is safe (each element is read before it is written); strided outputs are
  // computed into contiguous buffers and copied back.
  const at::Tensor new_ = base.is_contiguous() ? base : at::empty(base.sizes(), base.options());
  const at::Tensor y = y_out.is_contiguous() ? y_out : at::empty(base.sizes(), y_out.options());
  Into(base, out, coef, x_t, stage, new_, y, rows);
  if (!new_.is_same(base)) base.copy_(new_);
  if (!y.is_same(y_out)) y_out.copy_(y);
}

}  // namespace glass_fast
