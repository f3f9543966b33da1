"""Per-element and particle ops used between model calls, behind one backend switch.

Every op has a plain-PyTorch reference (``glass_fast.ops.reference``) and compiled versions: C++
(CPU), CUDA and Triton, all registered with torch.library so ``torch.compile(fullgraph=True)`` traces
through them. ``GLASS_FAST_BACKEND`` (auto | cuda | triton | cpp | reference) or ``use_backend``
chooses; see ``glass_fast.ops._backend``. No op synchronises with the host.

Only the reference is differentiable: through a compiled backend, backward raises ("derivative for
glass_fast::<op> is not implemented", or Triton's "no autograd formula"), and the in-place ops refuse
arguments that require grad (under grad mode) instead of dropping their gradient.

Example::

    import torch
    from glass_fast import ops
    x, out = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    coef = torch.tensor([1.0, 0.0, 0.0, 0.1, 0.0, 1.0])   # Euler: new = x + 0.1 * out; y = new
    new, y = ops.fused_step(x, out, coef)
    with ops.use_backend("reference"):
        new_ref, _ = ops.fused_step(x, out, coef)
"""
from __future__ import annotations

import torch

from . import _checks, _library, reference
from ._backend import (BACKENDS, ENV_VAR, BackendUnavailableError, available_backends,
                       requested_backend, resolve_backend, set_backend, use_backend)
from .reference import NUM_COEFS, RESAMPLING_SCHEMES

__all__ = [
    "fused_step", "fused_step_", "fused_step_on", "normalize_log_weights", "resample_indices", "gather_particles",
    "gather_particles_", "NUM_COEFS", "RESAMPLING_SCHEMES", "BACKENDS", "ENV_VAR",
    "BackendUnavailableError", "available_backends", "requested_backend", "resolve_backend",
    "set_backend", "use_backend", "reference",
]


def fused_step(base: torch.Tensor, out: torch.Tensor, coef: torch.Tensor,
               x_t: torch.Tensor | None = None, stage: torch.Tensor | None = None):
    """One sampler stage in one pass (see ``reference.fused_step`` for the math).

    Args:
        base: [B, ...] state (float32/16, bfloat16, float64).
        out: [B, ...] model output, any float dtype.
        coef: [6] or [B, 6] float32/float64 (k_base, k_stage, k_xt, k_out, n_xt, n_new) on base's device.
        x_t: [B, ...] like base, or None.
        stage: [B, ...] like base, or None.
    Returns:
        (new in base.dtype, y_next in out.dtype), both [B, ...] and contiguous.
    """
    _checks.fused_step(base, out, coef, x_t, stage)
    return fused_step_on(resolve_backend(base.device.type), base, out, coef, x_t, stage)


def fused_step_on(backend: str, base: torch.Tensor, out: torch.Tensor, coef: torch.Tensor,
                  x_t: torch.Tensor | None = None, stage: torch.Tensor | None = None):
    """``fused_step`` on a backend already chosen (``resolve_backend``), without its argument checks.

    For a loop whose caller validated its inputs once, at its own public boundary (the sampler's stages:
    the state, the planned rows and the model's checked outputs): per stage the checks and the backend
    lookup cost more than the step itself on small tensors.

    The caller guarantees what ``_checks.fused_step`` would check: float32/16, bfloat16 or float64
    base and out of one shape on one device; x_t and stage like base (dtype included); coef float32 or
    float64 on base's device, [6] or [B, 6] with B = base.shape[0]. The cpp, cuda and triton ops repeat
    these checks themselves; the reference does not (it would broadcast shapes that differ).
    """
    if backend == "reference":
        return reference.fused_step(base, out, coef, x_t, stage)
    return _library.op(backend, "fused_step")(base, out, coef, x_t, stage)


def fused_step_(base: torch.Tensor, out: torch.Tensor, coef: torch.Tensor,
                x_t: torch.Tensor | None = None, stage: torch.Tensor | None = None,
                y_out: torch.Tensor | None = None) -> torch.Tensor:
    """In-place ``fused_step``: ``new`` overwrites ``base``; ``y_next`` goes to ``y_out``.

    Static buffers make it usable under CUDA-graph capture.

    Args:
        base, out, coef, x_t, stage: as in ``fused_step``.
        y_out: [B, ...] buffer of dtype out.dtype (may be ``out`` itself), or None to allocate. Outputs
            may share memory with inputs in any way: the result is that of computing new and y_next
            from the inputs first, then writing new into base and y_next into y_out.
    Returns:
        y_out (or the newly allocated y_next).
    """
    _checks.fused_step(base, out, coef, x_t, stage, y_out, in_place=True)
    backend = resolve_backend(base.device.type)
    if backend == "reference":
        return reference.fused_step_(base, out, coef, x_t, stage, y_out)
    _checks.no_gradient("fused_step_", backend, base, out, coef, x_t, stage, y_out)
    if y_out is None:
        y_out = torch.empty(base.shape, dtype=out.dtype, device=base.device)
    _library.op(backend, "fused_step_")(base, out, coef, x_t, stage, y_out)
    return y_out


def normalize_log_weights(log_w: torch.Tensor):
    """Per-group normalised log-weights and effective sample size.

    Args:
        log_w: [B, K] log-weights (-inf = zero weight).
    Returns:
        (log_w - logsumexp [B, K], ess [B]) in log_w.dtype; a group without valid weights (all -inf,
        or any NaN or +inf entry) gives NaN in every entry and in its ess.
    """
    _checks.log_weights(log_w)
    backend = resolve_backend(log_w.device.type)
    if backend == "reference":
        return reference.normalize_log_weights(log_w)
    return _library.op(backend, "normalize_log_weights")(log_w)


def resample_indices(log_w: torch.Tensor, uniforms: torch.Tensor, scheme: str) -> torch.Tensor:
    """Grouped ancestor indices (see ``reference.resample_indices`` for the exact definition).

    Args:
        log_w: [B, K] unnormalised log-weights.
        uniforms: [B, K] uniforms in [0, 1) (systematic uses column 0).
        scheme: "multinomial", "stratified", "systematic" or "residual".
    Returns:
        [B, K] int64 ancestors in [0, K), on log_w's device. A group without valid weights (all -inf,
        or any NaN or +inf entry) keeps its particles (ancestors 0..K-1) instead of garbage indices;
        ``normalize_log_weights`` shows it as NaN (the check is the caller's: no op syncs the host).
    """
    _checks.resample(log_w, uniforms, scheme, RESAMPLING_SCHEMES)
    backend = resolve_backend(log_w.device.type)
    if backend == "reference":
        return reference.resample_indices(log_w, uniforms, scheme)
    return _library.op(backend, "resample_indices")(log_w, uniforms, scheme)


def gather_particles(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """result[b, k] = x[b, idx[b, k]].

    Args:
        x: [B, K, ...] particles.
        idx: [B, K] int64 ancestors in [0, K).
    Returns:
        [B, K, ...] contiguous. An index outside [0, K) raises on CPU (every backend); on CUDA it is a
        device-side assert (cuda, reference) or an out-of-bounds read (triton), as checking it on the
        host would wait for the device.
    """
    _checks.gather(x, idx)
    backend = resolve_backend(x.device.type)
    if backend == "reference":
        return reference.gather_particles(x, idx)
    return _library.op(backend, "gather_particles")(x, idx)


def gather_particles_(x: torch.Tensor, idx: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """In place: x[b, k] <- x[b, idx[b, k]], staged through ``scratch`` (x's shape and dtype).

    Args:
        x: [B, K, ...] particles, overwritten.
        idx: [B, K] int64 ancestors.
        scratch: buffer like x; its contents are clobbered. It may be x itself or overlap x (then
            the op allocates instead of staging).
    Returns:
        x.
    """
    _checks.gather(x, idx, scratch)
    backend = resolve_backend(x.device.type)
    if backend == "reference":
        return reference.gather_particles_(x, idx, scratch)
    _checks.no_gradient("gather_particles_", backend, x, scratch)
    _library.op(backend, "gather_particles_")(x, idx, scratch)
    return x
