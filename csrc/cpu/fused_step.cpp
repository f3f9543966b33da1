// CPU fused_step: one pass over base, out, (x_t), (stage) writing new and y_next.
//
//   new    = k_base*base + k_stage*stage + k_xt*x_t + k_out*out
//   y_next = n_xt*x_t + n_new*new
//
// Arithmetic in float (double for float64 state) with at::vec::Vectorized; work split over elements
// with at::parallel_for. A chunk may straddle samples, so it is cut at sample boundaries and each
// piece runs with that sample's coefficient row (per-sample coef) or the shared row.
//
// Operands larger than the caches are written with streaming (non-temporal) stores: an ordinary store
// first reads the line it writes, so new and y cost two memory passes each; streamed, one (7 -> 5
// passes; 1.3-1.6x faster at 4M fp32 on a 2-core EPYC). Below the threshold the outputs stay in cache
// for their next reader, where streaming would be slower.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cerrno>
#include <cstdlib>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "checks.h"
#include "fused_step_entry.h"
#include "cpu/dispatch.h"
#include "ops.h"

namespace glass_fast::cpu {
namespace {

using at::vec::Vectorized;

// Load / store Vectorized<Acc>::size() elements of T as Acc. Same-type and half/bfloat16 <-> float
// use ATen's vector conversions; the remaining mixed pairs (e.g. float out with double state) go
// through a small aligned buffer.
template <typename T, typename Acc>
struct VecIO {
  static constexpr int kN = Vectorized<Acc>::size();
  static Vectorized<Acc> load(const T* p) {
    if constexpr (std::is_same_v<T, Acc>) {
      return Vectorized<Acc>::loadu(p);
    } else if constexpr (std::is_same_v<Acc, float> && at::vec::is_reduced_floating_point_v<T>) {
      Vectorized<float> v;
      at::vec::load_to_float<T>(p, v);
      return v;
    } else {
      __at_align__ Acc buf[kN];
      for (int i = 0; i < kN; ++i) buf[i] = static_cast<Acc>(p[i]);
      return Vectorized<Acc>::loadu(buf);
    }
  }
  static void store(T* p, const Vectorized<Acc>& v) {
    if constexpr (std::is_same_v<T, Acc>) {
      v.store(p);
    } else if constexpr (std::is_same_v<Acc, float> && at::vec::is_reduced_floating_point_v<T>) {
      at::vec::convert_from_float<T>(v, v).store(p, kN);
    } else {
      __at_align__ Acc buf[kN];
      v.store(buf);
      for (int i = 0; i < kN; ++i) p[i] = static_cast<T>(buf[i]);
    }
  }
};

struct Ptrs {
  void* newp;
  void* y;
  const void* base;
  const void* out;
  const void* xt;     // nullptr when absent
  const void* stage;  // nullptr when absent
};

// Streaming stores exist for same-type float / double vectors with AVX (32-byte aligned addresses).
template <typename S, typename O, typename Acc>
constexpr bool kCanStream =
#if defined(__AVX__)
    std::is_same_v<S, Acc> && std::is_same_v<O, Acc> && Vectorized<Acc>::size() * sizeof(Acc) == 32;
#else
    false;
#endif
constexpr uintptr_t kStreamAlign = 32;

template <typename T>
void stream_store(T* p, const Vectorized<T>& v) {
#if defined(__AVX__)
  if constexpr (std::is_same_v<T, float>) _mm256_stream_ps(p, v);
  else _mm256_stream_pd(p, v);
#endif
}

// Operand bytes (inputs read plus outputs written) from which stores are streamed. 64 MiB: twice a
// 32 MiB last-level cache, the measured crossover on the CI-class machine (2M fp32 elements = 40 MiB
// is faster with ordinary stores, 4M = 80 MiB with streaming ones). GLASS_FAST_CPU_STREAM_MIN_BYTES
// overrides it (0: always, where the types and alignment allow).
// A value that is not a whole byte count (e.g. "64M", which atoll would read as 64: every step
// streamed) is refused rather than taken for another threshold.
int64_t stream_min_bytes() {
  constexpr int64_t kDefault = int64_t(64) << 20;
  const char* env = std::getenv("GLASS_FAST_CPU_STREAM_MIN_BYTES");
  if (env == nullptr || *env == '\0') return kDefault;
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && errno != ERANGE && v >= 0,
                    "GLASS_FAST_CPU_STREAM_MIN_BYTES='", env, "' is not a byte count; allowed: an integer >= 0 ",
                    "(unset: ", kDefault, ")");
  return v;
}

// Elements [lo, hi) with one coefficient row c = (k_base, k_stage, k_xt, k_out, n_xt, n_new).
// kStream: the vector body streams its stores from the first 32-byte boundary of new (y is co-aligned:
// checked by the caller); a fence at the end orders them before anything this thread does next.
template <typename S, typename O, typename Acc, bool kStream>
void fused_range(const Ptrs& p, const Acc* c, int64_t lo, int64_t hi) {
  const S* base = static_cast<const S*>(p.base);
  const O* out = static_cast<const O*>(p.out);
  const S* xt = static_cast<const S*>(p.xt);
  const S* st = static_cast<const S*>(p.stage);
  S* nw = static_cast<S*>(p.newp);
  O* y = static_cast<O*>(p.y);
  auto one = [&](int64_t i) {  // one element, the same operation order as the vector body
    Acc acc = c[0] * static_cast<Acc>(base[i]) + c[3] * static_cast<Acc>(out[i]);
    if (st) acc = acc + c[1] * static_cast<Acc>(st[i]);
    Acc yv;
    if (xt) {
      const Acc x = static_cast<Acc>(xt[i]);
      acc = acc + c[2] * x;
      yv = c[5] * acc + c[4] * x;
    } else {
      yv = c[5] * acc;
    }
    nw[i] = static_cast<S>(acc);
    y[i] = static_cast<O>(yv);
  };
  using V = Vectorized<Acc>;
  constexpr int64_t kN = V::size();
  const V kb(c[0]), ks(c[1]), kx(c[2]), ko(c[3]), nx(c[4]), nn(c[5]);
  int64_t i = lo;
  if constexpr (kStream) {
    for (; i < hi && reinterpret_cast<uintptr_t>(nw + i) % kStreamAlign != 0; ++i) one(i);
  }
  for (; i + kN <= hi; i += kN) {
    V acc = kb * VecIO<S, Acc>::load(base + i) + ko * VecIO<O, Acc>::load(out + i);
    if (st) acc = acc + ks * VecIO<S, Acc>::load(st + i);
    V yv;
    if (xt) {
      const V x = VecIO<S, Acc>::load(xt + i);
      acc = acc + kx * x;
      yv = nn * acc + nx * x;
    } else {
      yv = nn * acc;
    }
    if constexpr (kStream) {
      stream_store(nw + i, acc);
      stream_store(y + i, yv);
    } else {
      VecIO<S, Acc>::store(nw + i, acc);
      VecIO<O, Acc>::store(y + i, yv);
    }
  }
  for (; i < hi; ++i) one(i);
#if defined(__AVX__)
  if constexpr (kStream) _mm_sfence();
#endif
}

// Writes into contiguous new_ / y (same shape as base).
void fused_step_into(const at::Tensor& base, const at::Tensor& out, const at::Tensor& coef,
                     const std::optional<at::Tensor>& x_t, const std::optional<at::Tensor>& stage,
                     const at::Tensor& new_, const at::Tensor& y, int64_t rows) {
  const int64_t numel = base.numel();
  if (numel == 0) return;
  const bool f64 = base.scalar_type() == at::kDouble;
  const at::Tensor c = coef.to(f64 ? at::kDouble : at::kFloat).contiguous();
  const at::Tensor b = base.contiguous(), o = out.contiguous();
  at::Tensor xt, st;
  if (x_t.has_value()) xt = x_t->contiguous();
  if (stage.has_value()) st = stage->contiguous();
  const Ptrs p{new_.data_ptr(), y.data_ptr(), b.const_data_ptr(), o.const_data_ptr(),
               xt.defined() ? xt.const_data_ptr() : nullptr,
               st.defined() ? st.const_data_ptr() : nullptr};
  const int64_t inner = numel / rows;  // elements per coefficient row
  const int64_t stream_min = stream_min_bytes();  // read (and a bad value refused) on every build
  dispatch_float(base.scalar_type(), [&](auto s_tag) {
    using S = decltype(s_tag);
    dispatch_float(out.scalar_type(), [&](auto o_tag) {
      using O = decltype(o_tag);
      using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;
      const Acc* cp = c.const_data_ptr<Acc>();
      auto run = [&](auto stream_tag) {
        constexpr bool kStream = decltype(stream_tag)::value;
        at::parallel_for(0, numel, at::internal::GRAIN_SIZE, [&](int64_t lo, int64_t hi) {
          while (lo < hi) {
            const int64_t row = lo / inner;
            const int64_t end = std::min(hi, (row + 1) * inner);
            fused_range<S, O, Acc, kStream>(p, cp + 6 * row, lo, end);
            lo = end;
          }
        });
      };
      if constexpr (kCanStream<S, O, Acc>) {
        const int64_t operands = 4 + (xt.defined() ? 1 : 0) + (st.defined() ? 1 : 0);
        const bool co_aligned = reinterpret_cast<uintptr_t>(p.newp) % kStreamAlign ==
                                reinterpret_cast<uintptr_t>(p.y) % kStreamAlign;
        if (co_aligned && numel * int64_t(sizeof(S)) * operands >= stream_min) {
          run(std::true_type{});
          return;
        }
      }
      run(std::false_type{});
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fused_step(const at::Tensor& base, const at::Tensor& out,
                                              const at::Tensor& coef,
                                              const std::optional<at::Tensor>& x_t,
                                              const std::optional<at::Tensor>& stage) {
  return fused_step_out_of_place<fused_step_into>(base, out, coef, x_t, stage);
}

void fused_step_(const at::Tensor& base, const at::Tensor& out, const at::Tensor& coef,
                 const std::optional<at::Tensor>& x_t, const std::optional<at::Tensor>& stage,
                 const at::Tensor& y_out) {
  fused_step_in_place<fused_step_into>(base, out, coef, x_t, stage, y_out);
}

TORCH_LIBRARY_IMPL(glass_fast, CPU, m) {
  m.impl("fused_step", &fused_step);
  m.impl("fused_step_", &fused_step_);
}

}  // namespace glass_fast::cpu
