// The fused_step entry points, shared by the CPU and CUDA implementations around each device's
// `Into`, which checks nothing and writes contiguous `new_` and `y` of base's shape.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
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

// Whether writing `dst` in place could change an input before it is read: dst partially overlaps a
// contiguous input (for two contiguous tensors of one shape the overlap status is exact).
inline bool overwrites_unread(const at::Tensor& dst, const at::Tensor& base, const at::Tensor& out,
                              const std::optional<at::Tensor>& x_t,
                              const std::optional<at::Tensor>& stage) {
  auto partial = [&](const at::Tensor& in) {
    return dst.is_contiguous() && in.is_contiguous() &&
           at::get_overlap_status(dst, in) == at::MemOverlapStatus::Partial;
  };
  return partial(base) || partial(out) || (x_t.has_value() && partial(*x_t)) ||
         (stage.has_value() && partial(*stage));
}

template <FusedStepInto Into>
void fused_step_in_place(const at::Tensor& base, const at::Tensor& out, const at::Tensor& coef,
                         const std::optional<at::Tensor>& x_t, const std::optional<at::Tensor>& stage,
                         const at::Tensor& y_out) {
  const int64_t rows = check_fused_step(base, out, coef, x_t, stage);
  check_y_out(y_out, base, out);
  // Element-wise in place is safe when an output and an input share memory element for element
  // (y_out = out, y_out = base: each element is read before it is written). An output that overlaps
  // a contiguous input otherwise (a shifted view, another dtype) would overwrite elements not yet
  // read, so such calls, like strided outputs, are computed into new buffers and copied back (new,
  // then y_next: the reference's order). Strided inputs are copied by `Into` before it writes.
  const bool hazard = overwrites_unread(base, base, out, x_t, stage) ||
                      overwrites_unread(y_out, base, out, x_t, stage);
  const bool new_direct = base.is_contiguous() && !hazard;
  // A new_ copied back after Into would overwrite the y_next Into wrote into a y_out that shares memory
  // with base (a strided base): such a y_next is copied back too, after new.
  const bool y_direct = y_out.is_contiguous() && !hazard && (new_direct || !y_out.is_alias_of(base));
  const at::Tensor new_ = new_direct ? base : at::empty(base.sizes(), base.options());
  const at::Tensor y = y_direct ? y_out : at::empty(base.sizes(), y_out.options());
  Into(base, out, coef, x_t, stage, new_, y, rows);
  if (!new_.is_same(base)) base.copy_(new_);
  if (!y.is_same(y_out)) y_out.copy_(y);
}

}  // namespace glass_fast
