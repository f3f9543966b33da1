// The CUDA kernels of csrc/cuda/kernels.cuh compiled for the host, behind a C interface that
// tests/cuda_host.py calls through ctypes. Each entry point does what its launcher in ops.cu does
// on contiguous raw buffers: the same types, the same vector width and the same grid (launch.h);
// `grid` > 0 overrides the number of blocks, to run the kernels' grid-stride loops.
//
// dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16. Every function returns -1 for a code
// it does not know.
#include <type_traits>

#include "cuda/kernels.cuh"

namespace gc = glass_fast::cuda;

namespace {

template <typename F>
bool dispatch_float(int code, F&& f) {
  switch (code) {
    case 0: f(float{}); return true;
    case 1: f(double{}); return true;
    case 2: f(__half{}); return true;
    case 3: f(__nv_bfloat16{}); return true;
    default: return false;
  }
}

template <typename S>
using AccOf = std::conditional_t<std::is_same_v<S, double>, double, float>;

}  // namespace

extern "C" {

// Threads of a block between two barriers run from the first to the last (0) or the reverse (1).
void gf_host_set_thread_order(int reverse) { cuda_host::reverse_order = reverse != 0; }

// coef: [rows, 6] (or [6] for rows = 1) in float64 for a float64 state, float32 otherwise.
// Returns the elements per vector access used (kStepVec or 1).
int gf_host_fused_step(int s_code, int o_code, const void* base, const void* out, const void* xt,
                       const void* stage, const void* coef, void* nw, void* y, int64_t n, int64_t rows,
                       unsigned grid) {
  if (n == 0) return 0;
  const int64_t inner = n / rows;
  const bool per_sample = rows > 1;
  int used = -1;
  dispatch_float(s_code, [&](auto s_tag) {
    using S = decltype(s_tag);
    dispatch_float(o_code, [&](auto o_tag) {
      using O = decltype(o_tag);
      using Acc = AccOf<S>;
      const bool vec = gc::step_vectorized(per_sample, inner,
                                           {{base, sizeof(S)}, {out, sizeof(O)}, {nw, sizeof(S)},
                                            {y, sizeof(O)}, {xt, sizeof(S)}, {stage, sizeof(S)}});
      const auto* b = static_cast<const S*>(base);
      const auto* o = static_cast<const O*>(out);
      const auto* x = static_cast<const S*>(xt);
      const auto* s = static_cast<const S*>(stage);
      const auto* c = static_cast<const Acc*>(coef);
      if (vec) {
        const unsigned blocks = grid ? grid : gc::blocks_for(n / gc::kStepVec, gc::kStepThreads);
        cuda_host::launch(blocks, gc::kStepThreads, false, gc::fused_step_kernel<S, O, Acc, gc::kStepVec>, b,
                          o, x, s, c, static_cast<S*>(nw), static_cast<O*>(y), n, inner, per_sample);
        used = gc::kStepVec;
      } else {
        const unsigned blocks = grid ? grid : gc::blocks_for(n, gc::kStepThreads);
        cuda_host::launch(blocks, gc::kStepThreads, false, gc::fused_step_kernel<S, O, Acc, 1>, b, o, x, s, c,
                          static_cast<S*>(nw), static_cast<O*>(y), n, inner, per_sample);
        used = 1;
      }
    });
  });
  return used;
}

int gf_host_normalize_log_weights(int code, const void* lw, void* norm, void* ess, int64_t b, int64_t k) {
  if (b == 0) return 0;
  const bool ok = dispatch_float(code, [&](auto tag) {
    using T = decltype(tag);
    cuda_host::launch(static_cast<unsigned>(b), gc::kRowThreads, true, gc::normalize_kernel<T, AccOf<T>>,
                      static_cast<const T*>(lw), static_cast<T*>(norm), static_cast<T*>(ess), k);
  });
  return ok ? 0 : -1;
}

// scheme: 0 multinomial, 1 stratified, 2 systematic, 3 residual (checks.h scheme_code).
int gf_host_resample_indices(int code, int u_code, const void* lw, const void* u, int64_t* anc, int64_t b,
                             int64_t k, int scheme) {
  if (b == 0) return 0;
  int rc = -1;
  dispatch_float(code, [&](auto tag) {
    using T = decltype(tag);
    using Acc = AccOf<T>;
    std::vector<Acc> scratch(static_cast<size_t>(b * 2 * k));
    const bool ok = dispatch_float(u_code, [&](auto u_tag) {
      using U = decltype(u_tag);
      cuda_host::launch(static_cast<unsigned>(b), gc::kRowThreads, true, gc::resample_kernel<T, U, Acc>,
                        static_cast<const T*>(lw), static_cast<const U*>(u), anc, scratch.data(), k, scheme);
    });
    rc = ok ? 0 : -1;
  });
  return rc;
}

// Returns the bytes per unit the gather moved.
int gf_host_gather(const void* x, const int64_t* idx, void* out, int64_t b, int64_t k, int64_t row_bytes,
                   unsigned grid) {
  const int64_t rows = b * k;
  if (rows == 0 || row_bytes == 0) return 0;
  const gc::GatherLaunch g = gc::gather_launch(rows, row_bytes, x, out);
  const unsigned blocks = grid ? grid : g.blocks;
  auto run = [&](auto unit_tag) {
    using C = decltype(unit_tag);
    cuda_host::launch(blocks, static_cast<unsigned>(g.threads), false, gc::gather_kernel<C>,
                      static_cast<const C*>(x), idx, static_cast<C*>(out), k, g.chunks, g.tiles_per_row,
                      g.tiles);
  };
  switch (g.unit_bytes) {
    case 16: run(uint4{}); break;
    case 8: run(uint2{}); break;
    case 4: run(static_cast<unsigned int>(0)); break;
    case 2: run(static_cast<unsigned short>(0)); break;
    default: run(static_cast<unsigned char>(0)); break;
  }
  return g.unit_bytes;
}

}  // extern "C"
