"""Argument checks at the public op boundary (metadata only: shapes, dtypes, devices; no values).

Each message names the argument, the value it had and what is allowed. The compiled kernels trust
what passes here (they repeat the cheap checks in C++ for direct torch.ops callers).
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ALLOWED = "float32, float16, bfloat16, float64"


def _tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _float(t: torch.Tensor, name: str) -> None:
    _tensor(t, name)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; allowed: {_ALLOWED}")


def _same(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str, *, dtype: bool) -> None:
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has shape "
                         f"{tuple(ref.shape)}; they must be equal")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                         "all tensors of an op must share a device")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; "
                        "they must be equal")


def _written(t: torch.Tensor, name: str) -> None:
    """An output written in place must not repeat an element (an expanded view, stride 0): the op
    would fail half done, after writing other outputs."""
    if any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride())):
        raise ValueError(f"{name} has shape {tuple(t.shape)} and strides {tuple(t.stride())}: an expanded "
                         f"view, whose elements share memory, cannot be written in place; pass "
                         f"{name}.clone() or a new buffer")


def fused_step(base, out, coef, x_t, stage, y_out=None, in_place=False) -> None:
    _float(base, "base")
    _float(out, "out")
    _same(out, base, "out", "base", dtype=False)
    for t, name in ((x_t, "x_t"), (stage, "stage")):
        if t is not None:
            _float(t, name)
            _same(t, base, name, "base", dtype=True)
    _tensor(coef, "coef")
    if coef.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"coef has dtype {coef.dtype}; allowed: float32, float64")
    if coef.device != base.device:
        raise ValueError(f"coef is on {coef.device} but base is on {base.device}; per-step "
                         "coefficients must live on the data's device (no host transfer per step)")
    shared = coef.dim() == 1 and coef.shape[0] == 6
    per_sample = (coef.dim() == 2 and coef.shape[1] == 6 and base.dim() >= 1
                  and coef.shape[0] == base.shape[0])
    if not (shared or per_sample):
        b = base.shape[0] if base.dim() >= 1 else "base.shape[0]"
        raise ValueError(f"coef has shape {tuple(coef.shape)}; allowed: [6] or [B, 6] with B = {b}")
    if y_out is not None:
        _float(y_out, "y_out")
        _same(y_out, base, "y_out", "base", dtype=False)
        if y_out.dtype != out.dtype:
            raise TypeError(f"y_out has dtype {y_out.dtype} but out has dtype {out.dtype}; "
                            "they must be equal")
        _written(y_out, "y_out")
    if in_place:
        _written(base, "base")


def log_weights(log_w) -> None:
    _float(log_w, "log_w")
    if log_w.dim() != 2 or log_w.shape[1] < 1:
        raise ValueError(f"log_w has shape {tuple(log_w.shape)}; allowed: [B, K] with K >= 1")


def resample(log_w, uniforms, scheme, schemes) -> None:
    log_weights(log_w)
    _float(uniforms, "uniforms")
    _same(uniforms, log_w, "uniforms", "log_w", dtype=False)
    if scheme not in schemes:
        raise ValueError(f"scheme={scheme!r} is not a resampling scheme; allowed: {', '.join(schemes)}")


def gather(x, idx, scratch=None) -> None:
    _tensor(x, "x")
    _tensor(idx, "idx")
    if x.dim() < 2:
        raise ValueError(f"x has shape {tuple(x.shape)}; allowed: [B, K, ...]")
    if idx.dtype != torch.int64:
        raise TypeError(f"idx has dtype {idx.dtype}; allowed: torch.int64")
    if idx.dim() != 2 or tuple(idx.shape) != tuple(x.shape[:2]):
        raise ValueError(f"idx has shape {tuple(idx.shape)} but x has shape {tuple(x.shape)}; "
                         "idx must be [B, K] = x.shape[:2]")
    if idx.device != x.device:
        raise ValueError(f"idx is on {idx.device} but x is on {x.device}; all tensors of an op must "
                         "share a device")
    if scratch is not None:
        _tensor(scratch, "scratch")
        _same(scratch, x, "scratch", "x", dtype=True)
        _written(x, "x")


# Argument names of the in-place ops, in the order their tensors reach no_gradient.
_IN_PLACE_ARGS = {"fused_step_": ("base", "out", "coef", "x_t", "stage", "y_out"),
                  "gather_particles_": ("x", "scratch")}


def no_gradient(op: str, backend: str, *tensors) -> None:
    """The compiled in-place ops cannot record a gradient for what they overwrite (the out-of-place ops
    raise at backward instead): refuse inputs that need one rather than drop it silently."""
    if not torch.is_grad_enabled():
        return
    names = _IN_PLACE_ARGS.get(op, ())
    needy = [names[i] if i < len(names) else f"argument {i}" for i, t in enumerate(tensors)
             if t is not None and t.requires_grad]
    if needy:
        which = ", ".join(needy)
        raise RuntimeError(f"{op} on the {backend!r} backend has no derivative, but {which} "
                           f"{'has' if len(needy) == 1 else 'have'} requires_grad=True; call it under "
                           f"torch.no_grad(), detach {which}, or use the 'reference' backend "
                           "(differentiable)")
