// Argument checks shared by the CPU and CUDA implementations. Messages name the argument, the value
// and what is allowed, like the Python boundary in glass_fast/ops/_checks.py.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <optional>
#include <string>

namespace glass_fast {

// The Python spellings (torch.float32, (3, 4)), so that a raw op's message equals the public op's
// (glass_fast/ops/_checks.py), exception type included: TORCH_CHECK_TYPE raises TypeError,
// TORCH_CHECK_VALUE ValueError.
inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline std::string py_shape(at::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + (sizes.size() == 1 ? ",)" : ")");
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), name, " has dtype ", py_dtype(t.scalar_type()),
                   "; allowed: float32, float16, bfloat16, float64");
}

// Shape, then device, then (if `dtype`) dtype of `t` equal to `ref`'s (Python's _checks._same).
inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name,
                       bool dtype) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, " has shape ", py_shape(t.sizes()), " but ", ref_name,
                    " has shape ", py_shape(ref.sizes()), "; they must be equal");
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device(), "; all tensors of an op must share a device");
  TORCH_CHECK_TYPE(!dtype || t.scalar_type() == ref.scalar_type(), name, " has dtype ",
                   py_dtype(t.scalar_type()), " but ", ref_name, " has dtype ", py_dtype(ref.scalar_type()),
                   "; they must be equal");
}

// Shape/dtype/device checks of fused_step. Returns the number of coefficient rows (1 or B).
inline int64_t check_fused_step(const at::Tensor& base, const at::Tensor& out, const at::Tensor& coef,
                                const std::optional<at::Tensor>& x_t,
                                const std::optional<at::Tensor>& stage) {
  check_float(base, "base");
  check_float(out, "out");
  check_same(out, base, "out", "base", false);
  for (const auto& [opt, name] : {std::pair{&x_t, "x_t"}, std::pair{&stage, "stage"}}) {
    if (!opt->has_value()) continue;
    check_float(opt->value(), name);
    check_same(opt->value(), base, name, "base", true);
  }
  TORCH_CHECK_TYPE(coef.scalar_type() == at::kFloat || coef.scalar_type() == at::kDouble,
                   "coef has dtype ", py_dtype(coef.scalar_type()), "; allowed: float32, float64");
  TORCH_CHECK_VALUE(coef.device() == base.device(), "coef is on ", coef.device(), " but base is on ",
                    base.device(), "; per-step coefficients must live on the data's device (no host "
                    "transfer per step)");
  const bool shared = coef.dim() == 1 && coef.size(0) == 6;
  const bool per_sample = coef.dim() == 2 && coef.size(1) == 6 && base.dim() >= 1 &&
                          coef.size(0) == base.size(0);
  TORCH_CHECK_VALUE(shared || per_sample, "coef has shape ", py_shape(coef.sizes()),
                    "; allowed: [6] or [B, 6] with B = ",
                    base.dim() >= 1 ? std::to_string(base.size(0)) : std::string("base.shape[0]"));
  return shared ? 1 : coef.size(0);
}

// An output written in place must not repeat an element (an expanded view): the op would fail half
// done, after writing other outputs. Same message as glass_fast/ops/_checks.py.
inline void check_written(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, name, " has shape ",
                    py_shape(t.sizes()), " and strides ", py_shape(t.strides()), ": an expanded view, whose ",
                    "elements share memory, cannot be written in place; pass ", name,
                    ".clone() or a new buffer");
}

inline void check_y_out(const at::Tensor& y_out, const at::Tensor& base, const at::Tensor& out) {
  check_float(y_out, "y_out");
  check_same(y_out, base, "y_out", "base", false);
  TORCH_CHECK_TYPE(y_out.scalar_type() == out.scalar_type(), "y_out has dtype ",
                   py_dtype(y_out.scalar_type()), " but out has dtype ", py_dtype(out.scalar_type()),
                   "; they must be equal");
  check_written(y_out, "y_out");
  check_written(base, "base");
}

inline void check_log_w(const at::Tensor& log_w) {
  check_float(log_w, "log_w");
  TORCH_CHECK_VALUE(log_w.dim() == 2 && log_w.size(1) >= 1, "log_w has shape ", py_shape(log_w.sizes()),
                    "; allowed: [B, K] with K >= 1");
}

inline void check_uniforms(const at::Tensor& uniforms, const at::Tensor& log_w) {
  check_float(uniforms, "uniforms");
  check_same(uniforms, log_w, "uniforms", "log_w", false);
}

// 0 multinomial, 1 stratified, 2 systematic, 3 residual.
inline int scheme_code(const std::string& scheme) {
  if (scheme == "multinomial") return 0;
  if (scheme == "stratified") return 1;
  if (scheme == "systematic") return 2;
  if (scheme == "residual") return 3;
  TORCH_CHECK_VALUE(false, "scheme='", scheme,
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
  TORCH_CHECK_VALUE(x.dim() >= 2, "x has shape ", py_shape(x.sizes()), "; allowed: [B, K, ...]");
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, "idx has dtype ", py_dtype(idx.scalar_type()),
                   "; allowed: torch.int64");
  TORCH_CHECK_VALUE(idx.dim() == 2 && idx.size(0) == x.size(0) && idx.size(1) == x.size(1), "idx has shape ",
                    py_shape(idx.sizes()), " but x has shape ", py_shape(x.sizes()),
                    "; idx must be [B, K] = x.shape[:2]");
  TORCH_CHECK_VALUE(idx.device() == x.device(), "idx is on ", idx.device(), " but x is on ", x.device(),
                    "; all tensors of an op must share a device");
}

inline void check_scratch(const at::Tensor& scratch, const at::Tensor& x) {
  check_same(scratch, x, "scratch", "x", true);
  check_written(x, "x");
}

}  // namespace glass_fast
