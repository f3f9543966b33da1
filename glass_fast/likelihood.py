"""Log-likelihood of data under a flow model's probability-flow ODE (instantaneous change of variables).

Along a trajectory of dx/dt = u_t(x), d/dt log p_t(x_t) = -div u_t(x_t). Integrating the ODE backward from
x at t_max to t_min gives

    log p_{t_max}(x) = log p_{t_min}(x_{t_min}) - integral_{t_min}^{t_max} div u_t(x_t) dt,

with p_{t_min} taken as N(0, sigma_{t_min}^2 I): exact when alpha_{t_min} = 0 (t = 0 is pure noise). Where the
model's lowest time keeps more than a trace of the data (a VP path with a small beta_max), that base is not
p_{t_min} and the result would be off by about alpha_{t_min} times the data's scale, in nats: refused.
The divergence is exact (one backward pass per data dimension) or Hutchinson's unbiased estimate
E[eps^T (du/dx) eps] over Rademacher probes (one backward pass per probe).
"""
from __future__ import annotations

import math
import numbers

import torch

from .model import FlowModel, opmath_dtype
from .plan import check_calls
from .transitions import FiniteGuard, all_finite, check_state

DIVERGENCES = ("auto", "exact", "hutchinson")
_EXACT_UP_TO = 32   # "auto": exact divergence up to this many dimensions per sample
# Largest alpha at the bottom of the integration for which N(0, sigma^2 I) stands in for p_{t_min}. The default
# VP path (alpha_0 = 6.6e-3) is below it; epsilon and score models on the linear path stop at alpha = 1e-4.
_BASE_ALPHA_TOL = 1e-2


def log_likelihood(model: FlowModel, x: torch.Tensor, *, steps: int = 100, solver: str = "heun",
                   divergence: str = "auto", probes: int = 1, t_max: float | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """log p_{t_max}(x) per sample, in nats, under the model's probability-flow ODE.

    Args:
        model: a FlowModel whose network is differentiable in x.
        x: [B, ...] data points. The network sees them in their dtype; the ODE state is carried in float32
            for half-precision data (as the samplers do) and the result is accumulated in float64.
        steps: integration steps on a uniform grid from t_max down to the model's lowest time.
        solver: "euler" (one model call per step) or "heun" (two; second order).
        divergence: "exact", "hutchinson" or "auto" (exact up to 32 dimensions per sample).
        probes: Rademacher probes per evaluation for "hutchinson".
        t_max: top of the integration; default 1 for velocity models, else 1 - 1e-3 (the velocity of other
            parameterizations is singular at sigma = 0); clamped to the model's time range. The result is
            then the density of x_t = alpha_t z + sigma_t eps at t_max: the data scaled by alpha_{t_max} (a
            shift of about -d log(alpha_{t_max}) nats for d dimensions per sample) and smoothed by sigma_{t_max}.
        generator: randomness of the Hutchinson probes.
    Returns:
        Tensor[B] float64 log-densities.
    Raises:
        ValueError where the model's lowest time is not (nearly) pure noise, alpha > 1e-2 there (see above),
        or for a t_max at sigma = 0 with a model that does not predict the velocity;
        RuntimeError under torch.inference_mode or for a network whose output carries no gradient to x;
        FloatingPointError naming the time and step where the velocity, its divergence or the state became
        NaN or Inf.

    Example:
        >>> lp = log_likelihood(model, data[:256], steps=200)   # nats per sample
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"x must be a Tensor[B, ...] with B >= 1, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    check_state(model, x, generator)
    if not bool(all_finite(x)):
        raise ValueError("x holds NaN or Inf: a log-density needs finite data points")
    steps = check_calls(steps, "steps")
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    probes = check_calls(probes, "probes")
    if t_max is not None and (isinstance(t_max, bool) or not isinstance(t_max, numbers.Real)):
        raise ValueError(f"t_max must be None or a number in (0, 1], got {t_max!r}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("log_likelihood differentiates the model (its divergence): call it outside "
                           "torch.inference_mode (torch.no_grad is fine)")
    dims = x[0].numel()
    exact = divergence == "exact" or (divergence == "auto" and dims <= _EXACT_UP_TO)
    lo, hi = model.time_range
    top = (1.0 if model.prediction == "velocity" else 1.0 - 1e-3) if t_max is None else float(t_max)
    if not lo < top <= 1.0:
        raise ValueError(f"t_max must lie in ({lo}, 1] (above the model's lowest time), got {t_max!r}")
    top = min(top, hi)
    # Named here, not by FlowModel.velocity at the first step: the caller passed t_max, not a time.
    if model.prediction != "velocity" and float(model.schedule.sigma(torch.tensor(top, dtype=torch.float64))) == 0:
        raise ValueError(f"t_max={t_max!r}: a {model.prediction!r} model's velocity is singular at t={top:g} "
                         f"(sigma_t = 0: u divides by it); pass a t_max below it (the default is 1 - 1e-3)")
    grid = torch.linspace(top, lo, steps + 1, dtype=torch.float64)
    base_alpha = float(model.schedule.alpha(torch.tensor(lo, dtype=torch.float64)))
    if base_alpha > _BASE_ALPHA_TOL:
        raise ValueError(f"log_likelihood: at the model's lowest time t={lo} the path keeps alpha_t={base_alpha:.4g} "
                         f"of the data ({model.schedule!r}), so N(0, sigma_t^2 I) is not p_t there and the "
                         f"log-density would be off by about alpha_t times the data's scale; it needs "
                         f"alpha_t <= {_BASE_ALPHA_TOL} at the lowest time (a VP path: a larger beta_min + beta_max)")
    in_dtype, work = x.dtype, opmath_dtype(x.dtype)

    guard = FiniteGuard(x.device)   # NaN/Inf flags stay on the device; read once, after the loop

    def field(y: torch.Tensor, t: float, k: int):
        """(u_t(y), div u_t(y) in float64), both detached."""
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            u = model.velocity(y.to(in_dtype), t).to(work)
            guard.note(u, f"log_likelihood: the model's velocity is NaN/Inf at t={t:.4f} (step {k})")
            if exact:
                flat = u.reshape(u.shape[0], -1)
                div = sum(torch.autograd.grad(flat[:, i].sum(), y, retain_graph=i + 1 < dims)[0]
                          .reshape(y.shape[0], -1)[:, i].double() for i in range(dims))
            else:
                div = torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)
                for j in range(probes):
                    eps = torch.randint(0, 2, y.shape, generator=generator, device=_gen_device(generator, y))
                    eps = (2 * eps - 1).to(device=y.device, dtype=u.dtype)
                    (g,) = torch.autograd.grad((u * eps).sum(), y, retain_graph=j + 1 < probes)
                    div = div + (g * eps).reshape(y.shape[0], -1).sum(-1).double() / probes
            guard.note(div, f"log_likelihood: the divergence of the model's velocity is NaN/Inf at t={t:.4f} "
                            f"(step {k})")
        return u.detach(), div.detach()

    # An inference tensor cannot enter autograd; its clone outside inference mode can.
    y = (x.clone() if x.is_inference() else x.detach()).to(work)
    _check_differentiable(model, y[:1].to(in_dtype), float(grid[0]))
    integral = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for k in range(steps):
        t, t_next = float(grid[k]), float(grid[k + 1])
        h = t - t_next                          # > 0: the step runs backward in time
        u1, d1 = field(y, t, k)
        if solver == "euler":
            y, integral = y - h * u1.to(y.dtype), integral + h * d1
        else:
            u2, d2 = field(y - h * u1.to(y.dtype), t_next, k)
            y, integral = y - 0.5 * h * (u1 + u2).to(y.dtype), integral + 0.5 * h * (d1 + d2)
        guard.note(y, f"log_likelihood: the ODE state became NaN/Inf at step {k} (t={t:.4f} -> {t_next:.4f}); "
                      f"lower t_max or use more steps")
    guard.raise_if_bad()
    var = float(model.schedule.sigma(torch.tensor(float(grid[-1]), dtype=torch.float64))) ** 2
    flat = y.reshape(y.shape[0], -1).double()
    log_base = -0.5 * (flat.square().sum(-1) / var + dims * math.log(2 * math.pi * var))
    return log_base - integral


def _check_differentiable(model: FlowModel, x: torch.Tensor, t: float) -> None:
    """Refuse a network whose output does not depend on x through autograd (torch.no_grad or .detach() inside
    it, a NumPy round trip): its divergence would read as 0 and the log-density be silently wrong. One call
    on one row, not counted as a model call."""
    calls = model.calls
    with torch.enable_grad():
        y = x.detach().requires_grad_(True)
        out = model(y, torch.full((1,), t, dtype=torch.float32, device=y.device))
        # Trainable parameters make a detached network's output require grad all the same: ask for the path to x.
        linked = out.requires_grad and torch.autograd.grad(out.sum(), y, allow_unused=True)[0] is not None
    model.calls = calls
    if not linked:
        raise RuntimeError("log_likelihood needs the network's output to be differentiable in its input x "
                           "(it takes the divergence of the velocity with autograd), but the output carries no "
                           "gradient: remove torch.no_grad / .detach() from the network")


def _gen_device(generator, like: torch.Tensor):
    return generator.device if generator is not None else like.device
