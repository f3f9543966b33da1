// CUDA device kernels of glass_fast on raw pointers: no ATen here, so this header compiles with
// nvcc alone (tests/cpp/cuda_kernels_compile.cu instantiates every kernel), and on the host with
// the stand-in headers of tests/cpp/cuda_host (tests/cuda_host.py runs every kernel on the CPU).
// The launchers in ops.cu pick the types and run on the current stream; launch.h holds the shapes.
//
//   fused_step:   new = k_base*base + k_stage*stage + k_xt*x_t + k_out*out ; y = n_xt*x_t + n_new*new
//   normalize:    lw - logsumexp(lw) per row ; ess = 1 / sum exp(2 (lw - lse))
//   resample:     w = exp(lw - max)/sum ; cdf = cumsum(w), 1 from the last positive w on ;
//                 a_k = #{j: cdf_j <= p_k}, at most the index of the cdf's first 1
//   gather:       out[b, k, :] = x[b, idx[b, k], :]
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <cassert>
#include <cmath>

#include "launch.h"

namespace glass_fast::cuda {

// ---------------------------------------------------------------- conversions

__device__ __forceinline__ float to_acc(float v, float) { return v; }
__device__ __forceinline__ double to_acc(double v, double) { return v; }
__device__ __forceinline__ double to_acc(float v, double) { return v; }
__device__ __forceinline__ float to_acc(double v, float) { return static_cast<float>(v); }
__device__ __forceinline__ float to_acc(__half v, float) { return __half2float(v); }
__device__ __forceinline__ double to_acc(__half v, double) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v, float) { return __bfloat162float(v); }
__device__ __forceinline__ double to_acc(__nv_bfloat16 v, double) { return __bfloat162float(v); }

template <typename T> struct Store;
template <> struct Store<float> {
  template <typename A> __device__ static float cast(A v) { return static_cast<float>(v); }
};
template <> struct Store<double> {
  template <typename A> __device__ static double cast(A v) { return static_cast<double>(v); }
};
template <> struct Store<__half> {  // from double via float: one extra rounding, far below half's
  template <typename A> __device__ static __half cast(A v) { return __float2half_rn(static_cast<float>(v)); }
};
template <> struct Store<__nv_bfloat16> {
  template <typename A> __device__ static __nv_bfloat16 cast(A v) {
    return __float2bfloat16_rn(static_cast<float>(v));
  }
};

// VEC consecutive elements moved as one aligned load/store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// ---------------------------------------------------------------- fused step

// Each thread handles VEC consecutive elements per grid-stride iteration (aligned vector loads);
// the launcher uses VEC > 1 only when every pointer is aligned and, for per-sample coefficients,
// rows hold a multiple of VEC elements (so a pack never straddles two samples).
template <typename S, typename O, typename Acc, int VEC>
__global__ void fused_step_kernel(const S* __restrict__ base, const O* __restrict__ out,
                                  const S* __restrict__ xt, const S* __restrict__ stage,
                                  const Acc* __restrict__ coef, S* nw, O* y, int64_t n,
                                  int64_t inner, bool per_sample) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t npack = n / VEC;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < npack;
       p += stride) {
    const int64_t i = p * VEC;
    const Acc* c = coef + (per_sample ? (i / inner) * 6 : 0);
    const Acc kb = c[0], ks = c[1], kx = c[2], ko = c[3], nx = c[4], nn = c[5];
    const Pack<S, VEC> b = reinterpret_cast<const Pack<S, VEC>*>(base)[p];
    const Pack<O, VEC> o = reinterpret_cast<const Pack<O, VEC>*>(out)[p];
    Pack<S, VEC> s, x, rn;
    Pack<O, VEC> ry;
    if (stage) s = reinterpret_cast<const Pack<S, VEC>*>(stage)[p];
    if (xt) x = reinterpret_cast<const Pack<S, VEC>*>(xt)[p];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      Acc acc = kb * to_acc(b.v[j], Acc{}) + ko * to_acc(o.v[j], Acc{});
      if (stage) acc = acc + ks * to_acc(s.v[j], Acc{});
      Acc yv;
      if (xt) {
        const Acc xv = to_acc(x.v[j], Acc{});
        acc = acc + kx * xv;
        yv = nn * acc + nx * xv;
      } else {
        yv = nn * acc;
      }
      rn.v[j] = Store<S>::cast(acc);
      ry.v[j] = Store<O>::cast(yv);
    }
    reinterpret_cast<Pack<S, VEC>*>(nw)[p] = rn;
    reinterpret_cast<Pack<O, VEC>*>(y)[p] = ry;
  }
  // Tail (n % VEC elements), one element per thread.
  for (int64_t i = npack * VEC + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const Acc* c = coef + (per_sample ? (i / inner) * 6 : 0);
    Acc acc = c[0] * to_acc(base[i], Acc{}) + c[3] * to_acc(out[i], Acc{});
    if (stage) acc = acc + c[1] * to_acc(stage[i], Acc{});
    Acc yv;
    if (xt) {
      const Acc xv = to_acc(xt[i], Acc{});
      acc = acc + c[2] * xv;
      yv = c[5] * acc + c[4] * xv;
    } else {
      yv = c[5] * acc;
    }
    nw[i] = Store<S>::cast(acc);
    y[i] = Store<O>::cast(yv);
  }
}

// ---------------------------------------------------------------- block reductions

template <typename Acc, bool MAX>
__device__ Acc block_reduce(Acc v, Acc* smem) {
  smem[threadIdx.x] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const Acc a = smem[threadIdx.x], b = smem[threadIdx.x + s];
      smem[threadIdx.x] = MAX ? (a > b ? a : b) : a + b;
    }
    __syncthreads();
  }
  const Acc r = smem[0];
  __syncthreads();  // smem is reused by the next reduction
  return r;
}

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }
__device__ __forceinline__ float log_acc(float v) { return logf(v); }
__device__ __forceinline__ double log_acc(double v) { return log(v); }

// Row max of lw (as Acc). A NaN may be dropped by the max; callers still see it, as a NaN sum of
// exp(lw - max), and so does +inf (inf - inf): such a group has no valid weights.
template <typename T, typename Acc>
__device__ Acc row_max(const T* lw, int64_t k, Acc* smem) {
  Acc m = -INFINITY;
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
    const Acc v = to_acc(lw[j], Acc{});
    m = v > m ? v : m;
  }
  return block_reduce<Acc, true>(m, smem);
}

// ---------------------------------------------------------------- normalize_log_weights

// One block per group.
template <typename T, typename Acc>
__global__ void normalize_kernel(const T* __restrict__ lw, T* norm, T* ess, int64_t k) {
  __shared__ Acc smem[kRowThreads];
  const T* x = lw + blockIdx.x * k;
  const Acc m = row_max<T, Acc>(x, k, smem);
  Acc s = 0;
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) s += exp_acc(to_acc(x[j], Acc{}) - m);
  // (x - m) - log(s): exact for log-weights of any magnitude. All -inf, NaN or +inf: NaN, by design.
  const Acc log_s = log_acc(block_reduce<Acc, false>(s, smem));
  Acc s2 = 0;
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
    const Acc v = (to_acc(x[j], Acc{}) - m) - log_s;
    norm[blockIdx.x * k + j] = Store<T>::cast(v);
    s2 += exp_acc(2 * v);
  }
  s2 = block_reduce<Acc, false>(s2, smem);
  if (threadIdx.x == 0) ess[blockIdx.x] = Store<T>::cast(Acc(1) / s2);
}

// ---------------------------------------------------------------- resample_indices

template <typename Acc>
__device__ int64_t search_right(const Acc* cdf, int64_t k, Acc p) {
  int64_t lo = 0, hi = k;  // first index with cdf > p
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (!(p < cdf[mid])) lo = mid + 1;  // a NaN position counts every entry, like std::upper_bound
    else hi = mid;
  }
  return lo < k - 1 ? lo : k - 1;
}

// The same for a closed cdf, at most the index of its first 1 (the last particle of positive weight):
// a position at or past 1 never draws a trailing particle of weight zero (reference._search_closed).
template <typename Acc>
__device__ int64_t search_closed(const Acc* cdf, int64_t k, Acc p) {
  int64_t lo = 0, hi = k;  // first index with cdf >= 1
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (cdf[mid] < Acc(1)) lo = mid + 1;
    else hi = mid;
  }
  const int64_t a = search_right<Acc>(cdf, k, p);
  return a < lo ? a : lo;
}

// One block per group. Scratch (global, [B, 2K] of Acc) holds the cdf, or for residual the cumulative
// copies and the residual cdf. The cumulative sums are sequential (thread 0) so every backend sums
// in the same order as the reference; K is small next to the data the particles carry.
// scheme: 0 multinomial, 1 stratified, 2 systematic, 3 residual.
template <typename T, typename U, typename Acc>
__global__ void resample_kernel(const T* __restrict__ lw, const U* __restrict__ uniforms,
                                int64_t* anc, Acc* scratch, int64_t k, int scheme) {
  __shared__ Acc smem[kRowThreads];
  __shared__ Acc total;
  const T* x = lw + blockIdx.x * k;
  const U* u = uniforms + blockIdx.x * k;
  int64_t* a = anc + blockIdx.x * k;
  Acc* cdf = scratch + blockIdx.x * 2 * k;
  Acc* rcdf = cdf + k;
  const Acc m = row_max<T, Acc>(x, k, smem);
  Acc s = 0;
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) s += exp_acc(to_acc(x[j], Acc{}) - m);
  s = block_reduce<Acc, false>(s, smem);
  if (!(s == s)) {  // no valid weights (all -inf, a NaN or +inf entry): the group keeps its particles
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) a[i] = i;
    return;  // s is the block's reduction: every thread returns here together
  }
  if (threadIdx.x == 0) {
    Acc run = 0, copies = 0, rsum = 0;
    for (int64_t j = 0; j < k; ++j) {
      const Acc w = exp_acc(to_acc(x[j], Acc{}) - m) / s;
      if (scheme != 3) {
        run += w;
        cdf[j] = run;
      } else {
        const Acc kw = static_cast<Acc>(k) * w;
        const Acc n = floor(kw);
        copies += n;
        cdf[j] = copies;
        rcdf[j] = kw - n;
        rsum += kw - n;
      }
    }
    // Closed at 1 from the last positive weight on (every entry that reached min(total, 1)) and at K - 1:
    // no position below 1 selects a trailing particle of weight zero (reference._closed_cdf).
    if (scheme == 3) {
      for (int64_t j = 0; j < k; ++j) {
        run += rcdf[j] / rsum;
        rcdf[j] = run;
      }
      const Acc top = run < Acc(1) ? run : Acc(1);  // a total above 1 (rounding) stays sorted
      for (int64_t j = 0; j < k; ++j) {
        if (rcdf[j] >= top) rcdf[j] = 1;
      }
      rcdf[k - 1] = 1;
      total = copies;
    } else {
      const Acc top = run < Acc(1) ? run : Acc(1);
      for (int64_t j = 0; j < k; ++j) {
        if (cdf[j] >= top) cdf[j] = 1;
      }
      cdf[k - 1] = 1;
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const Acc ui = to_acc(u[i], Acc{});
    if (scheme == 0) a[i] = search_closed<Acc>(cdf, k, ui);
    else if (scheme == 1) a[i] = search_closed<Acc>(cdf, k, (static_cast<Acc>(i) + ui) / static_cast<Acc>(k));
    else if (scheme == 2)
      a[i] = search_closed<Acc>(cdf, k, (static_cast<Acc>(i) + to_acc(u[0], Acc{})) / static_cast<Acc>(k));
    else if (static_cast<Acc>(i) < total) a[i] = search_right<Acc>(cdf, k, static_cast<Acc>(i));
    else a[i] = search_closed<Acc>(rcdf, k, ui);
  }
}

// ---------------------------------------------------------------- gather

// out rows r = b*K + k copy source row b*K + idx[r]; rows are `chunks` units of type C (a 16-, 8-,
// 4-, 2- or 1-byte type chosen from the row size and alignment). A tile is kGatherUnroll * blockDim.x
// units of one row and a row holds `tiles_per_row` tiles; the launcher gives each tile its own block
// (short blocks, many resident per SM, so one block's index load overlaps others' copies). Each
// thread issues all its loads before its stores: several independent requests in flight per thread.

template <typename C>
__global__ void gather_kernel(const C* __restrict__ x, const int64_t* __restrict__ idx,
                              C* __restrict__ out, int64_t k, int64_t chunks, int64_t tiles_per_row,
                              int64_t tiles) {
  const int64_t tile = static_cast<int64_t>(blockDim.x) * kGatherUnroll;
  for (int64_t w = blockIdx.x; w < tiles; w += gridDim.x) {
    const int64_t r = w / tiles_per_row;
    const int64_t a = __ldg(idx + r);
    assert(a >= 0 && a < k);
    const C* from = x + (r - r % k + a) * chunks;
    C* to = out + r * chunks;
    const int64_t c0 = (w - r * tiles_per_row) * tile + threadIdx.x;
    C v[kGatherUnroll];
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) {
      const int64_t c = c0 + static_cast<int64_t>(u) * blockDim.x;
      if (c < chunks) v[u] = from[c];
    }
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) {
      const int64_t c = c0 + static_cast<int64_t>(u) * blockDim.x;
      if (c < chunks) to[c] = v[u];
    }
  }
}

}  // namespace glass_fast::cuda
