"""Reward guidance: gradient steering of the denoiser, for plain sampling and inside FK steering.

Every guidance form of MATH.md section 4 is the same shift of the denoiser at the model's time t:

    D'_t(y) = D_t(y) + scale * (sigma_t^2 / alpha_t) * grad r

- flow guidance u_r = u + c_t grad r with c_t = lmbda nu_t^2 / 2: since u is affine in D with slope
  (alpha' - alpha sigma'/sigma), the shift of D is c_t / (alpha' - alpha sigma'/sigma) = lmbda sigma^2/alpha;
- SDE guidance adds the same term to the drift, i.e. the same shift of the D the drift is built from;
- GLASS guidance inside the inner flow: beta_{t*} (sigma_{t*}^2 / alpha_{t*}) w2 grad, and w2 is the inner
  velocity's slope in D, so again a shift of D by beta sigma^2/alpha at the shifted time t*.

``scale`` plays lmbda (flow / SDE) or beta (GLASS). The sampler calls the hook after every model call with
the model input y and the raw output; since D = a_x y + a_o out, the hook returns out + shift / a_o.

Gradient: detached (default) is grad r at D, not through the network (the paper's choice at large
scale: no backward pass through the model); ``detach=False`` is grad_y r(D_t(y)) through the network,
which re-runs the model with gradients enabled: one extra model call per guided stage, counted in NFE.
"""
from __future__ import annotations

import math
import numbers

import torch

from ..model import FlowModel, coefficient_like, combine_output, denoiser_coefficients, opmath_dtype, solve_output
from .result import check_reward


def time_window(window, name: str) -> tuple[float, float]:
    """Validate a (lo, hi) pair of times with 0 <= lo <= hi <= 1."""
    try:
        lo, hi = (float(w) for w in window)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (lo, hi) of times, got {window!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"{name} must satisfy 0 <= lo <= hi <= 1, got {window!r}")
    return lo, hi


def inside_window(t, window: tuple[float, float]):
    """t (a float or a Tensor) in the closed window. A grid time given as an edge counts although the float64
    grid rounds it (11 / 20 is 0.5499999999999999, 3 * 0.2 is 0.6000000000000001): hence the slack, far below
    any step."""
    lo, hi = window
    return (t >= lo - 1e-9) & (t <= hi + 1e-9)


class RewardGuidance:
    """Shift the denoiser along the reward gradient on a window of model times.

    Args:
        reward: callable(x [N, ...]) -> Tensor[N], differentiable; larger is better. D reaches it in the
            network's dtype, or in float32 for a network run in half precision by ``FlowModel(dtype=...)`` beside
            a float32 state (as FK steering's scores do).
        scale: guidance strength (lmbda for flow / SDE guidance, beta for GLASS guidance), finite.
        window: (lo, hi) model times t in [0, 1] where guidance is on (the paper: (0.2, 0.7)).
        detach: True: gradient of r at D (no backward through the network); False: through the network.

    Example:
        >>> g = RewardGuidance(lambda x: x[:, 0], scale=0.5)
        >>> x = glass_fast.sample(model, torch.randn(64, 2), guidance=g)
        >>> res = glass_fast.fk_steering(model, reward, torch.randn(4, 8, 2), guidance=g)
    """

    def __init__(self, reward, scale: float, window=(0.2, 0.7), detach: bool = True):
        if not callable(reward):
            raise TypeError(f"RewardGuidance: reward must be callable, got {type(reward).__name__}")
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise ValueError(f"RewardGuidance: scale must be a finite number, got {scale!r}")
        if not isinstance(detach, bool):
            raise ValueError(f"RewardGuidance: detach must be True or False, got {detach!r}")
        self.reward, self.scale, self.detach = reward, float(scale), detach
        self.window = time_window(window, "RewardGuidance: window")

    def __repr__(self) -> str:
        return f"RewardGuidance(scale={self.scale}, window={self.window}, detach={self.detach})"

    def active(self, t_host: torch.Tensor) -> bool:
        """Whether any model time in ``t_host`` (host float64) lies in the window."""
        return bool(torch.any(inside_window(t_host, self.window)))

    def _coefficient(self, model: FlowModel, t_host: torch.Tensor, like: torch.Tensor):
        """scale * sigma^2 / alpha inside the window (0 outside or where alpha = 0), shaped for ``like``."""
        t = t_host.to(torch.float64)
        a, s = model.schedule.alpha(t), model.schedule.sigma(t)
        a, s = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(s, dtype=torch.float64)
        on = inside_window(t, self.window) & (a > 0)
        c = torch.where(on, self.scale * s * s / torch.where(a > 0, a, 1.0), 0.0)
        return coefficient_like(c, like)

    def _gradient(self, model: FlowModel, y: torch.Tensor, t_dev: torch.Tensor, t_host: torch.Tensor,
                  d: torch.Tensor) -> torch.Tensor:
        if torch.is_inference_mode_enabled():   # enable_grad cannot lift it: every output would look detached
            raise RuntimeError("RewardGuidance differentiates the reward: run the sampler outside "
                               "torch.inference_mode (torch.no_grad is fine)")
        with torch.enable_grad():
            if self.detach:
                leaf = d.detach().requires_grad_(True)
                target = leaf
            else:
                # In d's dtype: the network casts its input to its own dtype, and D is formed in d's.
                leaf = y.detach().to(d.dtype).requires_grad_(True)
                c = denoiser_coefficients(model.schedule, model.prediction, t_host.to(torch.float64))
                target = combine_output(c, leaf, model(leaf, t_dev)).to(d.dtype)
            r = check_reward(self.reward(target), target, "in RewardGuidance")
            if not r.requires_grad:
                raise TypeError("RewardGuidance: the reward's output has no gradient with respect to its input "
                                "(it was detached, or computed by non-differentiable operations such as "
                                "comparisons, argmax or .item()); guidance needs a differentiable reward")
            # A reward model with trainable parameters has an output that requires grad even where the input
            # was detached inside it: ask for the path to the input, not autograd's own error.
            (g,) = torch.autograd.grad(r.sum(), leaf, allow_unused=True)
            if g is None:
                raise TypeError("RewardGuidance: the reward's output does not depend on its input through autograd "
                                "(the input was detached, or went through NumPy or .item(), inside the reward); "
                                "guidance needs a reward differentiable in its input")
        return g.detach()

    def shift(self, model: FlowModel, y: torch.Tensor, t_dev: torch.Tensor, t_host: torch.Tensor,
              d: torch.Tensor) -> torch.Tensor:
        """The guided denoiser D'(y) from D(y) = ``d`` at model time t (no-op outside the window).

        Args:
            y: [N, ...] model input; t_dev: model time on y's device (0-d or [N]); t_host: the same in
            float64 on the host; d: [N, ...] D_t(y).
        """
        if not self.active(t_host):
            return d
        return d + (self._coefficient(model, t_host, d) * self._gradient(model, y, t_dev, t_host, d)).to(d.dtype)

    def __call__(self, model: FlowModel, y: torch.Tensor, t_dev: torch.Tensor, t_host: torch.Tensor,
                 out: torch.Tensor) -> torch.Tensor:
        """The sampler's hook: the raw output whose denoiser is the guided one."""
        if not self.active(t_host):
            return out
        c = denoiser_coefficients(model.schedule, model.prediction, t_host.to(torch.float64))
        # A network run in its own dtype (model.dtype: half precision) beside a float32 state: the reward sees D
        # in float32, as it does in FK steering's scores and in ``shift``, and the output is rounded once.
        work = out.dtype if model.dtype is None else opmath_dtype(out.dtype)
        d = combine_output(c, y.to(work), out.to(work))
        shift = self._coefficient(model, t_host, d) * self._gradient(model, y, t_dev, t_host, d)
        # solve_output: no shift of the output where it does not enter D (a_o = 0: velocity at sigma = 0).
        return (out.to(work) + solve_output(c, None, shift)).to(out.dtype)
