"""Launch-configuration sweep of the library's CUDA kernels (threads per block, grid size) at 64M fp32.

    python benchmarks/gpu_launch_sweep.py

Builds a small extension from the library's own kernel templates (csrc/cuda/kernels.cuh), launches them
with each configuration on the same data, checks every output against the reference, and prints the
time and the percentage of a device-to-device copy measured in the same run, next to torch.compile of
the reference. The launchers in csrc/cuda/ops.cu use one configuration per kernel; this shows whether
another would be faster on the device at hand. Needs a CUDA device and ninja.
"""
from __future__ import annotations

import os

import torch
from torch.utils.cpp_extension import load_inline

from glass_fast.ops import reference as R
from gpu_ops import time_cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What csrc/cuda/ops.cu launches for both kernels at these sizes (fused_step_into, gather_into).
LIBRARY_LAUNCH = "256 threads, one block per work unit"

SOURCE = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include "cuda/kernels.cuh"
namespace gc = glass_fast::cuda;

// grid <= 0: one block per `threads` packs (no striding); grid > 0: that many blocks, striding.
void fused_step(torch::Tensor base, torch::Tensor out, torch::Tensor xt, torch::Tensor coef, torch::Tensor nw,
                torch::Tensor y, int64_t threads, int64_t grid) {
  const int64_t n = base.numel(), rows = coef.dim() == 2 ? coef.size(0) : 1, packs = n / 4;
  const int64_t blocks = grid > 0 ? grid : (packs + threads - 1) / threads;
  gc::fused_step_kernel<float, float, float, 4><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      base.data_ptr<float>(), out.data_ptr<float>(), xt.data_ptr<float>(), nullptr, coef.data_ptr<float>(),
      nw.data_ptr<float>(), y.data_ptr<float>(), n, n / rows, rows > 1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// grid <= 0: one block per row tile; grid > 0: that many blocks, striding over tiles.
void gather(torch::Tensor x, torch::Tensor idx, torch::Tensor out, int64_t threads, int64_t grid) {
  const int64_t k = x.size(1), rows = x.size(0) * k, chunks = x.numel() * 4 / 16 / rows;
  const int64_t tile = threads * gc::kGatherUnroll, per_row = (chunks + tile - 1) / tile, tiles = rows * per_row;
  const int64_t blocks = grid > 0 ? std::min(grid, tiles) : tiles;
  gc::gather_kernel<uint4><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint4*>(x.data_ptr()), idx.data_ptr<int64_t>(), reinterpret_cast<uint4*>(out.data_ptr()),
      k, chunks, per_row, tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
"""
DECLS = ("void fused_step(torch::Tensor base, torch::Tensor out, torch::Tensor xt, torch::Tensor coef, "
         "torch::Tensor nw, torch::Tensor y, int64_t threads, int64_t grid);\n"
         "void gather(torch::Tensor x, torch::Tensor idx, torch::Tensor out, int64_t threads, int64_t grid);")


def main():
    assert torch.cuda.is_available(), "this sweep needs a CUDA device"
    ext = load_inline("glass_fast_launch_sweep", cpp_sources=DECLS, cuda_sources=SOURCE,
                      functions=["fused_step", "gather"], extra_include_paths=[os.path.join(ROOT, "csrc")],
                      extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n = 64 * 2 ** 20
    src, dst = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    for _ in range(500):
        dst.copy_(src)
    t_copy = time_cuda(lambda: dst.copy_(src))
    print(f"device: {torch.cuda.get_device_name()}; {sms} SMs; copy of {n} fp32: {t_copy * 1e3:.3f} ms\n")
    grids = {"one block per work unit": 0, "8 blocks/SM, striding": 8 * sms, "32 blocks/SM, striding": 32 * sms}
    assert LIBRARY_LAUNCH == f"256 threads, {next(iter(grids))}"

    def report(title, ref, runs, outputs, traffic):
        """``outputs`` are zeroed before each configuration's checked run; ``traffic``: bytes the op moves
        per byte a copy of one operand moves (fused step 5/2, gather 1)."""
        compiled = torch.compile(ref, fullgraph=True)
        rows = [("torch.compile of the reference", time_cuda(compiled))]
        for name, fn, check in runs:
            for o in outputs:
                o.zero_()
            fn()
            assert check(), name
            rows.append((name, time_cuda(fn)))
        print(f"== {title}")
        for name, t in sorted(rows, key=lambda r: r[1]):
            mark = "  <- the library's launch" if name == LIBRARY_LAUNCH else ""
            print(f"  {name:44s} {t * 1e3:7.3f} ms {100 * traffic * t_copy / t:6.1f}% of copy bandwidth{mark}")
        print()

    g = torch.Generator(device="cuda").manual_seed(0)
    for per_sample in (False, True):
        base, out, xt = (torch.randn(64, n // 64, device="cuda", generator=g) for _ in range(3))
        coef = torch.randn((64, 6) if per_sample else (6,), device="cuda", generator=g)
        nw, y = torch.empty_like(base), torch.empty_like(base)
        want = R.fused_step(base, out, coef, xt)
        runs = [(f"{th} threads, {gname}", lambda th=th, gr=gr: ext.fused_step(base, out, xt, coef, nw, y, th, gr),
                 lambda: torch.allclose(nw, want[0], rtol=1e-5, atol=1e-5) and torch.allclose(y, want[1], rtol=1e-5,
                                                                                               atol=1e-5))
                for th in (128, 256, 512) for gname, gr in grids.items()]
        report(f"fused_step glass-euler, {'per-sample' if per_sample else 'shared'} coef, [64, 1048576]",
               lambda: R.fused_step(base, out, coef, xt), runs, (nw, y), traffic=5 / 2)

    x = torch.randn(64, 256, n // (64 * 256), device="cuda", generator=g)
    idx = torch.stack([torch.randperm(256, device="cuda", generator=g) for _ in range(64)])
    res = torch.empty_like(x)
    want = R.gather_particles(x, idx)
    report("gather_particles [64, 256, 4096], permuted ancestors", lambda: R.gather_particles(x, idx),
           [(f"{th} threads, {gname}", lambda th=th, gr=gr: ext.gather(x, idx, res, th, gr),
             lambda: torch.equal(res, want)) for th in (128, 256, 512) for gname, gr in grids.items()], (res,),
           traffic=1)


if __name__ == "__main__":
    main()
