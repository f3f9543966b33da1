"""Loading the shipped digit models and wrapping them for glass_fast.

Everything here reads safetensors files from ``weights/``: no network, no scikit-learn.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .data import WEIGHTS_DIR
from .nets import DigitClassifier, DigitsVelocityNet

FLOW_FILE = os.path.join(WEIGHTS_DIR, "flow.safetensors")
CLASSIFIER_FILE = os.path.join(WEIGHTS_DIR, "classifier.safetensors")


def _resolve(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device)
    if isinstance(dtype, str):
        name = dtype
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype={name!r} is not a torch dtype; use e.g. 'float32', 'float64', 'bfloat16'")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not allowed; use a floating torch dtype or its name, e.g. 'float32'")
    return device, dtype


def _load(cls, path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights not found at {path}; regenerate them with `python -m glass_fast.zoo.train`")
    with safe_open(path, framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    net = cls(**config)
    net.load_state_dict(load_file(path))
    net.requires_grad_(False)  # frozen: gradients flow to inputs only (reward guidance)
    return net.eval()


def load_digits_velocity_net(device="cpu", dtype=torch.float32) -> DigitsVelocityNet:
    """The trained velocity network (a plain ``nn.Module``: x [B, 1, 8, 8], t [B] -> u [B, 1, 8, 8])."""
    device, dtype = _resolve(device, dtype)
    return _load(DigitsVelocityNet, FLOW_FILE).to(device=device, dtype=dtype)


@lru_cache(maxsize=8)
def _cached_classifier(device: torch.device, dtype: torch.dtype) -> DigitClassifier:
    return _load(DigitClassifier, CLASSIFIER_FILE).to(device=device, dtype=dtype)


def load_digit_classifier(device="cpu", dtype=torch.float32) -> DigitClassifier:
    """The trained classifier (frozen, eval mode; shared between callers on the same device/dtype).

    Args:
        device, dtype: placement of the weights.

    Returns:
        :class:`DigitClassifier`: x [N, 1, 8, 8] in [-1, 1] -> logits [N, 10]; ``.features(x)`` -> [N, 64].
    """
    return _cached_classifier(*_resolve(device, dtype))


def digits_flow_model(device="cpu", dtype=torch.float32):
    """The shipped digits flow model as a :class:`glass_fast.FlowModel`.

    Linear schedule (x_t = t z + (1 - t) eps, t=0 noise, t=1 data), velocity prediction, data in
    [-1, 1] of shape [B, 1, 8, 8].

    Example:
        >>> import torch, glass_fast
        >>> from glass_fast.zoo import digits_flow_model
        >>> model = digits_flow_model()
        >>> x = glass_fast.sample(model, torch.randn(4, 1, 8, 8), method="ode")
    """
    from glass_fast import FlowModel, LinearSchedule  # the core API; imported late to avoid a cycle

    device, dtype = _resolve(device, dtype)
    net = load_digits_velocity_net(device, dtype)
    return FlowModel(net, LinearSchedule(), prediction="velocity", dtype=dtype)


def _check_digit(digit) -> int:
    if isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit <= 9:
        raise ValueError(f"digit={digit!r} is not allowed; use an int in 0..9")
    return digit


def digit_log_probs(x: torch.Tensor, classifier: DigitClassifier | None = None) -> torch.Tensor:
    """Class log-probabilities of images x [..., 1, 8, 8]. Returns [..., 10]."""
    if x.shape[-3:] != (1, 8, 8):
        raise ValueError(f"x has shape {tuple(x.shape)}; expected [..., 1, 8, 8]")
    if not x.is_floating_point():   # else reported as a bad dtype= (the classifier's follows x's)
        raise TypeError(f"x must be floating images in [-1, 1] (see to_model_range), got {x.dtype}")
    clf = classifier if classifier is not None else load_digit_classifier(x.device, x.dtype)
    lead = x.shape[:-3]
    return torch.log_softmax(clf(x.reshape(-1, 1, 8, 8)), dim=-1).reshape(*lead, 10)


class DigitReward:
    """Reward r(x) = log p(digit | x) under the shipped classifier (differentiable in x).

    Args:
        digit: the target class, 0..9.

    Call with x [..., 1, 8, 8]; returns [...] (float, <= 0).
    """

    def __init__(self, digit: int):
        self.digit = _check_digit(digit)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return digit_log_probs(x)[..., self.digit]

    def __repr__(self) -> str:
        return f"DigitReward(digit={self.digit})"


def digit_reward(digit: int) -> DigitReward:
    """Reward callable for steering toward ``digit``: x [N, 1, 8, 8] -> log p(digit | x) [N].

    Example:
        >>> r = digit_reward(3)
        >>> r(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2])
    """
    return DigitReward(digit)
