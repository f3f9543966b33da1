"""Triton particle gather.

Math: out[b, k, :] = x[b, idx[b, k], :] for x viewed as [B * K, D] rows of D elements.
Grid: (B * K rows, tiles of BLOCK elements of a row); each program copies one tile of one row, or, for rows of
more tiles than a CUDA grid's second dimension holds (65535: rows past 67M elements), every such tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# CUDA caps a grid's second dimension (the first holds 2^31 - 1 programs).
GRID_Y_LIMIT = 65535


@triton.jit
def _gather_kernel(x_ptr, idx_ptr, out_ptr, K, D, ROUNDS, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)  # destination row b * K + k
    src = (r // K) * K + tl.load(idx_ptr + r)
    for i in range(0, ROUNDS):   # one round unless a row has more tiles than the grid's second dimension
        tile = tl.program_id(1).to(tl.int64) + i * tl.num_programs(1)
        cols = tile * BLOCK + tl.arange(0, BLOCK)
        mask = cols < D   # also the tiles past the row's last in the final round
        vals = tl.load(x_ptr + src * D + cols, mask=mask)
        tl.store(out_ptr + r * D + cols, vals, mask=mask)


def gather_particles_triton(x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor,
                            block: int = 1024, grid_y_limit: int = GRID_Y_LIMIT) -> None:
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
    tiles = triton.cdiv(d, blk)
    grid_y = min(tiles, grid_y_limit)
    _gather_kernel[(b * k, grid_y)](xc, idx.contiguous(), out, k, d, triton.cdiv(tiles, grid_y), BLOCK=blk)
