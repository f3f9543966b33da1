"""Small shipped models for examples, tests and benchmarks: an 8x8 digits flow model and a digit classifier.

Example:
    >>> import torch, glass_fast
    >>> from glass_fast.zoo import digits_flow_model, digit_reward
    >>> model = digits_flow_model()
    >>> x = glass_fast.sample(model, torch.randn(8, 1, 8, 8), method="glass")
    >>> digit_reward(3)(x).shape
    torch.Size([8])

Weights are reproduced by ``python -m glass_fast.zoo.train``.
"""
from .data import real_digits, to_model_range, to_pixel_range
from .metrics import class_diversity, confident_rate, digit_features, frechet_distance, frechet_to_real
from .models import (
    DigitReward,
    digit_log_probs,
    digit_reward,
    digits_flow_model,
    load_digit_classifier,
    load_digits_velocity_net,
)
from .nets import DigitClassifier, DigitsVelocityNet

__all__ = [
    "DigitClassifier",
    "DigitReward",
    "DigitsVelocityNet",
    "class_diversity",
    "confident_rate",
    "digit_features",
    "digit_log_probs",
    "digit_reward",
    "digits_flow_model",
    "frechet_distance",
    "frechet_to_real",
    "load_digit_classifier",
    "load_digits_velocity_net",
    "real_digits",
    "to_model_range",
    "to_pixel_range",
]
