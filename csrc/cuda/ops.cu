// CUDA launchers of the glass_fast ops (kernels in kernels.cuh). Every launch goes to the current
// stream; nothing here copies to the host or waits on the device, so the ops are safe inside CUDA
// graphs and under torch.cuda.set_sync_debug_mode("error").
// (c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream forwards to; the c10
// headers keep this file free of the cuBLAS/cuSPARSE headers that ATen/cuda/CUDAContext.h pulls in.)
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <limits>

#include "checks.h"
#include "fused_step_entry.h"
#include "cuda/kernels.cuh"
#include "cuda/launch.h"

namespace glass_fast::cuda {
namespace {

// Map ATen scalar types to the raw CUDA types used by the kernels (same bit layout).
template <typename T> struct Raw { using type = T; };
template <> struct Raw<c10::Half> { using type = __half; };
template <> struct Raw<c10::BFloat16> { using type = __nv_bfloat16; };

template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kHalf: return f(__half{});
    case at::kBFloat16: return f(__nv_bfloat16{});
    default: TORCH_CHECK(false, "unsupported dtype ", t);
  }
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const T*>(t.const_data_ptr()) : nullptr;
}

void fused_step_into(const at::Tensor& base, const at::Tensor& out, const at::Tensor& coef,
                     const std::optional<at::Tensor>& x_t, const std::optional<at::Tensor>& stage,
                     const at::Tensor& new_, const at::Tensor& y, int64_t rows) {
  const int64_t n = base.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(base.device());
  const bool f64 = base.scalar_type() == at::kDouble;
  const at::Tensor c = coef.to(f64 ? at::kDouble : at::kFloat).contiguous();
  const at::Tensor b = base.contiguous(), o = out.contiguous();
  const at::Tensor xt = x_t.has_value() ? x_t->contiguous() : at::Tensor();
  const at::Tensor st = stage.has_value() ? stage->contiguous() : at::Tensor();
  const int64_t inner = n / rows;
  const bool per_sample = rows > 1;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(base.scalar_type(), [&](auto s_tag) {
    using S = decltype(s_tag);
    dispatch_float(out.scalar_type(), [&](auto o_tag) {
      using O = decltype(o_tag);
      using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;
      constexpr int V = kStepVec;
      const bool vec = step_vectorized(per_sample, inner,
                                       {{b.const_data_ptr(), sizeof(S)}, {o.const_data_ptr(), sizeof(O)},
                                        {new_.data_ptr(), sizeof(S)}, {y.data_ptr(), sizeof(O)},
                                        {xt.defined() ? xt.const_data_ptr() : nullptr, sizeof(S)},
                                        {st.defined() ? st.const_data_ptr() : nullptr, sizeof(S)}});
      const Acc* cp = reinterpret_cast<const Acc*>(c.const_data_ptr());
      if (vec) {
        fused_step_kernel<S, O, Acc, V><<<blocks_for(n / V, kStepThreads), kStepThreads, 0, stream>>>(
            ptr<S>(b), ptr<O>(o), ptr<S>(xt), ptr<S>(st), cp, reinterpret_cast<S*>(new_.data_ptr()),
            reinterpret_cast<O*>(y.data_ptr()), n, inner, per_sample);
      } else {
        fused_step_kernel<S, O, Acc, 1><<<blocks_for(n, kStepThreads), kStepThreads, 0, stream>>>(
            ptr<S>(b), ptr<O>(o), ptr<S>(xt), ptr<S>(st), cp, reinterpret_cast<S*>(new_.data_ptr()),
            reinterpret_cast<O*>(y.data_ptr()), n, inner, per_sample);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<at::Tensor, at::Tensor> normalize_log_weights(const at::Tensor& log_w) {
  check_log_w(log_w);
  const c10::cuda::CUDAGuard guard(log_w.device());
  const at::Tensor lw = log_w.contiguous();
  const int64_t b = lw.size(0), k = lw.size(1);
  at::Tensor norm = at::empty({b, k}, lw.options());
  at::Tensor ess = at::empty({b}, lw.options());
  if (b == 0) return {norm, ess};
  TORCH_CHECK(b <= 2147483647, "log_w has ", b, " groups; at most 2^31 - 1 are supported");
  dispatch_float(lw.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
    normalize_kernel<T, Acc><<<static_cast<unsigned>(b), kRowThreads, 0,
                               c10::cuda::getCurrentCUDAStream()>>>(
        ptr<T>(lw), reinterpret_cast<T*>(norm.data_ptr()), reinterpret_cast<T*>(ess.data_ptr()), k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {norm, ess};
}

at::Tensor resample_indices(const at::Tensor& log_w, const at::Tensor& uniforms,
                            const std::string& scheme) {
  const c10::cuda::CUDAGuard guard(log_w.device());
  const ResampleArgs args = resample_args(log_w, uniforms, scheme);
  const at::Tensor &lw = args.log_w, &u = args.uniforms, &anc = args.ancestors;
  const int64_t b = args.groups, k = args.particles;
  const int code = args.code;
  if (b == 0) return anc;
  const bool f64 = lw.scalar_type() == at::kDouble;
  at::Tensor scratch = at::empty({b, 2 * k}, lw.options().dtype(f64 ? at::kDouble : at::kFloat));
  dispatch_float(lw.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
    dispatch_float(u.scalar_type(), [&](auto utag) {
      using U = decltype(utag);
      resample_kernel<T, U, Acc><<<static_cast<unsigned>(b), kRowThreads, 0,
                                   c10::cuda::getCurrentCUDAStream()>>>(
          ptr<T>(lw), ptr<U>(u), anc.data_ptr<int64_t>(),
          reinterpret_cast<Acc*>(scratch.data_ptr()), k, code);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return anc;
}

void gather_into(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& res) {
  const int64_t b = x.size(0), k = x.size(1), rows = b * k;
  if (res.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), ic = idx.contiguous();
  const int64_t row_bytes = (x.numel() / rows) * x.element_size();
  const void* src = xc.const_data_ptr();
  void* dst = res.data_ptr();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const GatherLaunch g = gather_launch(rows, row_bytes, src, dst);
  auto launch = [&](auto unit_tag) {
    using C = decltype(unit_tag);
    gather_kernel<C><<<g.blocks, g.threads, 0, stream>>>(reinterpret_cast<const C*>(src),
                                                         ic.const_data_ptr<int64_t>(),
                                                         reinterpret_cast<C*>(dst), k, g.chunks,
                                                         g.tiles_per_row, g.tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (g.unit_bytes) {
    case 16: return launch(uint4{});
    case 8: return launch(uint2{});
    case 4: return launch(static_cast<unsigned int>(0));
    case 2: return launch(static_cast<unsigned short>(0));
    default: return launch(static_cast<unsigned char>(0));
  }
}

at::Tensor gather_particles(const at::Tensor& x, const at::Tensor& idx) {
  check_gather(x, idx);
  at::Tensor res = at::empty(x.sizes(), x.options());
  gather_into(x, idx, res);
  return res;
}

void gather_particles_(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& scratch) {
  check_gather(x, idx);
  check_scratch(scratch, x);
  // Staging needs a contiguous scratch apart from x (it may be x itself, overlap it, or be an
  // expanded view that cannot be written), and idx apart from both (staging or the gather would
  // change ancestors not yet read); otherwise, and for a strided x, gather into a new tensor, which
  // gives the reference's result.
  if (x.is_contiguous() && scratch.is_contiguous() &&
      at::get_overlap_status(scratch, x) == at::MemOverlapStatus::No &&
      at::get_overlap_status(scratch, idx) == at::MemOverlapStatus::No &&
      at::get_overlap_status(x, idx) == at::MemOverlapStatus::No) {
    scratch.copy_(x);
    gather_into(scratch, idx, x);
  } else {
    x.copy_(gather_particles(x, idx));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(glass_fast, CUDA, m) {
  m.impl("fused_step", &fused_step_out_of_place<fused_step_into>);
  m.impl("fused_step_", &fused_step_in_place<fused_step_into>);
  m.impl("normalize_log_weights", &normalize_log_weights);
  m.impl("resample_indices", &resample_indices);
  m.impl("gather_particles", &gather_particles);
  m.impl("gather_particles_", &gather_particles_);
}

}  // namespace glass_fast::cuda
