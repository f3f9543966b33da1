"""Helpers to test op backends against the reference (used by tests/test_ops*.py).

Accuracy rule for reduced precision (the flash-attention rule): a kernel's error against a float64
ground truth may be at most twice the plain-PyTorch reference's error at the same precision, plus a
tiny absolute floor that covers results the reference gets exactly right.
"""
from __future__ import annotations

import sys

import torch

from ._backend import _interpret, unavailable_reason

# Floor per dtype (absolute, for O(1) data): a few float32 ulps; reduced precision adds nothing.
FLOORS = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-6, torch.bfloat16: 1e-6}
# Triton's CPU interpreter rounds float32 -> bfloat16 by truncation (the GPU compiler rounds to
# nearest even), which costs up to one extra bfloat16 ulp per stored value.
INTERPRETER_BF16_ULPS = 1.0


def triton_interpreter_active() -> bool:
    """TRITON_INTERPRET is set (1, true, on or yes, as Triton reads it) and was set when triton was
    imported.

    Triton decides per jitted function, at decoration, whether it is interpreted; its own library
    functions (tl.sum, tl.cumsum, ...) are decorated when triton is first imported, so setting the
    variable after that import leaves them compiled-only and CPU launches fail.
    """
    if not _interpret():
        return False
    if "triton" not in sys.modules:
        return True
    from triton.language import standard
    return type(standard.max).__name__ == "InterpretedFunction"


def backend_devices() -> list[tuple[str, str]]:
    """(backend, device) pairs whose compiled kernels can run here, e.g. [("cpp", "cpu"), ...]."""
    pairs = []
    for device in ("cpu", "cuda"):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        for backend in ("cpp", "triton", "cuda"):
            if backend == "triton" and device == "cpu" and not triton_interpreter_active():
                continue
            if unavailable_reason(backend, device) is None:
                pairs.append((backend, device))
    return pairs


ALL_PAIRS = (("cpp", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda"))


def backend_device_params():
    """pytest params (backend, device) for every compiled backend; those that cannot run here are
    skipped with the reason, and the CUDA ones carry the ``gpu`` mark."""
    import pytest

    available = backend_devices()
    params = []
    for backend, device in ALL_PAIRS:
        marks = [pytest.mark.gpu] if device == "cuda" else []
        if (backend, device) not in available:
            if device == "cuda" and not torch.cuda.is_available():
                why = "no CUDA device"
            elif backend == "triton" and device == "cpu" and not triton_interpreter_active():
                why = ("Triton CPU runs need TRITON_INTERPRET=1 set before triton is imported (see "
                       "test_triton_cpu_kernels_in_a_fresh_interpreter)")
            else:
                why = unavailable_reason(backend, device) or "not available"
            marks.append(pytest.mark.skip(reason=f"{backend} on {device}: {why}"))
        params.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    return params


def interpreted(backend: str, device: str) -> bool:
    """True when Triton runs under its CPU interpreter."""
    return backend == "triton" and device == "cpu" and _interpret()


def assert_within_reference_error(got: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor,
                                  name: str = "result", extra_ulps: float = 0.0) -> None:
    """Assert max|got - truth| <= 2 max|ref - truth| + floor (+ extra_ulps of got's dtype).

    Args:
        got: kernel result (any shape, any float dtype).
        ref: reference result in the same dtype as ``got``.
        truth: float64 ground truth of the same shape.
        extra_ulps: additional allowance in units of eps(got.dtype) * max|truth|.
    """
    assert got.dtype == ref.dtype, f"{name}: dtype {got.dtype} != reference dtype {ref.dtype}"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    truth = truth.to(torch.float64).cpu()
    err = (got.detach().cpu().to(torch.float64) - truth).abs().max().item() if got.numel() else 0.0
    err_ref = (ref.detach().cpu().to(torch.float64) - truth).abs().max().item() if ref.numel() else 0.0
    scale = truth.abs().max().item() if truth.numel() else 0.0
    bound = 2.0 * err_ref + FLOORS[got.dtype] * max(scale, 1.0)
    bound += extra_ulps * torch.finfo(got.dtype).eps * scale
    assert err <= bound, (f"{name}: max error {err:.3e} vs float64 truth exceeds the bound {bound:.3e} "
                          f"(reference error {err_ref:.3e}, dtype {got.dtype})")
