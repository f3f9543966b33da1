// Compile-only check of the raw CUDA kernels (csrc/cuda/kernels.cuh) without PyTorch:
//   nvcc -std=c++17 -arch=sm_90 -Icsrc -c tests/cpp/cuda_kernels_compile.cu -o /tmp/k.o
// It instantiates every kernel with every type combination the launchers in csrc/cuda/ops.cu use.
#include "cuda/kernels.cuh"

namespace gc = glass_fast::cuda;

template <typename S, typename O, typename Acc>
void instantiate_fused() {
  auto k1 = &gc::fused_step_kernel<S, O, Acc, 1>;
  auto k4 = &gc::fused_step_kernel<S, O, Acc, 4>;
  (void)k1;
  (void)k4;
}

template <typename S>
void instantiate_state() {
  using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;
  instantiate_fused<S, float, Acc>();
  instantiate_fused<S, double, Acc>();
  instantiate_fused<S, __half, Acc>();
  instantiate_fused<S, __nv_bfloat16, Acc>();
  auto n = &gc::normalize_kernel<S, Acc>;
  auto r1 = &gc::resample_kernel<S, float, Acc>;
  auto r2 = &gc::resample_kernel<S, double, Acc>;
  (void)n;
  (void)r1;
  (void)r2;
}

int main() {
  instantiate_state<float>();
  instantiate_state<double>();
  instantiate_state<__half>();
  instantiate_state<__nv_bfloat16>();
  const void* gathers[] = {
      reinterpret_cast<const void*>(&gc::gather_kernel<uint4>),
      reinterpret_cast<const void*>(&gc::gather_kernel<uint2>),
      reinterpret_cast<const void*>(&gc::gather_kernel<unsigned int>),
      reinterpret_cast<const void*>(&gc::gather_kernel<unsigned short>),
      reinterpret_cast<const void*>(&gc::gather_kernel<unsigned char>)};
  return gathers[0] != nullptr ? 0 : 1;
}
