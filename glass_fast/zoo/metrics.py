"""Sample-quality metrics in the shipped classifier's feature space (pure torch, no scipy).

- :func:`frechet_distance`: the Frechet (2-Wasserstein) distance between Gaussians fitted to two
  feature sets, |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2), with symmetric matrix
  square roots from ``torch.linalg.eigh`` in float64.
- :func:`digit_features`, :func:`frechet_to_real`: the same distance for images, against the real digits.
- :func:`confident_rate`, :func:`class_diversity`: how often the classifier is sure, and how many
  classes the samples effectively cover.
"""
from __future__ import annotations

import numbers

import torch

from .data import real_digits
from .models import digit_log_probs, load_digit_classifier


def _sqrtm_psd(mat: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix [D, D] (tiny negative eigenvalues -> 0)."""
    vals, vecs = torch.linalg.eigh((mat + mat.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def _gaussian_fit(feats: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] < 2:
        got = f"shape {tuple(feats.shape)}" if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ValueError(f"{name} has {got}; expected a Tensor [N, D] with N >= 2")
    if not bool(torch.isfinite(feats).all()):   # eigh would fail to converge, with no word of why
        raise ValueError(f"{name} holds NaN or Inf; a Frechet distance needs finite features")
    f = feats.detach().to(torch.float64)
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussian fits of two feature sets.

    Args:
        feats_a: features [N_a, D].
        feats_b: features [N_b, D] (same D).

    Returns:
        The distance as a Python float (>= 0; 0 for identical sets).

    Example:
        >>> a = torch.randn(500, 4, dtype=torch.float64)
        >>> round(frechet_distance(a, a + 1.0), 6)   # mean shift by 1 in 4 dims: |dmu|^2 = 4
        4.0
    """
    mu_a, cov_a = _gaussian_fit(feats_a, "feats_a")
    mu_b, cov_b = _gaussian_fit(feats_b, "feats_b")
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature widths differ: feats_a has D={mu_a.shape[0]}, feats_b has D={mu_b.shape[0]}")
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    value = (mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * torch.trace(cross)
    return max(float(value), 0.0)  # rounding can leave -1e-12 for identical sets


def _check_images(x) -> None:
    """Images [..., 1, 8, 8], at least one, floating and finite: a metric of NaN images (classified as digit 0)
    or of raw 0..16 pixels (clamped to [-1, 1] by the classifier) would be a number, silently meaningless."""
    if not isinstance(x, torch.Tensor) or x.dim() < 3 or x.shape[-3:] != (1, 8, 8) or x.numel() == 0:
        got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be images [N, 1, 8, 8] (N >= 1), got {got}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating images in [-1, 1] (see to_model_range), got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or Inf")


@torch.no_grad()
def digit_features(x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Penultimate-layer classifier features of images x [N, 1, 8, 8]. Returns [N, 64] (float32)."""
    _check_images(x)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    clf = load_digit_classifier(x.device, torch.float32)
    x = x.reshape(-1, 1, 8, 8).float()
    return torch.cat([clf.features(x[i:i + batch]) for i in range(0, len(x), batch)])


def frechet_to_real(x: torch.Tensor, digit: int | None = None, split: str = "test") -> float:
    """Frechet distance in classifier features between images x [N, 1, 8, 8] and real digits.

    Args:
        x: generated images [N, 1, 8, 8] in [-1, 1].
        digit: compare with real images of this digit only (None: all digits).
        split: which real images ("test", "train" or "all").

    Returns:
        The distance (float).
    """
    real, _ = real_digits(split, digit, device=x.device)
    return frechet_distance(digit_features(x), digit_features(real))


@torch.no_grad()
def confident_rate(x: torch.Tensor, threshold: float = 0.9) -> float:
    """Fraction of images x [N, 1, 8, 8] whose top class probability exceeds ``threshold`` (in [0, 1))."""
    _check_images(x)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 <= threshold < 1:
        raise ValueError(f"threshold must be a probability in [0, 1), got {threshold!r}")
    probs = digit_log_probs(x.float()).exp()
    return float((probs.max(-1).values > threshold).float().mean())


@torch.no_grad()
def class_diversity(x: torch.Tensor) -> float:
    """Effective number of classes among images x [N, 1, 8, 8]: exp(entropy of the predicted-class histogram).

    Ranges from 1 (all one class) to 10 (all classes equally often).
    """
    _check_images(x)
    pred = digit_log_probs(x.float()).argmax(-1).reshape(-1)
    freq = torch.bincount(pred, minlength=10).double() / pred.numel()
    entropy = -(freq[freq > 0] * freq[freq > 0].log()).sum()
    return float(entropy.exp())
