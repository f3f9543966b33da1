// Argument checks shared by the CPU and CUDA implementations. Messages name the argument, the value
// and what is allowed, like the Python boundary in glass_fast/ops/_checks.py.
#pragma once

#include <ATen/ATen.h>
#include <optional>
#include <string>

namespace glass_fast {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_float_dtype(t.scalar_type()), name, " has dtype ", t.scalar_type(),
              "; allowed: float32, float16, bfloat16, float64");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but base is on ", ref.device(),
              "; all tensors of an op must share a device");
}

// Shape/dtype/device checks of fused_step. Returns the number of coefficient rows (1 or B).
inline int64_t check_fused_step(const at::Tensor& base, const at::Tensor& out, const at::Tensor& coef,
                                const std::optional<at::Tensor>& x_t,
                                const std::optional<at::Tensor>& stage) {
  check_float(base, "base");
  check_float(out, "out");
  TORCH_CHECK(out.sizes() == base.sizes(), "out has shape ", out.sizes(), " but base has shape ",
              base.sizes(), "; they must be equal");
  check_same_device(out, base, "out");
  for (const auto& [opt, name] : {std::pair{&x_t, "x_t"}, std::pair{&stage, "stage"}}) {
    if (!opt->has_value()) continue;
    const at::Tensor& t = opt->value();
    TORCH_CHECK(t.sizes() == base.sizes(), name, " has shape ", t.sizes(), " but base has shape ",
                base.sizes(), "; they must be equal");
    TORCH_CHECK(t.scalar_type() == base.scalar_type(), name, " has dtype ", t.scalar_type(),
                " but base has dtype ", base.scalar_type(), "; they must be equal");
    check_same_device(t, base, name);
  }
  check_same_device(coef, base, "coef");
  TORCH_CHECK(coef.scalar_type() == at::kFloat || coef.scalar_type() == at::kDouble,
              "coef has dtype ", coef.scalar_type(), "; allowed: float32, float64");
  const bool shared = coef.dim() == 1 && coef.size(0) == 6;
  const bool per_sample = coef.dim() == 2 && coef.size(1) == 6 && base.dim() >= 1 &&
                          coef.size(0) == base.size(0);
  TORCH_CHECK(shared || per_sample, "coef has shape ", coef.sizes(), "; allowed: [6] or [B, 6] with B = ",
              base.dim() >= 1 ? std::to_string(base.size(0)) : std::string("base.shape[0]"));
  return shared ? 1 : coef.size(0);
}

inline void check_y_out(const at::Tensor& y_out, const at::Tensor& base, const at::Tensor& out) {
  TORCH_CHECK(y_out.sizes() == base.sizes(), "y_out has shape ", y_out.sizes(),
              " but base has shape ", base.sizes(), "; they must be equal");
  TORCH_CHECK(y_out.scalar_type() == out.scalar_type(), "y_out has dtype ", y_out.scalar_type(),
              " but out has dtype ", out.scalar_type(), "; they must be equal");
  check_same_device(y_out, base, "y_out");
}

inline void check_log_w(const at::Tensor& log_w) {
  check_float(log_w, "log_w");
  TORCH_CHECK(log_w.dim() == 2 && log_w.size(1) >= 1, "log_w has shape ", log_w.sizes(),
              "; allowed: [B, K] with K >= 1");
}

inline void check_uniforms(const at::Tensor& uniforms, const at::Tensor& log_w) {
  check_float(uniforms, "uniforms");
  TORCH_CHECK(uniforms.sizes() == log_w.sizes(), "uniforms has shape ", uniforms.sizes(),
              " but log_w has shape ", log_w.sizes(), "; they must be equal");
  TORCH_CHECK(uniforms.device() == log_w.device(), "uniforms is on ", uniforms.device(),
              " but log_w is on ", log_w.device());
}

// 0 multinomial, 1 stratified, 2 systematic, 3 residual.
inline int scheme_code(const std::string& scheme) {
  if (scheme == "multinomial") return 0;
  if (scheme == "stratified") return 1;
  if (scheme == "systematic") return 2;
  if (scheme == "residual") return 3;
  TORCH_CHECK(false, "scheme='", scheme,
              "' is not a resampling scheme; allowed: multinomial, stratified, systematic, residual");
}

// resample_indices' checked arguments: contiguous log-weights and uniforms, the scheme's code, and the
// [B, K] int64 ancestor tensor to fill.
struct ResampleArgs {
  at::Tensor log_w, uniforms, ancestors;
  int code;
  int64_t groups, particles;
};

inline ResampleArgs resample_args(const at::Tensor& log_w, const at::Tensor& uniforms, const std::string& scheme) {
  check_log_w(log_w);
  check_uniforms(uniforms, log_w);
  const int code = scheme_code(scheme);
  const int64_t b = log_w.size(0), k = log_w.size(1);
  return {log_w.contiguous(), uniforms.contiguous(), at::empty({b, k}, log_w.options().dtype(at::kLong)), code, b, k};
}

inline void check_gather(const at::Tensor& x, const at::Tensor& idx) {
  TORCH_CHECK(x.dim() >= 2, "x has shape ", x.sizes(), "; allowed: [B, K, ...]");
  TORCH_CHECK(idx.scalar_type() == at::kLong, "idx has dtype ", idx.scalar_type(), "; allowed: int64");
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == x.size(0) && idx.size(1) == x.size(1), "idx has shape ",
              idx.sizes(), " but x has shape ", x.sizes(), "; idx must be [B, K] = x.shape[:2]");
  TORCH_CHECK(idx.device() == x.device(), "idx is on ", idx.device(), " but x is on ", x.device());
}

inline void check_scratch(const at::Tensor& scratch, const at::Tensor& x) {
  TORCH_CHECK(scratch.sizes() == x.sizes() && scratch.scalar_type() == x.scalar_type(),
              "scratch has shape ", scratch.sizes(), " and dtype ", scratch.scalar_type(),
              "; it must match x (shape ", x.sizes(), ", dtype ", x.scalar_type(), ")");
  TORCH_CHECK(scratch.device() == x.device(), "scratch is on ", scratch.device(), " but x is on ",
              x.device());
}

}  // namespace glass_fast
