"""Triton particle gather.

Math: out[b, k, :] = x[b, idx[b, k], :] for x viewed as [B * K, D] rows of D elements.
Grid: (B * K rows, tiles of BLOCK elements of a row); each program copies one tile of one row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_kernel(x_ptr, idx_ptr, out_ptr, K, D, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)  # destination row b * K + k
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    src = (r // K) * K + tl.load(idx_ptr + r)
    vals = tl.load(x_ptr + src * D + cols, mask=mask)
    tl.store(out_ptr + r * D + cols, vals, mask=mask)


def gather_particles_triton(x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor,
                            block: int = 1024) -> None:
    """Write x[b, idx[b, k]] into contiguous ``out`` (x [B, K, ...], idx [B, K] int64; checked).

    Index values are checked on CPU tensors (as the C++ backend does); on CUDA that would wait for the
    device, so an index outside [0, K) there reads out of bounds.
    """
    b, k = idx.shape
    d = x.numel() // max(b * k, 1)
    if idx.device.type == "cpu":  # before the empty-x return: the reference checks any idx
        bad = ((idx < 0) | (idx >= k)).nonzero()
        if len(bad):
            i, j = bad[0].tolist()
            raise RuntimeError(f"idx[{i}, {j}] = {int(idx[i, j])} is out of range [0, {k})")
    if x.numel() == 0:
        return
    xc = x.contiguous()
    if xc.is_complex():  # Triton has no complex types: move the (real, imag) pairs
        xc, out = torch.view_as_real(xc), torch.view_as_real(out)
        d *= 2
    blk = min(block, triton.next_power_of_2(d))
    _gather_kernel[(b * k, triton.cdiv(d, blk))](xc, idx.contiguous(), out, k, d, BLOCK=blk)
