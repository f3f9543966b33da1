"""Plain-PyTorch reference for every per-element op. The compiled kernels implement these signatures.

Kernels derive nothing: every coefficient arrives precomputed (see ``glass_fast.plan``).
"""
from __future__ import annotations

import torch

# Column order of a fused-step coefficient row.
K_BASE, K_STAGE, K_XT, K_OUT, N_XT, N_NEW = range(6)
NUM_COEFS = 6


def _per_sample(coef: torch.Tensor, col: int, like: torch.Tensor) -> torch.Tensor:
    """Column ``col`` of ``coef`` ([6] or [B, 6]) shaped to broadcast against ``like`` ([B, ...])."""
    c = coef[..., col]
    if c.dim() == 0:
        return c
    return c.reshape((-1,) + (1,) * (like.dim() - 1))


def fused_step(base: torch.Tensor, out: torch.Tensor, coef: torch.Tensor,
               x_t: torch.Tensor | None = None, stage: torch.Tensor | None = None):
    """One sampler stage as two linear combinations.

        new    = k_base * base + k_stage * stage + k_xt * x_t + k_out * out
        y_next = n_xt * x_t + n_new * new

    Args:
        base: [B, ...] state the stage updates (xbar for GLASS, x for ODE/SDE).
        out: [B, ...] model output (or noise / denoised estimate), any float dtype.
        coef: [6] or [B, 6] coefficients (k_base, k_stage, k_xt, k_out, n_xt, n_new).
        x_t: [B, ...] the transition's conditioning state, or None (its terms vanish).
        stage: [B, ...] an intermediate state (midpoint / Heun predictor, SDE noise), or None.
    Returns:
        (new [B, ...] in base.dtype, y_next [B, ...] in out.dtype): the updated state and the next
        model input.
    """
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    c = coef.to(acc)
    new = _per_sample(c, K_BASE, base) * base.to(acc) + _per_sample(c, K_OUT, out) * out.to(acc)
    if stage is not None:
        new = new + _per_sample(c, K_STAGE, stage) * stage.to(acc)
    if x_t is None:
        y = _per_sample(c, N_NEW, new) * new
    else:
        xt = x_t.to(acc)
        new = new + _per_sample(c, K_XT, xt) * xt
        y = _per_sample(c, N_NEW, new) * new + _per_sample(c, N_XT, xt) * xt
    return new.to(base.dtype), y.to(out.dtype)
