"""Gaussian probability paths x_t = alpha_t z + sigma_t eps, t=0 noise, t=1 data (MATH.md section 1).

Every schedule works on Python floats and on tensors alike. The sampler evaluates them in float64 on the
host once per transition, so the per-element work never sees a schedule.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch

Time = "float | torch.Tensor"


def _lib(t):
    """The math namespace for ``t``: torch for tensors, math for floats."""
    return torch if isinstance(t, torch.Tensor) else math


def _snr_lib(snr):
    """``_lib`` for an SNR; a negative float is refused (a tensor gives NaN there, as its square root does)."""
    if not isinstance(snr, torch.Tensor) and snr < 0:
        raise ValueError(f"snr must be >= 0 (alpha^2 / sigma^2), got {snr!r}")
    return _lib(snr)


class Schedule:
    """A Gaussian path. Subclasses give alpha, sigma and their derivatives; SNR and its inverse follow."""

    def alpha(self, t):
        raise NotImplementedError

    def sigma(self, t):
        raise NotImplementedError

    def d_alpha(self, t):
        raise NotImplementedError

    def d_sigma(self, t):
        raise NotImplementedError

    def snr(self, t):
        """alpha_t^2 / sigma_t^2 (inf at t = 1)."""
        a, s = self.alpha(t), self.sigma(t)
        if isinstance(s, torch.Tensor):
            return torch.where(s == 0, torch.full_like(s, math.inf), a * a / torch.where(s == 0, 1.0, s * s))
        return math.inf if s * s == 0 else a * a / (s * s)   # s * s, not s: it may underflow, as a tensor's gives inf

    def time_at_snr(self, snr):
        """The t with SNR(t) = snr, by a bracketed bisection in float64 (monotone SNR assumed)."""
        return _bisect_time(self, snr)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


_ONE_BITS = 0x3FF0000000000000   # the int64 bit pattern of the float64 1.0


def _bisect_time(schedule: Schedule, snr):
    """Invert a monotone SNR on [0, 1] in float64, to one ulp of the time (near t = 0 as near t = 1).

    Non-negative float64 numbers are ordered as their int64 bit patterns, so the bisection halves the patterns
    between 0.0 and 1.0: 62 halvings reach adjacent floats. Halving [0, 1] in value instead leaves an absolute
    error of 2^-64, all of the digits of a time like 1e-20 (tiny SNRs, which are well conditioned)."""
    _snr_lib(snr)
    target = torch.as_tensor(snr, dtype=torch.float64)
    lo = torch.zeros(target.shape, dtype=torch.int64, device=target.device)
    hi = torch.full_like(lo, _ONE_BITS)
    for _ in range(_ONE_BITS.bit_length()):
        mid = (lo + hi) // 2
        below = schedule.snr(mid.view(torch.float64)) < target
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    t_lo, t_hi = lo.view(torch.float64), hi.view(torch.float64)
    # The end whose SNR is nearer the target (lo = 0 where the target is at or below SNR_0).
    t = torch.where(target - schedule.snr(t_lo) <= schedule.snr(t_hi) - target, t_lo, t_hi)
    t = torch.where(torch.isinf(target), torch.ones_like(t), t)
    t = torch.where(torch.isnan(target) | (target < 0), torch.full_like(t, math.nan), t)   # not a valid-looking time
    return t if isinstance(snr, torch.Tensor) else float(t)


class LinearSchedule(Schedule):
    """CondOT / rectified flow: alpha = t, sigma = 1 - t."""

    def alpha(self, t):
        return t

    def sigma(self, t):
        return 1 - t

    def d_alpha(self, t):
        return torch.ones_like(t) if isinstance(t, torch.Tensor) else 1.0

    def d_sigma(self, t):
        return -torch.ones_like(t) if isinstance(t, torch.Tensor) else -1.0

    def time_at_snr(self, snr):
        # t / (1 - t) = sqrt(snr)  =>  t = r / (1 + r); inf -> 1.
        m = _snr_lib(snr)
        r = m.sqrt(snr)
        if isinstance(r, torch.Tensor):
            return torch.where(torch.isinf(r), torch.ones_like(r), r / (1 + r))
        return 1.0 if math.isinf(r) else r / (1 + r)


class CosineSchedule(Schedule):
    """alpha = sin(pi t / 2), sigma = cos(pi t / 2)."""

    def alpha(self, t):
        return _lib(t).sin(math.pi * t / 2)

    def sigma(self, t):
        # cos(pi t / 2) = sin(pi (1 - t) / 2), where 1 - t is exact near the data end: cos of the rounded
        # pi t / 2 is off by 6e-17 there (6e-17, not 0, at t = 1; 60% off one ulp below). Past 1, sigma is 0.
        u = (1 - t).clamp(min=0) if isinstance(t, torch.Tensor) else max(1 - t, 0.0)
        return _lib(t).sin(math.pi * u / 2)

    def d_alpha(self, t):
        return (math.pi / 2) * self.sigma(t)

    def d_sigma(self, t):
        return -(math.pi / 2) * _lib(t).sin(math.pi * t / 2)

    def time_at_snr(self, snr):
        m = _snr_lib(snr)
        return (2 / math.pi) * m.atan(m.sqrt(snr))


class VPSchedule(Schedule):
    """Variance-preserving path of Song et al. in this time direction.

    T(t) = 0.5 (1-t)^2 (beta_max - beta_min) + (1-t) beta_min, alpha = exp(-T/2), sigma = sqrt(1 - alpha^2).
    Note alpha_0 = exp(-(beta_min + beta_max)/4) > 0: VP never reaches pure noise exactly.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        # beta_max > 0: with beta_min = beta_max = 0 the path never leaves the data (alpha = 1, sigma = 0).
        ok = all(isinstance(b, numbers.Real) and not isinstance(b, bool) for b in (beta_min, beta_max))
        if not ok or not 0 <= beta_min <= beta_max < math.inf or not beta_max > 0:
            raise ValueError(f"VPSchedule needs finite numbers 0 <= beta_min <= beta_max with beta_max > 0, got "
                             f"beta_min={beta_min!r}, beta_max={beta_max!r}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def _T(self, t):
        u = 1 - t
        return 0.5 * u * u * (self.beta_max - self.beta_min) + u * self.beta_min

    def _dT(self, t):
        # d/dt of T(t) = -[(1-t)(beta_max - beta_min) + beta_min]
        return -((1 - t) * (self.beta_max - self.beta_min) + self.beta_min)

    def alpha(self, t):
        return _lib(t).exp(-0.5 * self._T(t))

    def sigma(self, t):
        m = _lib(t)
        return m.sqrt(-m.expm1(-self._T(t)))

    def d_alpha(self, t):
        return -0.5 * self._dT(t) * self.alpha(t)

    def d_sigma(self, t):
        # sigma^2 = 1 - alpha^2  =>  sigma' = -alpha alpha' / sigma. At t = 1 (sigma = 0) its limit: -inf when
        # beta_min > 0 (sigma ~ sqrt(beta_min (1 - t))), -sqrt(beta_max / 2) when beta_min = 0 (sigma is linear).
        a, s = self.alpha(t), self.sigma(t)
        at_data = -math.inf if self.beta_min > 0 else -math.sqrt(0.5 * self.beta_max)
        if isinstance(s, torch.Tensor):
            return torch.where(s == 0, at_data, -a * self.d_alpha(t) / torch.where(s == 0, 1.0, s))
        return at_data if s == 0 else -a * self.d_alpha(t) / s

    def time_at_snr(self, snr):
        # alpha^2 = snr / (1 + snr) => T = log1p(1/snr); solve 0.5 d u^2 + beta_min u - T = 0 for u = 1 - t.
        m = _snr_lib(snr)
        # SNR 0 (below VP's lowest): T = inf and t = 0 after the clamp, for a float as for a tensor.
        T = m.log1p(1 / snr) if isinstance(snr, torch.Tensor) or snr != 0 else math.inf
        d = self.beta_max - self.beta_min
        if d == 0:
            u = T / self.beta_min
        else:
            u = (m.sqrt(self.beta_min ** 2 + 2 * d * T) - self.beta_min) / d
        t = 1 - u
        if isinstance(t, torch.Tensor):
            # A negative SNR gives NaN, as the other schedules' square root does (here T < 0 or -inf could
            # come out as a time past 1, clamped to a valid-looking 1).
            return torch.where(snr < 0, math.nan, t.clamp(0.0, 1.0))
        return min(max(t, 0.0), 1.0)

    def __repr__(self) -> str:
        return f"VPSchedule(beta_min={self.beta_min}, beta_max={self.beta_max})"


class CustomSchedule(Schedule):
    """A schedule from user callables. time_at_snr falls back to a float64 bisection.

    Each callable takes a float64 Tensor of times and returns values of the same shape; a float time is handed
    to it as a 0-d float64 Tensor and its value returned as a float. Checked once, since a wrong schedule would
    sample silently wrong: on [0, 1], ends included, alpha and sigma finite and >= 0, sigma_0 > 0, alpha_1 > 0
    and the SNR strictly increasing (the bisection inverts it); d_alpha / d_sigma equal to the derivatives of
    alpha / sigma inside (central differences) and not NaN at the ends (an infinite limit, as VP's sigma' at
    t = 1, is allowed). The convention's alpha_0 = 0, sigma_0 = 1, alpha_1 = 1, sigma_1 = 0 is not enforced (a
    discrete schedule's last knot may keep a little noise): samples at t = 1 are alpha_1 z + sigma_1 eps.
    """

    def __init__(self, alpha: Callable, sigma: Callable, d_alpha: Callable, d_sigma: Callable):
        for name, f in (("alpha", alpha), ("sigma", sigma), ("d_alpha", d_alpha), ("d_sigma", d_sigma)):
            if not callable(f):
                raise TypeError(f"CustomSchedule: {name} must be callable, got {type(f).__name__}")
        self._a, self._s, self._da, self._ds = alpha, sigma, d_alpha, d_sigma
        self._validate()

    def _evaluate(self, name: str, t: torch.Tensor) -> torch.Tensor:
        try:
            v = torch.as_tensor(getattr(self, name)(t), dtype=torch.float64)
        except Exception as e:   # a callable written for floats only
            raise TypeError(f"CustomSchedule: {name} must accept a float64 Tensor of times and return a Tensor "
                            f"of the same shape ({type(e).__name__}: {e})") from None
        if v.shape != t.shape:
            raise TypeError(f"CustomSchedule: {name} must return one value per time, got shape "
                            f"{tuple(v.shape)} for times of shape {tuple(t.shape)}")
        return v

    def _validate(self, points: int = 199, h: float = 1e-3) -> None:
        # Values and the SNR on all of [0, 1]: NaN or a falling SNR near an end reaches the sampler (and the
        # bisection of time_at_snr) as silently as inside. Derivatives inside, and not NaN at the ends.
        full = torch.linspace(0, 1, 1001, dtype=torch.float64)
        on_grid = {}
        for name in ("alpha", "sigma"):
            v = self._evaluate(name, full)
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"CustomSchedule: {name} is not finite at t={float(full[~torch.isfinite(v)][0]):g}")
            if bool((v < 0).any()):
                i = int((v < 0).nonzero()[0, 0])
                raise ValueError(f"CustomSchedule: {name} must be >= 0, got {float(v[i]):.6g} at t={float(full[i]):g}")
            on_grid[name] = v
        a, s = on_grid["alpha"], on_grid["sigma"]
        if not float(s[0]) > 0:
            raise ValueError(f"CustomSchedule: sigma must be > 0 at t=0 (noise), got {float(s[0])!r}")
        snr = torch.where(s == 0, math.inf, a * a / torch.where(s == 0, 1.0, s * s))
        if not bool(torch.all(snr[1:] > snr[:-1])):
            i = int((snr[1:] <= snr[:-1]).nonzero()[0, 0])
            raise ValueError(f"CustomSchedule: the SNR alpha^2 / sigma^2 must increase strictly with t (t = 0 noise, "
                             f"t = 1 data), but it does not between t={float(full[i]):.4f} and "
                             f"t={float(full[i + 1]):.4f}")
        if not float(a[-1]) > 0:
            raise ValueError(f"CustomSchedule: alpha must be > 0 at t=1 (data), got {float(a[-1])!r}")
        for name in ("d_alpha", "d_sigma"):
            v = self._evaluate(name, full[[0, -1]])
            if bool(torch.isnan(v).any()):
                t_bad = float(full[[0, -1]][torch.isnan(v)][0])
                raise ValueError(f"CustomSchedule: {name} is NaN at t={t_bad:g} (an infinite limit, as VP's sigma' "
                                 f"at t = 1, may be given as inf)")
        t = torch.linspace(0.005, 0.995, points, dtype=torch.float64)
        vals = {}
        for name, tt in (("alpha", t), ("sigma", t), ("d_alpha", t), ("d_sigma", t),
                         ("alpha", t + h), ("alpha", t - h), ("sigma", t + h), ("sigma", t - h)):
            v = self._evaluate(name, tt)
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"CustomSchedule: {name} is not finite at t={float(tt[~torch.isfinite(v)][0]):g}")
            vals.setdefault(name, []).append(v)
        for d_name, f_name in (("d_alpha", "alpha"), ("d_sigma", "sigma")):
            f, up, down = vals[f_name]
            left, right = (f - down) / h, (up - f) / h
            d = vals[d_name][0]
            # d must lie between the one-sided differences, up to 1e-3: that admits kinks (piecewise-linear
            # tables of a discrete schedule) and callables computing in float32 (rounding / h ~ 1e-4), and
            # still catches a wrong, swapped or sign-flipped derivative, an O(1) error.
            tol = 1e-3 * (1 + torch.maximum(left.abs(), right.abs()))
            err = (torch.clamp(torch.minimum(left, right) - d, min=0)
                   + torch.clamp(d - torch.maximum(left, right), min=0))
            if bool((err > tol).any()):
                i = int((err / tol).argmax())
                raise ValueError(f"CustomSchedule: {d_name} is not the derivative of {f_name}: at t={float(t[i]):.4f} "
                                 f"it is {float(d[i]):.6g}, the one-sided differences are {float(left[i]):.6g} and "
                                 f"{float(right[i]):.6g}")

    @staticmethod
    def _call(f: Callable, t):
        if isinstance(t, torch.Tensor):
            return f(t)
        return float(f(torch.tensor(float(t), dtype=torch.float64)))

    def alpha(self, t):
        return self._call(self._a, t)

    def sigma(self, t):
        return self._call(self._s, t)

    def d_alpha(self, t):
        return self._call(self._da, t)

    def d_sigma(self, t):
        return self._call(self._ds, t)
