"""Triton fused sampler stage.

Math (per element i of sample b, coefficient row c = coef[b] or the shared coef):
    new_i    = c.k_base * base_i + c.k_stage * stage_i + c.k_xt * x_t_i + c.k_out * out_i
    y_next_i = c.n_xt * x_t_i + c.n_new * new_i
computed in float32 (float64 for float64 state); new is stored in base's dtype, y_next in out's.
One read of each input and one write of each output: the op is memory bound.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _coef(coef_ptr, row, j, mask, PER_SAMPLE: tl.constexpr, ACC: tl.constexpr):
    # Column j of the coefficient row: a gather per element (per sample) or one scalar (shared).
    if PER_SAMPLE:
        return tl.load(coef_ptr + row * 6 + j, mask=mask, other=0.0).to(ACC)
    else:
        return tl.load(coef_ptr + j).to(ACC)


@triton.jit
def _fused_step_kernel(base_ptr, out_ptr, xt_ptr, stage_ptr, coef_ptr, new_ptr, y_ptr,
                       n_elements, inner, PER_SAMPLE: tl.constexpr, HAS_XT: tl.constexpr,
                       HAS_STAGE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    row = offs // inner if PER_SAMPLE else 0
    base = tl.load(base_ptr + offs, mask=mask, other=0.0).to(ACC)
    out = tl.load(out_ptr + offs, mask=mask, other=0.0).to(ACC)
    new = (_coef(coef_ptr, row, 0, mask, PER_SAMPLE, ACC) * base
           + _coef(coef_ptr, row, 3, mask, PER_SAMPLE, ACC) * out)
    if HAS_STAGE:
        stage = tl.load(stage_ptr + offs, mask=mask, other=0.0).to(ACC)
        new = new + _coef(coef_ptr, row, 1, mask, PER_SAMPLE, ACC) * stage
    n_new = _coef(coef_ptr, row, 5, mask, PER_SAMPLE, ACC)
    if HAS_XT:
        xt = tl.load(xt_ptr + offs, mask=mask, other=0.0).to(ACC)
        new = new + _coef(coef_ptr, row, 2, mask, PER_SAMPLE, ACC) * xt
        y = n_new * new + _coef(coef_ptr, row, 4, mask, PER_SAMPLE, ACC) * xt
    else:
        y = n_new * new
    tl.store(new_ptr + offs, new.to(new_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
    if y_ptr.dtype.element_ty != tl.float64:  # float64 state, reduced-precision out: via float32
        y = y.to(tl.float32)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def fused_step_triton(base: torch.Tensor, out: torch.Tensor, coef: torch.Tensor,
                      x_t: torch.Tensor | None, stage: torch.Tensor | None,
                      new: torch.Tensor, y: torch.Tensor, block: int = 1024) -> None:
    """Launch the fused step, writing into contiguous ``new`` (base.dtype) and ``y`` (out.dtype).

    Args:
        base, out: [B, ...]; x_t, stage: [B, ...] or None; coef: [6] or [B, 6] (checked by the caller).
        new, y: contiguous [B, ...] outputs (new may be base itself when base is contiguous).
    """
    n = base.numel()
    if n == 0:
        return
    f64 = base.dtype == torch.float64
    c = coef.to(torch.float64 if f64 else torch.float32).contiguous()
    rows = 1 if c.dim() == 1 else c.shape[0]
    base_c, out_c = base.contiguous(), out.contiguous()
    xt_c = x_t.contiguous() if x_t is not None else base_c
    st_c = stage.contiguous() if stage is not None else base_c
    grid = (triton.cdiv(n, block),)
    _fused_step_kernel[grid](base_c, out_c, xt_c, st_c, c, new, y, n, n // rows, PER_SAMPLE=rows > 1,
                             HAS_XT=x_t is not None, HAS_STAGE=stage is not None,
                             ACC=tl.float64 if f64 else tl.float32, BLOCK=block)
