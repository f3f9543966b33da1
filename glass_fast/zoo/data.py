"""The 8x8 handwritten digits, shipped with the package so nothing at run time needs scikit-learn.

``weights/digits.safetensors`` holds the 1,797 images of scikit-learn's ``load_digits`` as uint8
(values 0..16), their labels, and a fixed held-out test mask (seeded, 20 %). The mask is stored
rather than recomputed so the split never depends on a random-number implementation.
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch
from safetensors.torch import load_file

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
DIGITS_FILE = os.path.join(WEIGHTS_DIR, "digits.safetensors")
SPLITS = ("train", "test", "all")
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """Map raw pixel values 0..16 to [-1, 1] (the data range the flow model is trained on)."""
    return pixels.float() / 8.0 - 1.0


def to_pixel_range(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_model_range`, clamped to 0..16 (for display)."""
    return ((x.float() + 1.0) * 8.0).clamp(0.0, 16.0)


def make_test_mask(n: int, seed: int = SPLIT_SEED, fraction: float = TEST_FRACTION) -> torch.Tensor:
    """A seeded boolean mask selecting ``round(fraction * n)`` images for the test split."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[perm[: round(fraction * n)]] = True
    return mask


@lru_cache(maxsize=1)
def _load_raw() -> dict:
    if not os.path.exists(DIGITS_FILE):
        raise FileNotFoundError(
            f"digit images not found at {DIGITS_FILE}; regenerate them with `python -m glass_fast.zoo.train`"
        )
    return load_file(DIGITS_FILE)


def real_digits(split: str = "test", digit: int | None = None, *, device="cpu",
                dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Real 8x8 digit images in the model's range, with labels.

    Args:
        split: "train" (1,438 images), "test" (359 held-out images) or "all" (1,797).
        digit: keep only images of this digit (0..9); None keeps all.
        device, dtype: where and in which floating dtype to return the images.

    Returns:
        images [N, 1, 8, 8] in [-1, 1], labels [N] (int64).

    Example:
        >>> x, y = real_digits("test")
        >>> x.shape[1:]
        torch.Size([1, 8, 8])
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not allowed; use one of {SPLITS}")
    if digit is not None and (isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit <= 9):
        raise ValueError(f"digit={digit!r} is not allowed; use an int in 0..9 or None")
    raw = _load_raw()
    images, labels, test = raw["images"], raw["labels"].long(), raw["test_mask"].bool()
    keep = torch.ones_like(test) if split == "all" else (test if split == "test" else ~test)
    if digit is not None:
        keep = keep & (labels == digit)
    x = to_model_range(images[keep]).unsqueeze(1).to(device=device, dtype=dtype)
    return x, labels[keep].to(device)
