"""Transition plans: every scalar of every stage of a transition, in float64 on the host (MATH.md sections 2-3).

A plan is a list of stages. Each stage is one model call followed by one ``ops.fused_step``:

    new    = k_base * base + k_stage * stage + k_xt * x_t + k_out * out
    y_next = n_xt * x_t + n_new * new

Stage kinds say where ``new`` goes and what fills the ``stage`` slot:
    "step":    base <- new                         (Euler)
    "predict": tmp  <- new                         (midpoint / Heun first stage; base unchanged)
    "correct": base <- new, stage slot = tmp       (midpoint / Heun second stage)
    "noisy":   base <- new, stage slot = N(0, I)   (SDE)

The per-element work never sees a schedule, a rho or a parameterization: only these rows.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .model import FlowModel, denoiser_coefficients, velocity_coefficients

SOLVERS = ("euler", "midpoint", "heun")
_F64 = dict(dtype=torch.float64, device="cpu")


@dataclass
class Plan:
    """Stages of one transition. Tensors are float64 on the CPU; rows are [S, 6] or [S, B, 6]."""

    kinds: tuple[str, ...]
    times: torch.Tensor          # [S] or [S, B]: model evaluation time of each stage
    coefs: torch.Tensor          # [S, 6] or [S, B, 6]
    first_denoised: torch.Tensor  # stage 0's row when its model output is replaced by D_t(x_t)
    init: torch.Tensor | None    # GLASS start row: xbar_0 = gamma x_t + sigmabar_0 eps (None for ODE / SDE)

    @property
    def calls(self) -> int:
        return len(self.kinds)


def _row(k_base=0.0, k_stage=0.0, k_xt=0.0, k_out=0.0, n_xt=0.0, n_new=0.0) -> torch.Tensor:
    """Stack the six coefficients (floats or same-shaped tensors) into [..., 6]."""
    cols = (k_base, k_stage, k_xt, k_out, n_xt, n_new)
    if all(not isinstance(c, torch.Tensor) or c.dim() == 0 for c in cols):
        # Shared times (the usual case): one tensor from the six exact float64 values, about half the
        # time of six conversions, a broadcast and a stack, for every stage of every transition.
        return torch.tensor([float(c) for c in cols], **_F64)
    return torch.stack(torch.broadcast_tensors(*(torch.as_tensor(c, **_F64) for c in cols)), dim=-1)


def _stack(rows, times, kinds, first_denoised, init=None) -> Plan:
    # The common shape, [6] or [B, 6], by broadcast_tensors (views): torch.broadcast_shapes's first call
    # imports sympy, about 0.4 s on the first plan of a process.
    shape = torch.broadcast_tensors(*rows, *(t.unsqueeze(-1) for t in times))[0].shape
    coefs = torch.stack([r.expand(shape) for r in rows])
    tshape = shape[:-1]
    return Plan(tuple(kinds), torch.stack([t.expand(tshape) for t in times]), coefs,
                first_denoised.expand(shape), None if init is None else init.expand(shape))


def steps_per_call(calls: int, solver: str, name: str = "inner_steps") -> tuple[int, int]:
    """(solver steps, model calls per step) for a budget of ``calls`` model calls (the argument ``name``)."""
    per = 1 if solver == "euler" else 2
    if calls % per:
        raise ValueError(f"solver {solver!r} makes {per} model calls per step: the number of model calls "
                         f"({name}) must be a multiple of {per}, got {calls}")
    return calls // per, per


# ---------------------------------------------------------------------------------------------------- rho
def rho_ddpm(schedule, t, t_next, kappa: float = 1.0):
    """rho making the GLASS kernel the DDPM reverse transition: (alpha_t sigma_t') / (sigma_t alpha_t'), ^kappa."""
    r = schedule.alpha(t) * schedule.sigma(t_next) / (schedule.sigma(t) * schedule.alpha(t_next))
    return r if kappa == 1.0 else r ** kappa


_RHO_FORMS = "a float in [-1, 1], 'ddpm', ('ddpm', kappa) with kappa a finite number >= 0, or a callable of (t, t_next)"


def check_rho_form(rho) -> None:
    """Validate rho's form (ValueError naming it), and a constant rho's value, without a schedule or times."""
    if isinstance(rho, str) and rho == "ddpm" or callable(rho):
        return
    if isinstance(rho, tuple) and len(rho) == 2 and isinstance(rho[0], str) and rho[0] == "ddpm":
        kappa = rho[1]
        # kappa >= 0 keeps rho_DDPM^kappa in [0, 1]; kappa = 0 is rho = 1.
        if isinstance(kappa, bool) or not isinstance(kappa, numbers.Real) or not 0 <= float(kappa) < math.inf:
            raise ValueError(f"rho must be {_RHO_FORMS}, got kappa={kappa!r}")
        return
    if isinstance(rho, numbers.Real) and not isinstance(rho, bool):
        if not -1.0 <= float(rho) <= 1.0:
            raise ValueError(f"rho must lie in [-1, 1], got {float(rho)}")
        return
    raise ValueError(f"rho must be {_RHO_FORMS}, got {rho!r}")


def resolve_rho(rho, schedule, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """rho as a float64 tensor: a float, "ddpm", ("ddpm", kappa) or a callable of (t, t_next)."""
    check_rho_form(rho)
    if isinstance(rho, str):
        r = rho_ddpm(schedule, t, t_next)
    elif isinstance(rho, tuple):
        r = rho_ddpm(schedule, t, t_next, float(rho[1]))
    elif callable(rho):
        out = rho(t, t_next)
        try:
            r = torch.as_tensor(out, **_F64)
            torch.broadcast_shapes(r.shape, torch.broadcast_shapes(t.shape, t_next.shape))
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"rho: the callable must return a float or a float64 Tensor broadcastable to the "
                             f"times' shape {tuple(torch.broadcast_shapes(t.shape, t_next.shape))}, got "
                             f"{out!r}") from None
    else:
        r = float(rho)
    r = torch.as_tensor(r, **_F64)
    if not bool(torch.all((r >= -1) & (r <= 1))):
        raise ValueError(f"rho must lie in [-1, 1], got {r.tolist() if r.dim() else float(r)}")
    return r


# -------------------------------------------------------------------------------------------------- GLASS
def kernel_coefficients(sch, t, t_next, rho) -> tuple:
    """(gamma, alpha_bar, sigma_bar) of the GLASS kernel x_t' = gamma x_t + alpha_bar z + sigma_bar eps given
    z (MATH.md section 3): the correlation rho between the noises of x_t and x_t' fixes gamma."""
    gamma = rho * sch.sigma(t_next) / sch.sigma(t)
    return gamma, sch.alpha(t_next) - gamma * sch.alpha(t), sch.sigma(t_next) * torch.sqrt(1 - rho * rho)


class _Inner:
    """The inner CondOT flow of one GLASS transition (MATH.md section 3), evaluated at inner time s."""

    def __init__(self, model: FlowModel, t, t_next, rho, sigmabar0: float):
        sch = model.schedule
        self.model, self.t = model, t
        self.a_t, self.s_t = sch.alpha(t), sch.sigma(t)
        self.snr_t = self.a_t ** 2 / self.s_t ** 2
        self.gamma, self.alpha_bar, self.sigma_bar = kernel_coefficients(sch, t, t_next, rho)
        self.sb0 = sigmabar0
        # The parts of at(s) that do not depend on s, computed once (the same float64 operations).
        self.w1_num, self.neg_gamma = self.sigma_bar - sigmabar0, -self.gamma
        self.cx_t = self.a_t / self.s_t ** 2
        # at(s) by inner time: a stage needs it at its own s and at the next stage's (its input), so each
        # inner time would be evaluated twice. Keyed by the float s, for this transition only.
        self._at: dict[float, tuple] = {}

    def at(self, s: float):
        """(model time, c_x, c_b, w1, w2, w3): model input y = c_x x_t + c_b xbar; u = w1 xbar + w2 D + w3 x_t."""
        if s not in self._at:
            self._at[s] = self._eval(s)
        return self._at[s]

    def _eval(self, s: float):
        abar = s * self.alpha_bar
        sbar = (1 - s) * self.sb0 + s * self.sigma_bar
        w1 = self.w1_num / sbar
        w2 = self.alpha_bar - abar * w1
        w3 = self.neg_gamma * w1
        if s == 0.0:
            # P = SNR(t), t* = t and alpha_{t*} S = x_t exactly (also when alpha_t = 0, where S is 0/0).
            tm = self.model.clamp_time(self.t)
            return tm, torch.ones_like(tm), torch.zeros_like(tm), w1, w2, w3
        sbar2 = sbar ** 2
        prec = self.snr_t + abar ** 2 / sbar2
        sch = self.model.schedule
        tm = self.model.clamp_time(torch.as_tensor(sch.time_at_snr(prec), **_F64))
        k = sch.alpha(tm) / prec
        c_x = k * (self.cx_t - abar * self.gamma / sbar2)
        c_b = k * abar / sbar2
        return tm, c_x, c_b, w1, w2, w3

    def velocity_terms(self, s: float, scale: float, denoised: bool = False):
        """(model time, A, X, O): scale * u_s(state, out) = A state + X x_t + O out."""
        tm, c_x, c_b, w1, w2, w3 = self.at(s)
        a_x, a_o = (0.0, 1.0) if denoised else denoiser_coefficients(self.model.schedule, self.model.prediction, tm)
        w2a = w2 * a_x
        return tm, scale * (w1 + w2a * c_b), scale * (w3 + w2a * c_x), scale * w2 * a_o

    def input_at(self, s: float):
        """(n_xt, n_new) producing the model input at inner time s; zeros where no call can follow (s = 1
        with sigma_bar = 0, where the input's precision is infinite)."""
        if s >= 1.0 and bool(torch.any(self.sigma_bar == 0)):
            return 0.0, 0.0
        _, c_x, c_b, *_ = self.at(s)
        return c_x, c_b


def check_sigmabar0(sigmabar0) -> float:
    """The GLASS inner flow's start noise level: a finite number > 0 (ValueError otherwise)."""
    if isinstance(sigmabar0, bool) or not isinstance(sigmabar0, numbers.Real) or not 0 < sigmabar0 < math.inf:
        raise ValueError(f"sigmabar0 must be a finite number > 0, got {sigmabar0!r}")
    return float(sigmabar0)


def glass_plan(model: FlowModel, t, t_next, rho, calls: int, solver: str, sigmabar0: float = 1.0) -> Plan:
    """Stages of a GLASS transition t -> t_next spending ``calls`` model calls with ``solver``."""
    sigmabar0 = check_sigmabar0(sigmabar0)
    inner = _Inner(model, t, t_next, rho, sigmabar0)
    n, _ = steps_per_call(calls, solver)
    h = 1.0 / n
    rows, times, kinds = [], [], []
    # Heun's corrector evaluates at s + h; at s = 1 with sigma_bar = 0 the inner velocity is singular.
    heun_last_euler = solver == "heun" and bool(torch.any(inner.sigma_bar == 0))
    for j in range(n):
        s = j * h
        if solver == "euler" or (heun_last_euler and j == n - 1):
            tm, A, X, O = inner.velocity_terms(s, h)
            rows.append(_row(1 + A, 0.0, X, O, *inner.input_at(s + h)))
            times.append(tm); kinds.append("step")
        elif solver == "midpoint":
            tm, A, X, O = inner.velocity_terms(s, h / 2)
            rows.append(_row(A + 1, 0.0, X, O, *inner.input_at(s + h / 2)))
            times.append(tm); kinds.append("predict")
            tm, A, X, O = inner.velocity_terms(s + h / 2, h)
            rows.append(_row(1.0, A, X, O, *inner.input_at(s + h)))
            times.append(tm); kinds.append("correct")
        else:  # heun
            tm, A, X, O = inner.velocity_terms(s, h)
            rows.append(_row(A + 1, 0.0, X, O, *inner.input_at(s + h)))
            times.append(tm); kinds.append("predict")
            tm, A, X, O = inner.velocity_terms(s + h, h / 2)
            rows.append(_row(0.5, 0.5 + A, X, O, *inner.input_at(s + h)))
            times.append(tm); kinds.append("correct")
    # The first stage with D_t(x_t) handed in (reused from a reward evaluation) instead of the raw output.
    _, A, X, O = inner.velocity_terms(0.0, h / 2 if solver == "midpoint" else h, denoised=True)
    first = rows[0].clone()
    first[..., 0], first[..., 2], first[..., 3] = 1 + A, X, O
    init = _row(k_base=inner.gamma, k_out=sigmabar0)
    return _stack(rows, times, kinds, first, init)


# ---------------------------------------------------------------------------------------------------- ODE
def ode_plan(model: FlowModel, t, t_next, calls: int, solver: str) -> Plan:
    """Stages of ``calls`` model calls of an ODE solver from t to t_next."""
    n, _ = steps_per_call(calls, solver)
    h = (t_next - t) / n
    sch, pred = model.schedule, model.prediction

    def vel(tau, scale, prediction=pred):
        tm = model.clamp_time(tau)
        b_x, b_o = velocity_coefficients(sch, prediction, tm)
        return tm, scale * b_x, scale * b_o

    rows, times, kinds = [], [], []
    for j in range(n):
        tau = t + j * h
        last_singular = j == n - 1 and pred != "velocity" and bool(torch.any(sch.sigma(t_next) == 0))
        if solver == "euler" or (solver == "heun" and last_singular):
            tm, A, O = vel(tau, h)
            rows.append(_row(1 + A, k_out=O, n_new=1.0)); times.append(tm); kinds.append("step")
        elif solver == "midpoint":
            tm, A, O = vel(tau, h / 2)
            rows.append(_row(1 + A, k_out=O, n_new=1.0)); times.append(tm); kinds.append("predict")
            tm, A, O = vel(tau + h / 2, h)
            rows.append(_row(1.0, A, k_out=O, n_new=1.0)); times.append(tm); kinds.append("correct")
        else:
            tm, A, O = vel(tau, h)
            rows.append(_row(1 + A, k_out=O, n_new=1.0)); times.append(tm); kinds.append("predict")
            tm, A, O = vel(tau + h, h / 2)
            rows.append(_row(0.5, 0.5 + A, k_out=O, n_new=1.0)); times.append(tm); kinds.append("correct")
    _, A, O = vel(t, h / 2 if solver == "midpoint" else h, prediction="x0")
    first = rows[0].clone()
    first[..., 0], first[..., 3] = 1 + A, O
    return _stack(rows, times, kinds, first)


# ---------------------------------------------------------------------------------------------------- SDE
def sde_plan(model: FlowModel, t, t_next, calls: int) -> Plan:
    """Euler-Maruyama for dX = [u + (nu^2/2) grad log p_t] dt + nu dW; a DDPM plug-in step where alpha_t = 0
    or where the step starts below the model's time range (there nu^2 ~ 1/alpha, evaluated at the clamped
    time, would blow the Euler-Maruyama step up; the plug-in step is finite and exact in law for the
    denoiser it is given)."""
    sch = model.schedule
    h = (t_next - t) / calls
    rows, times, firsts = [], [], []
    for j in range(calls):
        tau = t + j * h
        tm = model.clamp_time(tau)
        a, s, da, ds = sch.alpha(tm), sch.sigma(tm), sch.d_alpha(tm), sch.d_sigma(tm)
        nu2 = 2 * (da / a) * s * s - 2 * s * ds
        plug_here = (sch.alpha(tau) == 0) | (tm != tau)
        # Plug-in DDPM step: x' = gamma x + alpha_bar D + sigma_bar eps with rho_DDPM (finite at alpha = 0).
        t1 = tau + h
        gamma, abar, sbar = kernel_coefficients(sch, tau, t1, rho_ddpm(sch, tau, t1))
        # Only the first stage's row with D_t(x_t) handed in is used (the plan's first_denoised).
        for denoised, bucket in ((False, rows), (True, firsts))[:1 if j else 2]:
            pred = "x0" if denoised else model.prediction
            a_x, a_o = denoiser_coefficients(sch, pred, tm)
            b_x, b_o = velocity_coefficients(sch, pred, tm)
            d_x = b_x + 0.5 * nu2 * (a * a_x - 1) / (s * s)
            d_o = b_o + 0.5 * nu2 * a * a_o / (s * s)
            em = _row(1 + h * d_x, torch.sqrt(h * nu2), k_out=h * d_o, n_new=1.0)
            plug = _row(gamma + abar * a_x, sbar, k_out=abar * a_o, n_new=1.0)
            bucket.append(torch.where(plug_here.unsqueeze(-1), plug, em))
        times.append(tm)
    return _stack(rows, times, ["noisy"] * calls, firsts[0])


def as_times(t, name: str, batch: int) -> torch.Tensor:
    """Validate a time (float or Tensor[B]) and return it as float64 on the CPU, shape [] or [B]."""
    if isinstance(t, torch.Tensor):
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != batch):
            raise ValueError(f"{name} must be a float or a Tensor[{batch}], got shape {tuple(t.shape)}")
        tt = t.detach().to(**_F64)
    elif isinstance(t, numbers.Real) and not isinstance(t, bool):
        tt = torch.tensor(float(t), **_F64)
    else:
        raise TypeError(f"{name} must be a float or a Tensor, got {type(t).__name__}")
    if not bool(torch.all((tt >= 0) & (tt <= 1))):
        raise ValueError(f"{name} must lie in [0, 1], got {tt.tolist() if tt.dim() else float(tt)}")
    return tt


def check_interval(t: torch.Tensor, t_next: torch.Tensor) -> None:
    if not bool(torch.all(t_next > t)):
        raise ValueError(f"t_next must be greater than t, got t={t.tolist() if t.dim() else float(t)}, "
                         f"t_next={t_next.tolist() if t_next.dim() else float(t_next)}")


def check_calls(calls, name: str) -> int:
    """A count >= 1 (Python or NumPy integer; not a bool or a float) as an int."""
    if isinstance(calls, bool) or not isinstance(calls, numbers.Integral) or calls < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {calls!r}")
    return int(calls)


def check_solver(solver) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    return solver

