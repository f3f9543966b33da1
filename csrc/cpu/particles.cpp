// CPU particle ops: grouped log-weight normalisation, resampling indices and particle gathers.
// Groups (rows of [B, K]) are independent, so every op runs at::parallel_for over groups; within a
// group the work is a few sequential passes over K, in the order the reference states
// (glass_fast/ops/reference.py): w = exp(lw - max) / sum, cdf = cumsum(w) closed at 1 from the last
// positive weight on, ancestor = #{j : cdf_j <= p}, at most the index of the cdf's first 1.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/dispatch.h"
#include "ops.h"

namespace glass_fast::cpu {
namespace {

// Number of entries of the sorted cdf[0..k) that are <= p, clamped to k - 1 (cumulative copies).
template <typename Acc>
int64_t search_right(const Acc* cdf, int64_t k, Acc p) {
  const int64_t a = std::upper_bound(cdf, cdf + k, p) - cdf;
  return std::min(a, k - 1);
}

// The same for a closed cdf, at most the index of its first 1 (the last particle of positive weight):
// a position at or past 1 never draws a trailing particle of weight zero (reference._search_closed).
template <typename Acc>
int64_t search_closed(const Acc* cdf, int64_t k, Acc p) {
  const int64_t a = std::upper_bound(cdf, cdf + k, p) - cdf;
  return std::min(a, static_cast<int64_t>(std::lower_bound(cdf, cdf + k, Acc(1)) - cdf));
}

// Normalised weights of one row: w = exp(lw - max) / sum. Returns false for a row without valid
// weights (all -inf, or a NaN or +inf entry): its sum is NaN (a valid row sums at least exp(0) = 1).
template <typename Acc, typename T>
bool row_weights(const T* lw, int64_t k, Acc* w) {
  Acc m = -std::numeric_limits<Acc>::infinity();
  for (int64_t j = 0; j < k; ++j) m = std::max(m, static_cast<Acc>(lw[j]));
  Acc s = 0;
  for (int64_t j = 0; j < k; ++j) {
    w[j] = std::exp(static_cast<Acc>(lw[j]) - m);
    s += w[j];
  }
  for (int64_t j = 0; j < k; ++j) w[j] = w[j] / s;
  return !std::isnan(s);
}

// cumsum(w) closed at 1 from the last positive weight on (every entry that reached min(total, 1)), as
// reference._closed_cdf: no position below 1 selects a trailing particle of weight zero.
template <typename Acc>
void closed_cumsum(const Acc* w, int64_t k, Acc* cdf) {
  Acc run = 0;
  for (int64_t j = 0; j < k; ++j) {
    run += w[j];
    cdf[j] = run;
  }
  const Acc top = std::min(run, Acc(1));  // a total above 1 (rounding) still leaves a sorted cdf
  for (int64_t j = 0; j < k; ++j) {
    if (cdf[j] >= top) cdf[j] = 1;
  }
  cdf[k - 1] = 1;
}

template <typename Acc, typename T, typename U>
void resample_row(const T* lw, const U* u, int64_t k, int scheme, int64_t* anc, Acc* w, Acc* cdf,
                  Acc* aux) {
  if (!row_weights<Acc>(lw, k, w)) {  // no valid weights: the group keeps its particles
    for (int64_t i = 0; i < k; ++i) anc[i] = i;
    return;
  }
  if (scheme != 3) {
    closed_cumsum<Acc>(w, k, cdf);
    for (int64_t i = 0; i < k; ++i) {
      Acc p;
      if (scheme == 0) p = static_cast<Acc>(u[i]);
      else if (scheme == 1) p = (static_cast<Acc>(i) + static_cast<Acc>(u[i])) / static_cast<Acc>(k);
      else p = (static_cast<Acc>(i) + static_cast<Acc>(u[0])) / static_cast<Acc>(k);
      anc[i] = search_closed<Acc>(cdf, k, p);
    }
    return;
  }
  // Residual: n_j = floor(K w_j) deterministic copies, the rest multinomial on K w_j - n_j.
  Acc copies = 0, rsum = 0;
  for (int64_t j = 0; j < k; ++j) {
    const Acc kw = static_cast<Acc>(k) * w[j];
    const Acc n = std::floor(kw);
    copies += n;
    cdf[j] = copies;  // cumulative copies (exact small integers)
    aux[j] = kw - n;  // residual weight
    rsum += aux[j];
  }
  for (int64_t j = 0; j < k; ++j) aux[j] = aux[j] / rsum;
  closed_cumsum<Acc>(aux, k, aux);
  for (int64_t i = 0; i < k; ++i) {
    if (static_cast<Acc>(i) < copies) anc[i] = search_right<Acc>(cdf, k, static_cast<Acc>(i));
    else anc[i] = search_closed<Acc>(aux, k, static_cast<Acc>(u[i]));
  }
}

// Groups per parallel task: a group costs a few exp per particle (about 16 simple element ops each), so
// groups are batched up to ATen's grain of element work. With a grain of one group, every call of a few
// small groups woke the thread pool (milliseconds on a busy machine for microseconds of work).
int64_t group_grain(int64_t k) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / (16 * std::max<int64_t>(k, 1)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> normalize_log_weights(const at::Tensor& log_w) {
  check_log_w(log_w);
  const at::Tensor lw = log_w.contiguous();
  const int64_t b = lw.size(0), k = lw.size(1);
  at::Tensor norm = at::empty({b, k}, lw.options());
  at::Tensor ess = at::empty({b}, lw.options());
  dispatch_float(lw.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
    const T* src = lw.const_data_ptr<T>();
    T* dst = norm.data_ptr<T>();
    T* e = ess.data_ptr<T>();
    at::parallel_for(0, b, group_grain(k), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const T* x = src + r * k;
        Acc m = -std::numeric_limits<Acc>::infinity();
        for (int64_t j = 0; j < k; ++j) m = std::max(m, static_cast<Acc>(x[j]));
        // x - logsumexp = (x - m) - log(sum exp(x - m)), exact for any magnitude of m; a row of
        // -inf has m = -inf and yields NaN, as does a NaN or +inf entry.
        Acc s = 0;
        for (int64_t j = 0; j < k; ++j) s += std::exp(static_cast<Acc>(x[j]) - m);
        const Acc log_s = std::log(s);
        Acc s2 = 0;
        for (int64_t j = 0; j < k; ++j) {
          const Acc v = (static_cast<Acc>(x[j]) - m) - log_s;
          dst[r * k + j] = static_cast<T>(v);
          s2 += std::exp(2 * v);
        }
        e[r] = static_cast<T>(Acc(1) / s2);
      }
    });
  });
  return {norm, ess};
}

at::Tensor resample_indices(const at::Tensor& log_w, const at::Tensor& uniforms,
                            const std::string& scheme) {
  const ResampleArgs args = resample_args(log_w, uniforms, scheme);
  const at::Tensor &lw = args.log_w, &u = args.uniforms, &anc = args.ancestors;
  const int64_t b = args.groups, k = args.particles;
  const int code = args.code;
  dispatch_float(lw.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
    dispatch_float(u.scalar_type(), [&](auto utag) {
      using U = decltype(utag);
      at::parallel_for(0, b, group_grain(k), [&](int64_t lo, int64_t hi) {
        std::vector<Acc> scratch(3 * k);  // w, cdf, residual cdf of one row
        for (int64_t r = lo; r < hi; ++r) {
          resample_row<Acc>(lw.const_data_ptr<T>() + r * k, u.const_data_ptr<U>() + r * k, k, code,
                            anc.data_ptr<int64_t>() + r * k, scratch.data(), scratch.data() + k,
                            scratch.data() + 2 * k);
        }
      });
    });
  });
  return anc;
}

namespace {
// dst[b, k] = src[b, idx[b, k]] for contiguous [B, K, inner] byte rows of `row_bytes` each.
// Every ancestor in [0, K): checked for any x, also one without elements (as the reference does).
void check_indices(const at::Tensor& idx) {
  const at::Tensor ic = idx.contiguous();
  const int64_t* p = ic.const_data_ptr<int64_t>();
  const int64_t k = idx.size(1);
  for (int64_t i = 0; i < idx.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < k, "idx[", i / k, ", ", i % k, "] = ", p[i], " is out of range [0, ", k, ")");
  }
}

// Indices checked by the caller (check_indices).
void gather_rows(const char* src, char* dst, const int64_t* idx, int64_t b, int64_t k,
                 int64_t row_bytes) {
  at::parallel_for(0, b * k, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(row_bytes, 1)),
                   [&](int64_t lo, int64_t hi) {
                     for (int64_t i = lo; i < hi; ++i) {
                       const int64_t g = i / k;
                       std::memcpy(dst + i * row_bytes, src + (g * k + idx[i]) * row_bytes, row_bytes);
                     }
                   });
}
}  // namespace

at::Tensor gather_particles(const at::Tensor& x, const at::Tensor& idx) {
  check_gather(x, idx);
  check_indices(idx);
  const at::Tensor xc = x.contiguous(), ic = idx.contiguous();
  at::Tensor res = at::empty(x.sizes(), x.options());
  const int64_t b = x.size(0), k = x.size(1);
  if (res.numel() == 0) return res;
  gather_rows(static_cast<const char*>(xc.const_data_ptr()), static_cast<char*>(res.data_ptr()),
              ic.const_data_ptr<int64_t>(), b, k, (x.numel() / (b * k)) * x.element_size());
  return res;
}

void gather_particles_(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& scratch) {
  check_gather(x, idx);
  check_scratch(scratch, x);
  check_indices(idx);
  if (x.numel() == 0) return;
  // Staging needs scratch apart from x (a caller may pass x itself, or an overlapping view), and idx
  // apart from both (staging or the gather would change ancestors not yet read); like strided
  // tensors, such calls gather into a new tensor, which gives the reference's result.
  if (!scratch.is_contiguous() || !x.is_contiguous() ||
      at::get_overlap_status(scratch, x) != at::MemOverlapStatus::No ||
      at::get_overlap_status(scratch, idx) != at::MemOverlapStatus::No ||
      at::get_overlap_status(x, idx) != at::MemOverlapStatus::No) {
    x.copy_(gather_particles(x, idx));
    return;
  }
  scratch.copy_(x);
  const int64_t b = x.size(0), k = x.size(1);
  gather_rows(static_cast<const char*>(scratch.const_data_ptr()), static_cast<char*>(x.data_ptr()),
              idx.contiguous().const_data_ptr<int64_t>(), b, k,
              (x.numel() / (b * k)) * x.element_size());
}

TORCH_LIBRARY_IMPL(glass_fast, CPU, m) {
  m.impl("normalize_log_weights", &normalize_log_weights);
  m.impl("resample_indices", &resample_indices);
  m.impl("gather_particles", &gather_particles);
  m.impl("gather_particles_", &gather_particles_);
}

}  // namespace glass_fast::cpu
