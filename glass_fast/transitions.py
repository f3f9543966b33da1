"""Transition kernels t -> t': GLASS, ODE, SDE and the plug-in kernel. Thin: a plan plus one stage loop.

Every public function validates its arguments here, once; ``execute`` then trusts its inputs.
"""
from __future__ import annotations

from functools import partial

import torch

from . import ops
from .ops._checks import FLOAT_DTYPES
from .model import FlowModel, opmath_dtype
from .plan import (Plan, as_times, check_calls, check_interval, check_solver, glass_plan, ode_plan, resolve_rho, sde_plan,
                   steps_per_call)


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """0-dim bool Tensor: every element of t is finite, without a host sync. The minimum and maximum carry
    any NaN or Inf, and aminmax is one pass; isfinite(t).all() makes several (about 20x slower on the CPU
    for 4M elements, more than the fused step itself)."""
    lo, hi = torch.aminmax(t)
    return torch.isfinite(lo) & torch.isfinite(hi)


class FiniteGuard:
    """Records which model outputs (and caller inputs) were finite, without synchronising the host.

    ``check`` / ``extend`` keep device-side flags for model outputs, ``check_input`` for tensors the caller
    handed in (so a NaN in the noise is not blamed on the model); ``raise_if_bad`` (or ``read``, with other
    small records of the run) reads them once, after the loop, and names the first non-finite one.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.flags: list[torch.Tensor] = []
        self.labels: list[str] = []   # one full error message per flag

    def note(self, x: torch.Tensor, message: str) -> None:
        """Flag ``x`` holding NaN or Inf, reported with ``message`` if it is the first such flag."""
        self.flags.append(all_finite(x).reshape(1))
        self.labels.append(message)

    def check(self, out: torch.Tensor, label: str) -> None:
        self.note(out, f"the model returned NaN or Inf at {label}")

    def check_input(self, x: torch.Tensor, name: str) -> None:
        """Flag a caller's tensor ``name`` (e.g. the initial noise) that holds NaN or Inf."""
        self.note(x, f"{name} holds NaN or Inf (it was passed in so, before any model call)")

    def extend(self, flags: torch.Tensor, labels: list[str]) -> None:
        """Add flags [S] computed elsewhere (e.g. inside a compiled or captured transition)."""
        self.flags.append(flags.reshape(-1))
        self.labels.extend(f"the model returned NaN or Inf at {label}" for label in labels)

    def read(self, *records: torch.Tensor) -> list[list[int]]:
        """Read the flags together with ``records`` (small integer or bool tensors on the guard's device:
        counts, per-group indices) in one host transfer, the run's one synchronisation on CUDA.

        Raises:
            FloatingPointError: naming the first non-finite tensor flagged.
        Returns:
            each record's values as a flat list of ints, in order.
        """
        sizes = [r.numel() for r in records]   # metadata only
        parts = [f.to(self.device) for f in self.flags]
        parts += [r.reshape(-1).to(device=self.device, dtype=torch.int64) for r in records]
        values = torch.cat(parts).tolist() if parts else []
        ok = values[:len(values) - sum(sizes)]
        if not all(ok):
            raise FloatingPointError(self.labels[ok.index(0)])
        out, at = [], len(ok)
        for size in sizes:
            out.append(values[at:at + size])
            at += size
        return out

    def raise_if_bad(self) -> None:
        """``read`` without records: raise if any flagged tensor held NaN or Inf."""
        self.read()


class DevicePlan:
    """A plan's rows and times on the sampler's device, moved there once."""

    def __init__(self, plan: Plan, device: torch.device, state_dtype: torch.dtype):
        acc = opmath_dtype(state_dtype)
        self.kinds = plan.kinds
        self.host_times = plan.times
        self.times = plan.times.to(device=device, dtype=torch.float32)
        self.coefs = plan.coefs.to(device=device, dtype=acc)
        self.first_denoised = plan.first_denoised.to(device=device, dtype=acc)
        self.init = None if plan.init is None else plan.init.to(device=device, dtype=acc)


def noise_draws(plan) -> int:
    """How many N(0, I) draws of the state's shape one transition consumes."""
    return (plan.init is not None) + sum(k == "noisy" for k in plan.kinds)


def draw_noise(plan, x: torch.Tensor, generator) -> torch.Tensor:
    """[draws, *x.shape] standard normal noise for one transition, drawn in one call."""
    return torch.randn((noise_draws(plan),) + tuple(x.shape), generator=generator, device=x.device, dtype=x.dtype)


def stage_labels(plan, prefix: str = "") -> list[str]:
    return [f"{prefix}stage {i} (model time {_fmt(plan.host_times[i])})" for i in range(len(plan.kinds))]


def execute(model: FlowModel, plan, x: torch.Tensor, noise: torch.Tensor, *, denoised=None, guidance=None,
            first_output=None):
    """Run one transition's stages from state ``x``. Pure given its inputs, so it compiles and captures.

    Args:
        plan: a DevicePlan (or buffers with the same fields).
        x: [B, ...] state at the transition's start.
        noise: [draws, B, ...] standard normal noise (``draw_noise``).
        denoised: D_t(x) if already known: replaces the first model call (and its guidance).
        first_output: the first model call's raw output ``model(x, plan.times[0])`` if already made
            (``Sampler.predict``): the stage then runs exactly as if it had made the call.
        guidance: optional hook guidance(model, y, t_dev, t_host, out) -> out after each model call.
    Returns:
        (x_next [B, ...] in x's dtype, finite [S] bool: whether each stage's model output was finite).

    A half-precision state (float16, bfloat16) is carried through the stages in float32 and rounded back
    once at the end: rounded at every stage, a bfloat16 state (8 significant bits) loses the small updates
    of many inner steps and the transition's law drifts. The network still sees inputs in
    ``model.input_dtype(x)``: the first is x itself, the later ones come out of the fused step in the
    model output's dtype.
    """
    work = opmath_dtype(x.dtype)
    if work != x.dtype:   # the fused step takes x_t and stages in the state's dtype
        noise = noise.to(work)
    draws = iter(noise.unbind(0))
    # The inputs were checked where they entered (the public functions, Sampler.step / run); the stage loop
    # runs the op unchecked on the backend chosen once. A guidance hook's output goes through the checked op.
    step = ops.fused_step if guidance is not None else partial(ops.fused_step_on, ops.resolve_backend(x.device.type))
    if plan.init is not None:  # GLASS: xbar_0 = gamma x_t + sigmabar_0 eps_0, the transition's only noise
        x_t = x.to(work)
        base, _ = step(x_t, next(draws), plan.init)
    else:
        base, x_t = x.to(work), None
    y, tmp, extremes = x, None, []
    times, coefs = plan.times.unbind(0), plan.coefs.unbind(0)   # the stages' rows as views, in one call each
    for i, kind in enumerate(plan.kinds):
        if i == 0 and denoised is not None:
            out, coef = denoised, plan.first_denoised
        else:
            out = first_output if i == 0 and first_output is not None else model(y, times[i])
            if guidance is not None:
                out = guidance(model, y.to(model.input_dtype(y)), times[i], plan.host_times[i], out)
            coef = coefs[i]
        extremes.extend(torch.aminmax(out))   # finite iff both are (see all_finite); tested once, below
        stage = next(draws) if kind == "noisy" else tmp if kind == "correct" else None
        new, y = step(base, out, coef, x_t=x_t, stage=stage)
        if kind == "predict":
            tmp = new
        else:
            base = new
    return base.to(x.dtype), torch.isfinite(torch.stack(extremes)).reshape(-1, 2).all(-1)


def _fmt(t: torch.Tensor) -> str:
    return f"{float(t):.4f}" if t.dim() == 0 else f"{float(t.min()):.4f}..{float(t.max()):.4f}"


# --------------------------------------------------------------------------------------------- validation
def check_state(model, x, generator, name: str = "x") -> None:
    """Validate a model, a state batch ``x`` [B, ...] (named ``name`` in errors) and an optional generator."""
    if not isinstance(model, FlowModel):
        raise TypeError(f"model must be a glass_fast.FlowModel, got {type(model).__name__}")
    # Float8 is floating too, but no sampler op takes it: refused here rather than deep inside a stage.
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES or x.dim() < 1:
        got = type(x).__name__ if not isinstance(x, torch.Tensor) else f"{x.dtype} of shape {tuple(x.shape)}"
        raise TypeError(f"{name} must be a floating Tensor[B, ...], got {got} (allowed: float32, float64, "
                        f"float16, bfloat16)")
    if x.numel() == 0:
        raise ValueError(f"{name} must hold at least one state with at least one element, got shape {tuple(x.shape)}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        g_dev = generator.device
        if g_dev.type != x.device.type or (g_dev.index is not None and x.device.index is not None
                                           and g_dev.index != x.device.index):
            raise ValueError(f"generator is on {g_dev} but {name} is on {x.device}: "
                             f"create it with torch.Generator(device={str(x.device)!r})")


def _interval(x, t, t_next):
    t = as_times(t, "t", x.shape[0])
    t_next = as_times(t_next, "t_next", x.shape[0])
    check_interval(t, t_next)
    return t, t_next


def check_denoised(denoised, x: torch.Tensor) -> None:
    """``denoised`` (D_t(x) handed in) is None or a floating Tensor shaped, placed and typed like x.

    Its dtype must be x's: the first stage mixes it into the state, which would then carry its dtype into
    every later model call (FlowModel.denoise returns x's dtype)."""
    if denoised is None:
        return
    if not isinstance(denoised, torch.Tensor) or not denoised.is_floating_point():
        got = type(denoised).__name__ if not isinstance(denoised, torch.Tensor) else str(denoised.dtype)
        raise TypeError(f"denoised must be None or a floating Tensor shaped like x, got {got}")
    if denoised.shape != x.shape or denoised.device != x.device:
        raise ValueError(f"denoised must have x's shape {tuple(x.shape)} on {x.device}, got shape "
                         f"{tuple(denoised.shape)} on {denoised.device}")
    if denoised.dtype != x.dtype:
        raise ValueError(f"denoised must have the state's dtype {x.dtype}, got {denoised.dtype}: "
                         f"pass denoised.to({x.dtype})")


def check_first_output(out, denoised, x: torch.Tensor, model: FlowModel) -> None:
    """``first_output`` (the first model call's raw output, handed in) is None or shaped, placed and typed like
    the network's output for x; given with ``denoised``, one of them would be ignored."""
    if out is None:
        return
    if denoised is not None:
        raise ValueError("give at most one of denoised and first_output: both replace the first model call")
    want = model.input_dtype(x)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.device != x.device or out.dtype != want:
        got = (f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        raise ValueError(f"first_output must be the network's output for x ({tuple(x.shape)} {want} on "
                         f"{x.device}; Sampler.predict gives it), got {got}")


def check_rows(plan, x: torch.Tensor) -> None:
    """Per-sample plan rows [S, B, 6] (per-sample times or rho) must match x's batch."""
    if plan.coefs.dim() == 3 and plan.coefs.shape[1] != x.shape[0]:
        raise ValueError(f"the transition was planned for {plan.coefs.shape[1]} states (per-sample times or a "
                         f"per-sample rho of that length) but x holds {x.shape[0]}: rho and the times must be "
                         f"floats or have one entry per state")


def state_overflow(where: str, x: torch.Tensor) -> str:
    """The message for a state ``x`` that turned NaN or Inf in ``where`` while every model output was finite."""
    return (f"the state became NaN or Inf in {where} although the model's outputs there were finite: it left "
            f"{x.dtype}'s range (largest finite {torch.finfo(x.dtype).max:.4g}; run the state in a wider dtype) or "
            f"the coefficients were not finite")


def _run(model, plan: Plan, x, generator, denoised, label: str) -> torch.Tensor:
    check_rows(plan, x)
    dplan = DevicePlan(plan, x.device, x.dtype)
    guard = FiniteGuard(x.device)
    guard.check_input(x, "x")
    if denoised is not None:
        guard.check_input(denoised, "denoised")
    x_next, finite = execute(model, dplan, x, draw_noise(dplan, x, generator), denoised=denoised)
    guard.extend(finite, stage_labels(dplan, label))
    guard.note(x_next, state_overflow(label.rstrip(", "), x_next))   # after the model's flags (see Sampler._step)
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
        inner_steps: model calls spent on the inner flow (a multiple of 2 for midpoint and heun). Where
            sigma_bar = 0 (t_next = 1 or |rho| = 1) the inner velocity is singular at s = 1: heun's last step is
            then an Euler step, one call fewer.
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
    check_denoised(denoised, x)
    t, t_next = _interval(x, t, t_next)
    inner_steps = check_calls(inner_steps, "inner_steps")
    check_solver(solver)
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
    """Integrate dX/dt = u_t(X) from t to t_next with ``steps`` model calls (deterministic). Heun's last step is
    an Euler step (one call fewer) onto sigma = 0 for models other than velocity, whose u is singular there."""
    check_state(model, x, None)
    check_denoised(denoised, x)
    t, t_next = _interval(x, t, t_next)
    steps = check_calls(steps, "steps")
    check_solver(solver)
    steps_per_call(steps, solver, "steps")
    return _run(model, ode_plan(model, t, t_next, steps, solver), x, None, denoised, "ode transition, ")


def sde_transition(model: FlowModel, x: torch.Tensor, t, t_next, *, steps: int = 10,
                   generator: torch.Generator | None = None, denoised: torch.Tensor | None = None) -> torch.Tensor:
    """DDPM SDE by Euler-Maruyama with ``steps`` model calls; a step from alpha_t = 0 uses the plug-in kernel."""
    check_state(model, x, generator)
    check_denoised(denoised, x)
    t, t_next = _interval(x, t, t_next)
    steps = check_calls(steps, "steps")
    return _run(model, sde_plan(model, t, t_next, steps), x, generator, denoised, "sde transition, ")
