"""torch.library registration: fake kernels for the C++/CUDA ops and the Triton custom ops.

The C++ extension declares every schema in csrc/glass_fast.cpp (namespace ``glass_fast``); its fake
(shape-only) kernels are registered here once the extension loads. The Triton backend defines the
same ops under ``glass_fast_triton`` with ``torch.library.custom_op``. Both namespaces share one set
of fakes, so ``torch.compile(fullgraph=True)`` traces any backend without running it. Fakes allocate
contiguous outputs, like the kernels.
"""
from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys

import torch
from torch import Tensor

from . import _checks
from .reference import RESAMPLING_SCHEMES


def _kernels(name: str):
    """glass_fast.kernels.<name>; from a source checkout (kernels/ beside glass_fast/, not installed,
    e.g. after `python setup.py build_ext --inplace`) the package is loaded from that folder."""
    try:
        return importlib.import_module(f"glass_fast.kernels.{name}")
    except ModuleNotFoundError as exc:
        src = pathlib.Path(__file__).resolve().parents[2] / "kernels"
        if exc.name != "glass_fast.kernels" or not (src / "__init__.py").is_file():
            raise
        spec = importlib.util.spec_from_file_location("glass_fast.kernels", src / "__init__.py",
                                                      submodule_search_locations=[str(src)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["glass_fast.kernels"] = module
        spec.loader.exec_module(module)
        return importlib.import_module(f"glass_fast.kernels.{name}")


def _fake_fused_step(base: Tensor, out: Tensor, coef: Tensor, x_t: Tensor | None,
                     stage: Tensor | None) -> tuple[Tensor, Tensor]:
    new = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    y = torch.empty(base.shape, dtype=out.dtype, device=base.device)
    return new, y


def _fake_fused_step_(base: Tensor, out: Tensor, coef: Tensor, x_t: Tensor | None,
                      stage: Tensor | None, y_out: Tensor) -> None:
    return None


def _fake_normalize(log_w: Tensor) -> tuple[Tensor, Tensor]:
    return (torch.empty(log_w.shape, dtype=log_w.dtype, device=log_w.device),
            torch.empty(log_w.shape[:1], dtype=log_w.dtype, device=log_w.device))


def _fake_resample(log_w: Tensor, uniforms: Tensor, scheme: str) -> Tensor:
    return torch.empty(log_w.shape, dtype=torch.int64, device=log_w.device)


def _fake_gather(x: Tensor, idx: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _fake_gather_(x: Tensor, idx: Tensor, scratch: Tensor) -> None:
    return None


FAKES = {
    "fused_step": _fake_fused_step,
    "fused_step_": _fake_fused_step_,
    "normalize_log_weights": _fake_normalize,
    "resample_indices": _fake_resample,
    "gather_particles": _fake_gather,
    "gather_particles_": _fake_gather_,
}

_extension_fakes_done = False


def register_extension_fakes() -> None:
    """Register the fakes of torch.ops.glass_fast.* (called once, after glass_fast._C loads)."""
    global _extension_fakes_done
    if _extension_fakes_done:
        return
    for name, fn in FAKES.items():
        torch.library.register_fake(f"glass_fast::{name}")(fn)
    _extension_fakes_done = True


# ---------------------------------------------------------------------------------------------
# Triton custom ops. The kernels module is imported on first use, so TRITON_INTERPRET set before
# that first call decides whether the kernels run compiled (CUDA) or interpreted (CPU tests).
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("glass_fast_triton::fused_step", mutates_args=())
def triton_fused_step(base: Tensor, out: Tensor, coef: Tensor, x_t: Tensor | None,
                      stage: Tensor | None) -> tuple[Tensor, Tensor]:
    _checks.fused_step(base, out, coef, x_t, stage)  # as the C++ ops, for direct torch.ops callers
    fused_step_triton = _kernels("fused_step").fused_step_triton
    new = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    y = torch.empty(base.shape, dtype=out.dtype, device=base.device)
    fused_step_triton(base, out, coef, x_t, stage, new, y)
    return new, y


def _overwrites_unread(dst: Tensor, inputs) -> bool:
    """Writing contiguous ``dst`` element by element could change a contiguous input before it is
    read: they share memory other than element for element (a shifted view, another dtype). Strided
    inputs are copied before the kernel writes. The C++ twin is in csrc/fused_step_entry.h."""
    if not dst.is_contiguous():
        return False
    for t in inputs:
        if t is not None and t.is_contiguous() and torch._C._overlaps(dst, t) and not (
                t.data_ptr() == dst.data_ptr() and t.dtype == dst.dtype):
            return True
    return False


@torch.library.custom_op("glass_fast_triton::fused_step_", mutates_args=("base", "y_out"))
def triton_fused_step_(base: Tensor, out: Tensor, coef: Tensor, x_t: Tensor | None,
                       stage: Tensor | None, y_out: Tensor) -> None:
    _checks.fused_step(base, out, coef, x_t, stage, y_out, in_place=True)
    fused_step_triton = _kernels("fused_step").fused_step_triton
    # In place where outputs and inputs share memory element for element; otherwise through new
    # buffers copied back in the reference's order (new, then y_next).
    inputs = (base, out, x_t, stage)
    direct = not (_overwrites_unread(base, inputs) or _overwrites_unread(y_out, inputs))
    new = base if base.is_contiguous() and direct else torch.empty(base.shape, dtype=base.dtype,
                                                                   device=base.device)
    # A new copied back after the kernel would overwrite the y_next the kernel wrote into a y_out that
    # shares memory with base (a strided base): such a y_next is copied back too, after new.
    y_direct = direct and y_out.is_contiguous() and (new is base or not torch._C._overlaps(y_out, base))
    y = y_out if y_direct else torch.empty(base.shape, dtype=y_out.dtype, device=base.device)
    fused_step_triton(base, out, coef, x_t, stage, new, y)
    if new is not base:
        base.copy_(new)
    if y is not y_out:
        y_out.copy_(y)


@torch.library.custom_op("glass_fast_triton::normalize_log_weights", mutates_args=())
def triton_normalize_log_weights(log_w: Tensor) -> tuple[Tensor, Tensor]:
    _checks.log_weights(log_w)
    return _kernels("resample").normalize_log_weights_triton(log_w)


@torch.library.custom_op("glass_fast_triton::resample_indices", mutates_args=())
def triton_resample_indices(log_w: Tensor, uniforms: Tensor, scheme: str) -> Tensor:
    _checks.resample(log_w, uniforms, scheme, RESAMPLING_SCHEMES)
    return _kernels("resample").resample_indices_triton(log_w, uniforms, scheme)


@torch.library.custom_op("glass_fast_triton::gather_particles", mutates_args=())
def triton_gather_particles(x: Tensor, idx: Tensor) -> Tensor:
    _checks.gather(x, idx)
    gather_particles_triton = _kernels("gather").gather_particles_triton
    res = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    gather_particles_triton(x, idx, res)
    return res


@torch.library.custom_op("glass_fast_triton::gather_particles_", mutates_args=("x", "scratch"))
def triton_gather_particles_(x: Tensor, idx: Tensor, scratch: Tensor) -> None:
    _checks.gather(x, idx, scratch)
    gather_particles_triton = _kernels("gather").gather_particles_triton
    # Staging needs a contiguous scratch apart from x (it may be x itself, overlap it, or be an
    # expanded view that cannot be written), and idx apart from both (staging or the gather would
    # change ancestors not yet read); otherwise, and for a strided x, gather into a new tensor, which
    # gives the reference's result (as the C++ op does).
    if (x.is_contiguous() and scratch.is_contiguous() and not torch._C._overlaps(scratch, x)
            and not torch._C._overlaps(scratch, idx) and not torch._C._overlaps(x, idx)):
        scratch.copy_(x)
        gather_particles_triton(scratch, idx, x)
    else:
        x.copy_(triton_gather_particles(x, idx))


for _name, _fn in FAKES.items():
    torch.library.register_fake(f"glass_fast_triton::{_name}")(_fn)


def op(backend: str, name: str):
    """The OpOverloadPacket running op ``name`` on ``backend`` ("cpp", "cuda" or "triton")."""
    ns = torch.ops.glass_fast_triton if backend == "triton" else torch.ops.glass_fast
    return getattr(ns, name)
