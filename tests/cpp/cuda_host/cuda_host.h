// A CPU stand-in for the parts of the CUDA runtime that csrc/cuda/kernels.cuh uses, so that the very
// kernels ops.cu launches run on the host (tests/cuda_host.py). The stand-in headers cuda_fp16.h and
// cuda_bf16.h next to this file include it in place of CUDA's own.
//
// A launch runs one block at a time on the calling thread. In a kernel that synchronises its threads,
// each CUDA thread is a coroutine (ucontext) and `__syncthreads` hands over to the next one: every
// thread runs up to the barrier before any passes it, as on the device; a block whose threads do not
// all meet at the same barriers aborts the process (on a GPU that is undefined behaviour). Between
// barriers the threads run in order of threadIdx, or in reverse order (`gf_host_set_thread_order`): a kernel
// whose result depends on that order reads what another thread writes without a barrier between.
// `__shared__` becomes a function-local static, shared by the threads of the running block.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace cuda_host {

inline bool reverse_order = false;  // run the threads of a block from the last to the first
inline ucontext_t* scheduler = nullptr;    // where a thread at a barrier hands control back to
inline ucontext_t* running = nullptr;      // the coroutine of the thread that runs now
inline bool at_barrier = false;            // whether `running` handed back at a barrier (else it ended)

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_host: %s\n", what);
  std::abort();
}

}  // namespace cuda_host

inline void __syncthreads() {
  if (cuda_host::scheduler == nullptr) cuda_host::fail("__syncthreads() in a kernel launched as barrier-free");
  cuda_host::at_barrier = true;
  swapcontext(cuda_host::running, cuda_host::scheduler);
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// ---------------------------------------------------------------- 16-bit floats (bit layouts as CUDA's)

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}

inline __half __float2half_rn(float v) {  // the compiler's conversion rounds to nearest even
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float v) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &v, 4);
  __nv_bfloat16 b;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    b.bits = 0x7fc0;
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
    b.bits = static_cast<uint16_t>(u >> 16);
  }
  return b;
}

// Vector types of the gather (same sizes and alignment as CUDA's).
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};

// ---------------------------------------------------------------- launches

namespace cuda_host {

// getcontext and swapcontext "return twice"; kept out of `launch` so that its locals stay in place.
[[gnu::noinline]] inline void make_coroutine(ucontext_t* c, char* stack, size_t size, ucontext_t* link,
                                             void (*entry)(), uintptr_t arg) {
  getcontext(c);
  c->uc_stack.ss_sp = stack;
  c->uc_stack.ss_size = size;
  c->uc_link = link;  // where the coroutine goes when its function returns
  makecontext(c, entry, 2, unsigned(arg & 0xffffffffu), unsigned(arg >> 32));
}

// Runs `to` until it reaches a barrier (returns true) or its end (false).
[[gnu::noinline]] inline bool resume(ucontext_t* from, ucontext_t* to) {
  running = to;
  at_barrier = false;
  swapcontext(from, to);
  return at_barrier;
}

template <typename Run>
void coroutine_entry(unsigned lo, unsigned hi) {  // makecontext passes ints: the pointer in two halves
  auto* run = reinterpret_cast<Run*>((uintptr_t(hi) << 32) | uintptr_t(lo));
  (*run)();
}

// Launch `kernel(args...)` on `grid` blocks of `block` threads. `synchronises`: the kernel calls
// __syncthreads (its threads then run as coroutines); otherwise each thread runs to its end in turn.
template <typename Kernel, typename... Args>
void launch(unsigned grid, unsigned block, bool synchronises, Kernel kernel, Args... args) {
  gridDim = dim3{grid, 1, 1};
  blockDim = dim3{block, 1, 1};
  auto thread_at = [&](unsigned i) { return reverse_order ? block - 1 - i : i; };
  if (!synchronises) {
    for (unsigned b = 0; b < grid; ++b) {
      blockIdx = dim3{b, 1, 1};
      for (unsigned i = 0; i < block; ++i) {
        threadIdx = dim3{thread_at(i), 1, 1};
        kernel(args...);
      }
    }
    return;
  }
  constexpr size_t kStack = 64 * 1024;
  const std::unique_ptr<char[]> stacks(new char[size_t(block) * kStack]);
  std::vector<ucontext_t> threads(block);
  std::vector<bool> done(block);
  ucontext_t main_context;
  auto body = [&] { kernel(args...); };
  using Body = decltype(body);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(&body);
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx = dim3{b, 1, 1};
    for (unsigned t = 0; t < block; ++t) {
      make_coroutine(&threads[t], stacks.get() + size_t(t) * kStack, kStack, &main_context,
                     reinterpret_cast<void (*)()>(&coroutine_entry<Body>), addr);
      done[t] = false;
    }
    scheduler = &main_context;
    for (;;) {  // one pass per barrier phase: every live thread runs to its next barrier or its end
      unsigned ended = 0, waiting = 0;
      for (unsigned i = 0; i < block; ++i) {
        const unsigned t = thread_at(i);
        if (done[t]) continue;
        threadIdx = dim3{t, 1, 1};
        if (resume(&main_context, &threads[t])) ++waiting;
        else {
          done[t] = true;
          ++ended;
        }
      }
      if (waiting == 0) break;
      if (ended != 0) fail("some threads of a block ended while others wait at a barrier");
    }
    scheduler = nullptr;
  }
}

}  // namespace cuda_host
