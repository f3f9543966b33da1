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
# 0-d constants: an operation with a Python number first wraps it in a tensor (a few microseconds each, for
# the same float64 value and the same bits). Only ever read.
_ZERO, _ONE = torch.zeros((), **_F64), torch.ones((), **_F64)


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


def _plan(coefs, times, kinds, first_denoised, init=None) -> Plan:
    """A Plan from all stages' rows [S, ..., 6] and times [S, ...], broadcast to one shape [S, ..., 6] / [S, ...]
    (first_denoised and init: views of that shape). torch.broadcast_tensors gives it as views: the first call of
    torch.broadcast_shapes imports sympy, about 0.4 s on the first plan of a process."""
    shape = torch.broadcast_tensors(coefs[0], times[0].unsqueeze(-1))[0].shape
    return Plan(tuple(kinds), times.expand((len(kinds),) + shape[:-1]).contiguous(),
                coefs.expand((len(kinds),) + shape).contiguous(), first_denoised.expand(shape),
                None if init is None else init.expand(shape))


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
        times = torch.broadcast_shapes(t.shape, t_next.shape)
        try:
            r = torch.as_tensor(out, **_F64).detach()   # rows are constants (as the times: as_times)
            # At most one value per state: a [B, 1] broadcasts with times [B] too, to rows [B, B, 6].
            ok = len(torch.broadcast_shapes(r.shape, times)) <= 1
        except (TypeError, ValueError, RuntimeError):
            ok = False
        if not ok:
            got = f"a Tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else repr(out)
            raise ValueError(f"rho: the callable must return a float or a float64 Tensor of shape [] or [B] (one "
                             f"value per state) broadcastable with the times' shape {tuple(times)}, got {got}")
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
    return _kernel(rho, sch.alpha(t), sch.sigma(t), sch.alpha(t_next), sch.sigma(t_next))


def _kernel(rho, a_t, s_t, a_next, s_next) -> tuple:
    """kernel_coefficients from the schedule's values at t and t_next."""
    gamma = rho * s_next / s_t
    return gamma, a_next - gamma * a_t, s_next * torch.sqrt(1 - rho * rho)


class _Inner:
    """The inner CondOT flow of one GLASS transition (MATH.md section 3), evaluated at inner times s.

    A plan evaluates all the inner times it needs at once, as one float64 tensor: an elementwise float64
    operation gives each element the bits it gives a 0-d tensor, so the rows equal those of an evaluation
    one time at a time, for a fraction of the cost (the schedule is evaluated once per plan, not per stage)."""

    def __init__(self, model: FlowModel, t, t_next, rho, sigmabar0: float):
        sch = model.schedule
        self.model, self.t = model, t
        self.a_t, self.s_t = sch.alpha(t), sch.sigma(t)
        s_t2 = self.s_t ** 2
        self.snr_t = self.a_t ** 2 / s_t2
        self.gamma, self.alpha_bar, self.sigma_bar = _kernel(rho, self.a_t, self.s_t, sch.alpha(t_next), sch.sigma(t_next))
        self.sb0 = sigmabar0
        # The parts of the table that do not depend on s, computed once.
        self.w1_num, self.neg_gamma = self.sigma_bar - sigmabar0, -self.gamma
        self.cx_t = self.a_t / s_t2
        # Rows where sigma_bar = 0: the model input's precision at s = 1 is infinite, no call can follow there.
        self.singular_end = self.sigma_bar == 0

    def table(self, svals: list[float]) -> tuple:
        """(tm, c_x, c_b, w1, w2, w3, a_x, a_o) at the inner times ``svals`` (leading dimension): the model
        input y = c_x x_t + c_b xbar at model time tm, u = w1 xbar + w2 D + w3 x_t, and the model's
        denoiser coefficients D = a_x y + a_o out at tm."""
        per_sample = max(v.dim() for v in (self.t, self.alpha_bar, self.sigma_bar, self.gamma))
        shape = (len(svals),) + (1,) * per_sample
        s = torch.tensor(svals, **_F64).reshape(shape)
        abar = s * self.alpha_bar
        # (1 - s) sigmabar_0 in Python floats, as one time at a time computed it.
        sbar = torch.tensor([(1 - v) * self.sb0 for v in svals], **_F64).reshape(shape) + s * self.sigma_bar
        w1 = self.w1_num / sbar
        w2 = self.alpha_bar - abar * w1
        w3 = self.neg_gamma * w1
        sbar2 = sbar ** 2
        prec = self.snr_t + abar ** 2 / sbar2
        sch = self.model.schedule
        tm = self.model.clamp_time(torch.as_tensor(sch.time_at_snr(prec), **_F64))
        k = sch.alpha(tm) / prec
        c_x = k * (self.cx_t - abar * self.gamma / sbar2)
        c_b = k * abar / sbar2
        if 0.0 in svals:
            # s = 0: P = SNR(t), t* = t and alpha_{t*} S = x_t exactly (also when alpha_t = 0, where S is 0/0).
            start = s == 0
            tm = torch.where(start, self.model.clamp_time(self.t), tm)
            c_x, c_b = torch.where(start, _ONE, c_x), torch.where(start, _ZERO, c_b)
        a_x, a_o = denoiser_coefficients(sch, self.model.prediction, tm)
        return tm, c_x, c_b, w1, w2, w3, a_x, a_o

    def at(self, s: float) -> tuple:
        """(tm, c_x, c_b, w1, w2, w3) at one inner time s (see ``table``)."""
        return tuple(v[0] for v in self.table([s])[:6])


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
    # Each stage: (kind, inner time of its velocity, step scale, inner time of the next model input). Heun's
    # corrector evaluates at s + h; at s = 1 with sigma_bar = 0 the inner velocity is singular: where every row
    # ends there, the last step is Euler's; where only some do, those rows' last corrector keeps the predictor
    # (``heun_rows_ending_singular``), so the other rows keep Heun's.
    singular = inner.singular_end
    every, some = bool(torch.all(singular)), bool(torch.any(singular))
    heun_last_euler = solver == "heun" and every
    stages = []
    for j in range(n):
        s = j * h
        if solver == "euler" or (heun_last_euler and j == n - 1):
            stages.append(("step", s, h, s + h))
        elif solver == "midpoint":
            stages += [("predict", s, h / 2, s + h / 2), ("correct", s + h / 2, h, s + h)]
        else:  # heun
            stages += [("predict", s, h, s + h), ("correct", s + h, h / 2, s + h)]
    kinds, svals, scales, s_in = (list(c) for c in zip(*stages))
    S = len(stages)
    # One table for the stages' inner times and their next inputs' (a time repeated costs nothing extra).
    # The next input is zero where no call can follow (s = 1 with sigma_bar = 0).
    no_input = [some and v >= 1.0 for v in s_in]
    # (Inner time 0 stands in for an input that is zero in every row: any time would do, its values are not
    # used. In rows that need it, the input at s = 1 is evaluated and zeroed where sigma_bar = 0.)
    tm, c_x, c_b, w1, w2, w3, a_x, a_o = inner.table(svals + [0.0 if z and every else v
                                                             for v, z in zip(s_in, no_input)])
    cols = w1.dim() - 1
    scale = torch.tensor(scales + scales, **_F64).reshape((-1,) + (1,) * cols)
    # scale * u_s(state, out) = A state + X x_t + O out at every stage.
    w2a = w2 * a_x
    A, X, O = scale * (w1 + w2a * c_b), scale * (w3 + w2a * c_x), scale * w2 * a_o
    n_xt, n_new = c_x[S:], c_b[S:]
    if any(no_input):
        skip = torch.tensor(no_input).reshape((-1,) + (1,) * cols) & singular
        n_xt, n_new = torch.where(skip, 0.0, n_xt), torch.where(skip, 0.0, n_new)
    A, X, O = A[:S], X[:S], O[:S]
    if solver == "euler":
        k_base, k_stage = _ONE + A, _ZERO
    else:
        # predict (or Heun's last Euler step): (1 + A, 0); the corrector: midpoint (1, A), Heun (1/2, 1/2 + A).
        corrects = torch.tensor([k == "correct" for k in kinds]).reshape((-1,) + (1,) * cols)
        k_base = torch.where(corrects, 1.0 if solver == "midpoint" else 0.5, _ONE + A)
        k_stage = torch.where(corrects, A if solver == "midpoint" else 0.5 + A, _ZERO)
        if solver == "heun" and some and not every:
            k_base, k_stage, X, O = heun_rows_ending_singular(k_base, k_stage, X, O, singular)
    coefs = torch.stack(torch.broadcast_tensors(k_base, k_stage, X, O, n_xt, n_new), dim=-1)
    # The first stage with D_t(x_t) handed in (reused from a reward evaluation) instead of the raw output:
    # the denoiser's coefficients (0, 1) at inner time 0, the first stage's.
    sc, w2_0 = scale[0], w2[0]
    w2z = w2_0 * _ZERO
    first = coefs[0].clone()
    first[..., 0] = _ONE + sc * (w1[0] + w2z * c_b[0])
    first[..., 2] = sc * (w3[0] + w2z * c_x[0])
    first[..., 3] = sc * w2_0 * _ONE
    init = _row(k_base=inner.gamma, k_out=sigmabar0)
    return _plan(coefs, tm[:S], kinds, first, init)


def heun_rows_ending_singular(k_base, k_stage, X, O, singular):
    """Heun's rows [S, ...] with the last corrector keeping its predictor (new = tmp: the Euler step) in the
    rows where ``singular``: the velocity at the step's end is singular there (its model call still runs, on
    whatever input, for the other rows of the batch, and its output is not used)."""
    last = torch.zeros((k_base.shape[0],) + (1,) * (k_base.dim() - 1), dtype=torch.bool)
    last[-1] = True
    last = last & singular
    return (torch.where(last, _ZERO, k_base), torch.where(last, _ONE, k_stage), torch.where(last, _ZERO, X),
            torch.where(last, _ZERO, O))


# ---------------------------------------------------------------------------------------------------- ODE
def ode_plan(model: FlowModel, t, t_next, calls: int, solver: str) -> Plan:
    """Stages of ``calls`` model calls of an ODE solver from t to t_next (all stages' times evaluated at once,
    as one tensor: elementwise, the same bits as one time at a time)."""
    n, _ = steps_per_call(calls, solver)
    h = (t_next - t) / n
    sch, pred = model.schedule, model.prediction
    # Rows whose end is at sigma = 0, where the velocity of a non-velocity model is singular: Heun's last
    # corrector there keeps its predictor (Euler's step), in every row (one call fewer) or in those rows only.
    singular = (sch.sigma(t_next) == 0) if pred != "velocity" else torch.zeros((), dtype=torch.bool)
    last_singular = bool(torch.all(singular))
    # Each stage: (kind, its step j, offset of its time from t + j h: 0, h / 2 or h, its scale: h or h / 2).
    stages = []
    for j in range(n):
        if solver == "euler" or (solver == "heun" and last_singular and j == n - 1):
            stages.append(("step", j, 0, 1))
        elif solver == "midpoint":
            stages += [("predict", j, 0, 2), ("correct", j, 2, 1)]
        else:
            stages += [("predict", j, 0, 1), ("correct", j, 1, 2)]
    cols = h.dim()
    col = (-1,) + (1,) * cols
    # tau = t + j h (+ h or + h / 2): the same operations, in the same order, as one time at a time.
    tau = t + torch.tensor([st[1] for st in stages], **_F64).reshape(col) * h
    for off, d in ((1, h), (2, h / 2)):
        if any(st[2] == off for st in stages):
            tau = torch.where(torch.tensor([st[2] == off for st in stages]).reshape(col), tau + d, tau)
    halves = [st[3] == 2 for st in stages]
    scale = torch.where(torch.tensor(halves).reshape(col), h / 2, h) if any(halves) else h
    tm = model.clamp_time(tau)
    b_x, b_o = velocity_coefficients(sch, pred, tm)
    A, O = scale * b_x, scale * b_o
    kinds = [st[0] for st in stages]
    if solver == "euler":
        k_base, k_stage = _ONE + A, _ZERO
    else:
        # predict (or Heun's last Euler step): (1 + A, 0); the corrector: midpoint (1, A), Heun (1/2, 1/2 + A).
        corrects = torch.tensor([k == "correct" for k in kinds]).reshape(col)
        k_base = torch.where(corrects, 1.0 if solver == "midpoint" else 0.5, _ONE + A)
        k_stage = torch.where(corrects, A if solver == "midpoint" else 0.5 + A, _ZERO)
        if solver == "heun" and bool(torch.any(singular)) and not last_singular:
            k_base, k_stage, _, O = heun_rows_ending_singular(k_base, k_stage, _ZERO, O, singular)
    coefs = torch.stack(torch.broadcast_tensors(k_base, k_stage, _ZERO, O, _ZERO, _ONE), dim=-1)
    # The first stage with D_t(x_t) handed in: the x0 coefficients at t.
    tm0 = model.clamp_time(t)
    b_x0, b_o0 = velocity_coefficients(sch, "x0", tm0)
    sc = h / 2 if solver == "midpoint" else h
    first = coefs[0].clone()
    first[..., 0], first[..., 3] = 1 + sc * b_x0, sc * b_o0
    return _plan(coefs, tm, kinds, first)


# ---------------------------------------------------------------------------------------------------- SDE
def sde_plan(model: FlowModel, t, t_next, calls: int) -> Plan:
    """Euler-Maruyama for dX = [u + (nu^2/2) grad log p_t] dt + nu dW; a DDPM plug-in step where alpha_t = 0
    or where the step starts below the model's time range (there nu^2 ~ 1/alpha, evaluated at the clamped
    time, would blow the Euler-Maruyama step up; the plug-in step is finite and exact in law for the
    denoiser it is given). All steps are evaluated at once, as one tensor of times (elementwise: the same
    bits as one time at a time)."""
    sch = model.schedule
    h = (t_next - t) / calls
    col = (-1,) + (1,) * h.dim()
    tau = t + torch.arange(calls, **_F64).reshape(col) * h
    tm = model.clamp_time(tau)
    a, s, da, ds = sch.alpha(tm), sch.sigma(tm), sch.d_alpha(tm), sch.d_sigma(tm)
    nu2 = 2 * (da / a) * s * s - 2 * s * ds
    plug_here = ((sch.alpha(tau) == 0) | (tm != tau)).unsqueeze(-1)
    # Plug-in DDPM step: x' = gamma x + alpha_bar D + sigma_bar eps with rho_DDPM (finite at alpha = 0).
    # t + j h + h can round past t_next (1190 steps over [0, 1] end at 1 + 2e-16, where VP's sigma is NaN).
    t1 = torch.minimum(tau + h, t_next)
    gamma, abar, sbar = kernel_coefficients(sch, tau, t1, rho_ddpm(sch, tau, t1))

    def rows(pred):
        a_x, a_o = denoiser_coefficients(sch, pred, tm)
        b_x, b_o = velocity_coefficients(sch, pred, tm)
        d_x = b_x + 0.5 * nu2 * (a * a_x - 1) / (s * s)
        d_o = b_o + 0.5 * nu2 * a * a_o / (s * s)
        em = torch.stack(torch.broadcast_tensors(1 + h * d_x, torch.sqrt(h * nu2), _ZERO, h * d_o, _ZERO, _ONE), -1)
        plug = torch.stack(torch.broadcast_tensors(gamma + abar * a_x, sbar, _ZERO, abar * a_o, _ZERO, _ONE), -1)
        return torch.where(plug_here, plug, em)

    # Only the first stage's row with D_t(x_t) handed in is used (the plan's first_denoised).
    return _plan(rows(model.prediction), tm, ["noisy"] * calls, rows("x0")[0])


def as_times(t, name: str, batch: int) -> torch.Tensor:
    """Validate a time (float or Tensor[B]) and return it as float64 on the CPU, shape [] or [B]."""
    if isinstance(t, torch.Tensor):
        if t.dtype == torch.bool or t.is_complex():   # read as 0 / 1, or without the imaginary part
            raise TypeError(f"{name} must be a float or a Tensor of real times, got a Tensor of dtype {t.dtype}")
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

