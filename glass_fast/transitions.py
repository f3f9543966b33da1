"""Transition kernels t -> t': GLASS, ODE, SDE and the plug-in kernel. Thin: a plan plus one stage loop.

Every public function validates its arguments here, once; ``execute`` then trusts its inputs.
"""
from __future__ import annotations

import torch

from . import ops
from .model import FlowModel
from .plan import Plan, as_times, check_calls, check_interval, check_solver, glass_plan, ode_plan, resolve_rho, sde_plan


class FiniteGuard:
    """Records the first stage whose model output is not finite, without synchronising the host.

    ``check`` folds a device-side flag per call; ``raise_if_bad`` reads it once, after the loop.
    """

    def __init__(self, device: torch.device):
        self.first = torch.full((), -1, dtype=torch.int64, device=device)
        self.labels: list[str] = []

    def check(self, out: torch.Tensor, label: str) -> None:
        bad = ~torch.isfinite(out).all()
        code = torch.full((), len(self.labels), dtype=torch.int64, device=out.device)
        self.first = torch.where(bad & (self.first < 0), code, self.first)
        self.labels.append(label)

    def raise_if_bad(self) -> None:
        i = int(self.first)
        if i >= 0:
            raise FloatingPointError(f"the model returned NaN or Inf at {self.labels[i]}")


class DevicePlan:
    """A plan's rows and times on the sampler's device, moved there once."""

    def __init__(self, plan: Plan, device: torch.device, state_dtype: torch.dtype):
        acc = torch.float64 if state_dtype == torch.float64 else torch.float32
        self.kinds = plan.kinds
        self.host_times = plan.times
        self.times = plan.times.to(device=device, dtype=torch.float32)
        self.coefs = plan.coefs.to(device=device, dtype=acc)
        self.first_denoised = plan.first_denoised.to(device=device, dtype=acc)
        self.init = None if plan.init is None else plan.init.to(device=device, dtype=acc)


def _randn(x: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def execute(model: FlowModel, plan: DevicePlan, x: torch.Tensor, *, generator=None, denoised=None,
            guard: FiniteGuard | None = None, label: str = "", guidance=None) -> torch.Tensor:
    """Run one transition's stages from state ``x``. ``denoised``: D_t(x) if already known (saves a call)."""
    if plan.init is not None:  # GLASS: xbar_0 = gamma x_t + sigmabar_0 eps_0, the transition's only noise
        base, _ = ops.fused_step(x, _randn(x, generator), plan.init)
        x_t = x
    else:
        base, x_t = x, None
    y, tmp = x, None
    for i, kind in enumerate(plan.kinds):
        if i == 0 and denoised is not None:
            out, coef = denoised, plan.first_denoised
        else:
            out = model(y, plan.times[i])
            if guidance is not None:
                out = guidance(model, y.to(model.input_dtype(y)), plan.times[i], plan.host_times[i], out)
            if guard is not None:
                guard.check(out, f"{label}stage {i} (model time {_fmt(plan.host_times[i])})")
            coef = plan.coefs[i]
        stage = _randn(x, generator) if kind == "noisy" else tmp if kind == "correct" else None
        new, y = ops.fused_step(base, out, coef, x_t=x_t, stage=stage)
        if kind == "predict":
            tmp = new
        else:
            base = new
    return base


def _fmt(t: torch.Tensor) -> str:
    return f"{float(t):.4f}" if t.dim() == 0 else f"{float(t.min()):.4f}..{float(t.max()):.4f}"


# --------------------------------------------------------------------------------------------- validation
def check_state(model, x, generator) -> None:
    if not isinstance(model, FlowModel):
        raise TypeError(f"model must be a glass_fast.FlowModel, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError(f"x must be a floating Tensor[B, ...], got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else f'{x.dtype} of shape {tuple(x.shape)}'}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != x.device.type:
            raise ValueError(f"generator is on {generator.device} but x is on {x.device}: "
                             f"create it with torch.Generator(device={str(x.device.type)!r})")


def _interval(x, t, t_next):
    t = as_times(t, "t", x.shape[0])
    t_next = as_times(t_next, "t_next", x.shape[0])
    check_interval(t, t_next)
    return t, t_next


def _run(model, plan: Plan, x, generator, denoised, label: str) -> torch.Tensor:
    guard = FiniteGuard(x.device)
    x_next = execute(model, DevicePlan(plan, x.device, x.dtype), x, generator=generator, denoised=denoised,
                     guard=guard, label=label)
    guard.raise_if_bad()
    return x_next


# ------------------------------------------------------------------------------------------------- public
def glass_transition(model: FlowModel, x: torch.Tensor, t, t_next, *, rho=0.4, inner_steps: int = 10,
                     solver: str = "euler", generator: torch.Generator | None = None, sigmabar0: float = 1.0,
                     denoised: torch.Tensor | None = None) -> torch.Tensor:
    """Sample x_{t'} ~ p(x_{t'} | x_t) by integrating the GLASS inner flow (MATH.md section 3).

    Args:
        model: the pretrained FlowModel.
        x: [B, ...] states at time t.
        t, t_next: floats or Tensor[B] with 0 <= t < t_next <= 1.
        rho: correlation of (x_t, x_t'): float in [-1, 1], "ddpm", ("ddpm", kappa) or callable(t, t_next).
        inner_steps: model calls spent on the inner flow (a multiple of 2 for midpoint and heun).
        solver: "euler" (the paper's), "midpoint" or "heun".
        generator: the only source of randomness (one N(0, I) draw per transition).
        sigmabar0: inner-path noise level at s = 0.
        denoised: D_t(x) if already computed (e.g. for a reward): replaces the first model call.
    Returns:
        [B, ...] states at t_next.

    Example:
        >>> x1 = glass_transition(model, x, 0.2, 0.4, rho=0.4, inner_steps=8, solver="midpoint")
    """
    check_state(model, x, generator)
    t, t_next = _interval(x, t, t_next)
    check_calls(inner_steps, "inner_steps")
    check_solver(solver)
    if not sigmabar0 > 0:
        raise ValueError(f"sigmabar0 must be > 0, got {sigmabar0}")
    plan = glass_plan(model, t, t_next, resolve_rho(rho, model.schedule, t, t_next), inner_steps, solver, sigmabar0)
    return _run(model, plan, x, generator, denoised, "glass transition, ")


def plugin_transition(model: FlowModel, x: torch.Tensor, t, t_next, *, rho="ddpm",
                      generator: torch.Generator | None = None, denoised: torch.Tensor | None = None) -> torch.Tensor:
    """One-step plug-in kernel x' = gamma x + alpha_bar D_t(x) + sigma_bar eps (DDIM-eta / CPS / renoise).

    Exactly GLASS with one Euler inner step. rho="ddpm" makes it the DDPM step.
    """
    return glass_transition(model, x, t, t_next, rho=rho, inner_steps=1, solver="euler", generator=generator,
                            denoised=denoised)


def ode_transition(model: FlowModel, x: torch.Tensor, t, t_next, *, steps: int = 10, solver: str = "euler",
                   denoised: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate dX/dt = u_t(X) from t to t_next with ``steps`` model calls (deterministic)."""
    check_state(model, x, None)
    t, t_next = _interval(x, t, t_next)
    check_calls(steps, "steps")
    check_solver(solver)
    return _run(model, ode_plan(model, t, t_next, steps, solver), x, None, denoised, "ode transition, ")


def sde_transition(model: FlowModel, x: torch.Tensor, t, t_next, *, steps: int = 10,
                   generator: torch.Generator | None = None, denoised: torch.Tensor | None = None) -> torch.Tensor:
    """DDPM SDE by Euler-Maruyama with ``steps`` model calls; a step from alpha_t = 0 uses the plug-in kernel."""
    check_state(model, x, generator)
    t, t_next = _interval(x, t, t_next)
    check_calls(steps, "steps")
    return _run(model, sde_plan(model, t, t_next, steps), x, generator, denoised, "sde transition, ")
