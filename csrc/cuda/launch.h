// Launch shapes of the CUDA ops as plain host arithmetic: no CUDA or ATen headers, so that the host
// tests (tests/cuda_host.py) run the kernels of kernels.cuh with exactly the grids ops.cu launches.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>

namespace glass_fast::cuda {

constexpr int kStepThreads = 256;  // threads per block of the fused step
constexpr int kStepVec = 4;        // elements per vector access of the fused step
constexpr int kRowThreads = 256;   // threads per group in the particle kernels (power of two)
constexpr int kGatherUnroll = 4;   // units each gather thread moves per tile

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// One block per `threads` units of work, as the gather launches one per row tile: with a capped grid
// that strides, blocks finish unevenly and the last wave idles part of the device (the gather's
// uncapped grid ran 5-10% faster on an H200). Kernels still stride past the grid's size limit.
inline unsigned blocks_for(int64_t work, int threads) {
  const int64_t need = (work + threads - 1) / threads;
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>(need, std::numeric_limits<int32_t>::max())));
}

// A pointer of the fused step and the size of its elements (nullptr: an absent x_t or stage).
struct StepOperand {
  const void* ptr;
  size_t elem_bytes;
};

// Whether the fused step moves kStepVec elements per access: every operand aligned to a whole pack
// and, for per-sample coefficients, rows of whole packs (a pack never straddles two samples).
inline bool step_vectorized(bool per_sample, int64_t inner, std::initializer_list<StepOperand> operands) {
  if (per_sample && inner % kStepVec != 0) return false;
  for (const StepOperand& o : operands) {
    if (o.ptr != nullptr && !aligned(o.ptr, o.elem_bytes * kStepVec)) return false;
  }
  return true;
}

// The gather moves rows in units of `unit_bytes` (16, 8, 4, 2 or 1: the widest that divides the row
// and keeps every row of source and destination aligned); a tile is kGatherUnroll * threads units
// of one row, and each tile gets its own block (measured on an H200: ~10% more bandwidth than blocks
// striding over tiles).
struct GatherLaunch {
  int unit_bytes;
  int64_t chunks;  // units per row
  int threads;
  int64_t tiles_per_row, tiles;
  unsigned blocks;
};

inline GatherLaunch gather_launch(int64_t rows, int64_t row_bytes, const void* src, const void* dst) {
  GatherLaunch g{};
  g.unit_bytes = 1;
  for (int bytes : {16, 8, 4, 2}) {
    if (row_bytes % bytes == 0 && aligned(src, bytes) && aligned(dst, bytes)) {
      g.unit_bytes = bytes;
      break;
    }
  }
  g.chunks = row_bytes / g.unit_bytes;
  g.threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, g.chunks)));
  const int64_t tile = int64_t(g.threads) * kGatherUnroll;
  g.tiles_per_row = (g.chunks + tile - 1) / tile;
  g.tiles = rows * g.tiles_per_row;
  g.blocks = static_cast<unsigned>(std::min<int64_t>(g.tiles, std::numeric_limits<int32_t>::max()));
  return g;
}

}  // namespace glass_fast::cuda
