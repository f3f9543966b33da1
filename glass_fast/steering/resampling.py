"""Grouped resampling for particle systems: ESS, ancestor indices, gathering. On device.

The per-group arithmetic (normalisation, the four schemes, the gather) lives in ``glass_fast.ops`` with a
plain-PyTorch reference and compiled backends; this module draws the uniforms, validates public input and
implements the ESS-adaptive step used inside Feynman-Kac steering. That step never synchronises the host;
the public ``resample`` reads one flag to refuse weights without a distribution (NaN, +inf, all zero).
"""
from __future__ import annotations

import math

import torch

from ..ops import gather_particles, normalize_log_weights, resample_indices

SCHEMES = ("multinomial", "stratified", "systematic", "residual")


def check_scheme(scheme, name: str = "scheme") -> str:
    """``scheme`` if it is one of ``SCHEMES``; ``name``: the argument that took it, for the error."""
    if scheme not in SCHEMES:
        raise ValueError(f"{name} must be one of {SCHEMES}, got {scheme!r}")
    return scheme


def _check_log_weights(log_weights) -> torch.Tensor:
    if not isinstance(log_weights, torch.Tensor) or not log_weights.is_floating_point() or log_weights.dim() != 2:
        got = (f"{log_weights.dtype} of shape {tuple(log_weights.shape)}" if isinstance(log_weights, torch.Tensor)
               else type(log_weights).__name__)
        raise ValueError(f"log_weights must be a floating Tensor[B, K], got {got}")
    if log_weights.shape[1] < 1:
        raise ValueError(f"log_weights must hold K >= 1 particles per group, got shape {tuple(log_weights.shape)}")
    return log_weights


def ess(log_weights: torch.Tensor) -> torch.Tensor:
    """Effective sample size (sum w)^2 / sum w^2 of each group.

    Args:
        log_weights: [B, K] unnormalised log-weights (-inf is a zero weight).
    Returns:
        [B] ESS in [1, K] (NaN for a group whose weights are all zero).

    Example:
        >>> ess(torch.log(torch.tensor([[0.5, 0.5, 0.0]])))   # tensor([2.])
    """
    return normalize_log_weights(_check_log_weights(log_weights))[1]


def uniforms(shape, generator, device) -> torch.Tensor:
    """float64 uniforms in [0, 1) for the resampling positions."""
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float64)


def resample(log_weights: torch.Tensor, scheme: str = "systematic",
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestor indices of grouped resampling: particle k of group b is replaced by particle idx[b, k].

    Every scheme is unbiased (E[#copies of j] = K w_j); stratified, systematic and residual have lower
    offspring variance than multinomial.

    Args:
        log_weights: [B, K] unnormalised log-weights.
        scheme: "multinomial" | "stratified" | "systematic" | "residual".
        generator: source of the uniforms (on log_weights' device).
    Returns:
        LongTensor[B, K] of indices in [0, K).
    Raises:
        ValueError: a group with a NaN or +inf log-weight, or whose weights are all zero (one host read; the
            ESS-adaptive step inside FK steering does not use this function and never synchronises).

    Example:
        >>> idx = resample(torch.randn(4, 8), "systematic")
        >>> particles = gather(particles, idx)
    """
    check_scheme(scheme)
    check_distribution(log_weights, generator)
    u = uniforms(log_weights.shape, generator, log_weights.device)
    return resample_indices(log_weights, u, scheme)


def check_distribution(log_weights, generator=None) -> torch.Tensor:
    """Log-weights [B, K] to draw from, and the generator to draw with: every group finite or -inf (a zero
    weight) with at least one finite (ValueError naming the group; one host read). NaN or +inf weights, or a
    group of zero weights, have no distribution to draw from: the index arithmetic would return arbitrary
    particles instead of failing."""
    _check_log_weights(log_weights)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    valid = ~(torch.isnan(log_weights) | torch.isposinf(log_weights)).any(-1) & ~torch.isneginf(log_weights).all(-1)
    if not bool(valid.all()):
        g = int((~valid).nonzero()[0, 0])
        raise ValueError(f"log_weights of group {g} must be finite or -inf (a zero weight), with at least one "
                         f"finite, got {log_weights[g].tolist()}")
    return log_weights


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[b, idx[b, k]] for grouped particles x [B, K, ...] and indices [B, K]."""
    return gather_particles(x, idx)


class AdaptiveResampler:
    """One ESS-adaptive resampling step for FK steering, branch-free so the whole loop can be captured.

    Every group computes its ancestors; groups whose ESS is above the threshold keep the identity instead
    (``torch.where``), and only resampled groups reset their log-weights to log(1/K). Groups whose weights
    are all zero (NaN ESS) resample from uniform weights so the arithmetic stays finite, and keep their
    -inf log-weights; the caller records them and raises after the loop.

    Args:
        groups, particles: B and K.
        scheme: resampling scheme.
        threshold: resample a group when ESS < threshold * K; 1 resamples every group at every call.
        device: where the particles live.
    """

    def __init__(self, groups: int, particles: int, scheme: str, threshold: float, device):
        self.scheme, self.threshold, self.k = scheme, threshold, particles
        self.identity = torch.arange(particles, device=device).expand(groups, particles)
        self.reset = -math.log(particles)

    def __call__(self, log_w: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(ancestor indices [B, K], new log-weights [B, K]) for log-weights [B, K]."""
        dead = torch.isneginf(log_w).all(dim=-1, keepdim=True)
        safe = torch.where(dead, torch.zeros_like(log_w), log_w)
        _, e = normalize_log_weights(safe)
        need = torch.ones_like(dead) if self.threshold >= 1.0 else (e < self.threshold * self.k).unsqueeze(-1)
        idx = resample_indices(safe, uniforms(log_w.shape, generator, log_w.device), self.scheme)
        idx = torch.where(need, idx, self.identity)
        # A dead group stays dead (all -inf) so the caller's record and the returned weights agree.
        return idx, torch.where(need & ~dead, torch.full_like(log_w, self.reset), log_w)
