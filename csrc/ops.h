// C++ entry points of the CPU implementations (registered with the dispatcher in cpu/*.cpp). The C++
// tests in tests/cpp call them directly; Python reaches them through torch.ops.glass_fast.*.
#pragma once

#include <ATen/ATen.h>
#include <optional>
#include <string>
#include <tuple>

namespace glass_fast::cpu {

std::tuple<at::Tensor, at::Tensor> fused_step(const at::Tensor& base, const at::Tensor& out,
                                              const at::Tensor& coef,
                                              const std::optional<at::Tensor>& x_t,
                                              const std::optional<at::Tensor>& stage);
void fused_step_(const at::Tensor& base, const at::Tensor& out, const at::Tensor& coef,
                 const std::optional<at::Tensor>& x_t, const std::optional<at::Tensor>& stage,
                 const at::Tensor& y_out);
std::tuple<at::Tensor, at::Tensor> normalize_log_weights(const at::Tensor& log_w);
at::Tensor resample_indices(const at::Tensor& log_w, const at::Tensor& uniforms,
                            const std::string& scheme);
at::Tensor gather_particles(const at::Tensor& x, const at::Tensor& idx);
void gather_particles_(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& scratch);

}  // namespace glass_fast::cpu
