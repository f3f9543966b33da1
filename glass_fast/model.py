"""FlowModel: a user network plus its schedule and parameterization. The one home of parameterization math.

Every parameterization is linear in (x, output) at a fixed time: D_t(x) = a_x x + a_o out (MATH.md section 1)
with float64 coefficients computed on the host, applied to tensors by ``combine_output`` and ``solve_output``.
"""
from __future__ import annotations

import numbers
from typing import Callable

import torch

from .ops._checks import FLOAT_DTYPES
from .schedules import Schedule

PREDICTIONS = ("velocity", "x0", "epsilon", "score")

# Times at which a parameterization is evaluated. Epsilon and score are singular at alpha = 0 (t = 0 on the
# linear and cosine paths); score also at sigma = 0. The model is evaluated at the nearest time inside.
_DEFAULT_TIME_RANGE = {
    "velocity": (0.0, 1.0),
    "x0": (0.0, 1.0),
    "epsilon": (1e-4, 1.0),
    "score": (1e-4, 1.0 - 1e-4),
}


def denoiser_coefficients(schedule: Schedule, prediction: str, t):
    """(a_x, a_o) with D_t(x) = a_x x + a_o out for a model output ``out`` at time ``t`` (float64)."""
    a, s = schedule.alpha(t), schedule.sigma(t)
    if prediction == "x0":
        return 0.0 * a, 1.0 + 0.0 * a
    if prediction == "velocity":
        # At sigma = 0 the state is alpha z itself, D = x / alpha: the quotient below reaches that only as a
        # limit where sigma' is infinite there (VP at t = 1, where it is inf / inf).
        if not isinstance(s, torch.Tensor) and s == 0:
            return 1.0 / a, 0.0
        da, ds = schedule.d_alpha(t), schedule.d_sigma(t)
        den = da * s - a * ds
        a_x, a_o = -ds / den, s / den
        if isinstance(s, torch.Tensor):
            at_data = s == 0
            a_x, a_o = torch.where(at_data, 1.0 / a, a_x), torch.where(at_data, 0.0, a_o)
        return a_x, a_o
    if prediction == "epsilon":
        return 1.0 / a, -s / a
    if prediction == "score":
        return 1.0 / a, s * s / a
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


# Why each parameterization's conversion to the denoiser can be singular (FlowModel's time_range check).
_SINGULAR = {
    "velocity": "D = (sigma_t u - sigma_t' x) / (alpha_t' sigma_t - alpha_t sigma_t') divides by zero",
    "x0": "the schedule is not finite there",
    "epsilon": "D = (x - sigma_t eps) / alpha_t divides by alpha_t",
    "score": "D = (x + sigma_t^2 score) / alpha_t divides by alpha_t",
}


def check_time_range(schedule: Schedule, prediction: str, lo: float, hi: float) -> None:
    """Refuse end points at which the model's output cannot be converted to the denoiser: planning would
    accept them and the first transition through them would turn finite network outputs into NaN or Inf.
    Between the end points alpha_t > 0 and sigma_t > 0 (the SNR increases strictly), so the ends suffice."""
    ends = torch.tensor((lo, hi), dtype=torch.float64)
    a_x, a_o = (torch.as_tensor(c, dtype=torch.float64).expand(2)
                for c in denoiser_coefficients(schedule, prediction, ends))
    for i, t in enumerate((lo, hi)):
        if not bool(torch.isfinite(a_x[i]) & torch.isfinite(a_o[i])):
            a, s = float(schedule.alpha(ends[i])), float(schedule.sigma(ends[i]))
            raise ValueError(f"FlowModel: time_range {(lo, hi)} includes t={t}, where a {prediction!r} model's output "
                             f"cannot be converted to the denoiser (alpha_t={a:.6g}, sigma_t={s:.6g}: "
                             f"{_SINGULAR[prediction]}); pass a time_range (lo, hi) that leaves out t={t}")


def velocity_coefficients(schedule: Schedule, prediction: str, t):
    """(b_x, b_o) with u_t(x) = b_x x + b_o out. Singular at sigma = 0 except for velocity models."""
    if prediction == "velocity":
        z = 0.0 * schedule.alpha(t)
        return z, 1.0 + z
    a, s = schedule.alpha(t), schedule.sigma(t)
    da, ds = schedule.d_alpha(t), schedule.d_sigma(t)
    a_x, a_o = denoiser_coefficients(schedule, prediction, t)
    # u = (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) D
    k = da - a * ds / s
    return ds / s + k * a_x, k * a_o


def output_from_denoised(schedule: Schedule, prediction: str, t, x, d):
    """The raw output a ``prediction`` model would give for denoiser value ``d`` at (x, t) (see solve_output)."""
    return solve_output(denoiser_coefficients(schedule, prediction, t), x, d)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, else float32 (half precision upcast, rounded once), as in the fused step: float64
    for float32 would copy the state for accuracy its inputs lack (error bound: tests/test_conversions.py)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def coefficient_like(c, like: torch.Tensor):
    """``c`` to multiply ``like`` [N, ...]: a float for a number or 0-d host tensor (no device copy), else on
    like's device and dtype, [N] -> [N, 1, ...]; never read on the host (no stream sync)."""
    if not isinstance(c, torch.Tensor) or (c.dim() == 0 and c.device.type == "cpu"):
        return float(c)
    c = c.to(device=like.device, dtype=like.dtype)
    return c.reshape(c.shape + (1,) * (like.dim() - c.dim()))


def combine_output(c, x: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """c_x x + c_o out (c_o out for x None) for c = (c_x, c_o), floats or host or per-row [N] tensors: in the
    dtype x and out promote to, computed in its opmath_dtype. Not fused (FMA): float64 runs that must match
    across the sampler's paths rely on the plain expression's rounding."""
    dtype = out.dtype if x is None else torch.promote_types(x.dtype, out.dtype)
    outs = out.to(opmath_dtype(dtype))
    r = coefficient_like(c[1], outs) * outs
    return (r if x is None else coefficient_like(c[0], outs) * x.to(outs.dtype) + r).to(dtype)


def solve_output(c, x: torch.Tensor | None, d: torch.Tensor) -> torch.Tensor:
    """The output with combine_output(c, x, out) = d. Where c_o = 0 it does not enter D (sigma = 0: D = x / alpha)
    and any output fits: 0 there, not the quotient's NaN or Inf."""
    c_x, c_o = (torch.as_tensor(v, dtype=torch.float64) for v in c)
    inv = torch.where(c_o == 0, 0.0, 1 / torch.where(c_o == 0, 1.0, c_o))
    return combine_output((-c_x * inv, inv), x, d)


def _check_host_times(t: torch.Tensor) -> None:
    """Refuse a CPU tensor of times outside [0, 1] or NaN (microseconds: one reduction, no device sync)."""
    if t.numel() == 0:
        return
    if t.dim() == 0:
        lo = hi = float(t)
    else:
        lo, hi = (float(v) for v in torch.aminmax(t if t.is_floating_point() else t.double()))
    if not 0.0 <= lo <= hi <= 1.0:   # False for NaN, which aminmax propagates
        values = "NaN" if lo != lo or hi != hi else f"values in [{lo}, {hi}]"
        got = f"{t!r}" if t.dim() == 0 else f"a Tensor of shape {tuple(t.shape)} holding {values}"
        raise ValueError(f"t must be times in [0, 1] (0 noise, 1 data), got {got}")


def _row_times(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` as one time per row of x: [B] from a 0-d or one-element [1] tensor. Any other shape is refused: a
    [B, 1] or [B, C] time would reach the network against its t [B] contract, and broadcast into per-element
    coefficients of the conversion (a shape check only: nothing is read from the device)."""
    n = x.shape[0]
    if t.dim() == 0 or t.shape == (1,):
        return t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"t must be a 0-d Tensor or a Tensor[{n}] (one time per row of x {list(x.shape)}), "
                         f"got shape {tuple(t.shape)}")
    return t


class FlowModel:
    """A network fn(x, t) with its schedule and what it predicts.

    Args:
        fn: callable(x [B, ...], t [B]) -> [B, ...]; t=0 is noise, t=1 is data. ``t`` is float32 on x's device.
        schedule: the Gaussian path the network was trained on.
        prediction: "velocity" | "x0" | "epsilon" | "score".
        dtype: the dtype the network runs in (inputs are cast to it); None keeps the sampler state's dtype.
        time_range: (lo, hi) times at which the network is evaluated; None uses a safe default for the
            parameterization (epsilon and score are singular at alpha = 0, score also at sigma = 0).
        max_batch: split each call into chunks of at most this many rows (memory-bounded particles);
            results equal an unsplit call for any network that treats rows independently.

    Example:
        >>> model = FlowModel(lambda x, t: -x, LinearSchedule(), prediction="velocity")
        >>> # A network trained with sigma = 1 - t (t = 1 noise, as FLUX and SD3): its time is reversed and a
        >>> # velocity changes sign (x0 and epsilon outputs do not).
        >>> model = FlowModel(lambda x, t: -net(x, 1 - t), LinearSchedule(), prediction="velocity")
    """

    def __init__(self, fn: Callable, schedule: Schedule, prediction: str = "velocity", *,
                 dtype: torch.dtype | None = None, time_range: tuple[float, float] | None = None,
                 max_batch: int | None = None):
        if not callable(fn):
            raise TypeError(f"FlowModel: fn must be callable, got {type(fn).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"FlowModel: schedule must be a glass_fast Schedule, got {type(schedule).__name__}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"FlowModel: prediction must be one of {PREDICTIONS}, got {prediction!r}")
        # Only the dtypes the sampler's ops take (float8 is floating too, but would fail deep inside a stage).
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise ValueError(f"FlowModel: dtype must be None or a floating torch.dtype (float32, float16, "
                             f"bfloat16, float64), got {dtype!r}")
        try:
            lo, hi = (float(v) for v in (time_range if time_range is not None else _DEFAULT_TIME_RANGE[prediction]))
        except (TypeError, ValueError):
            raise ValueError(f"FlowModel: time_range must be None or a pair (lo, hi) of times, got {time_range!r}") from None
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"FlowModel: time_range must satisfy 0 <= lo < hi <= 1, got {(lo, hi)}")
        check_time_range(schedule, prediction, lo, hi)
        self.fn, self.schedule, self.prediction, self.dtype = fn, schedule, prediction, dtype
        self.time_range = (float(lo), float(hi))
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, numbers.Integral)
                                      or max_batch < 1):
            raise ValueError(f"FlowModel: max_batch must be None or an integer >= 1, got {max_batch!r}")
        self.max_batch = None if max_batch is None else int(max_batch)
        self._count = [0]   # network evaluations (batched calls); a cell shared with with_max_batch copies

    @property
    def calls(self) -> int:
        """Network evaluations (batched calls) so far, counted also through copies made by ``with_max_batch``."""
        return self._count[0]

    @calls.setter
    def calls(self, value: int) -> None:
        self._count[0] = value

    # -- the single call site -------------------------------------------------------------------------------
    def input_dtype(self, x: torch.Tensor) -> torch.dtype:
        return self.dtype or x.dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Raw network output at (x, t). ``t``: Tensor[B], or a 0-d or [1] tensor (broadcast to the batch)."""
        state, x = x, x.to(self.input_dtype(x))
        t = _row_times(t.to(device=x.device, dtype=torch.float32), x)   # converted first: one element, not B
        # Where the network is handed the sampler's state itself (no dtype conversion, no copy), an in-place
        # edit of its input would silently corrupt the run: caught through the version counter (views share
        # it). A converted copy is the network's own to edit.
        version = None if torch.compiler.is_compiling() or x.is_inference() or x is not state else x._version
        if self.max_batch is not None and x.shape[0] > self.max_batch:
            outs = [self.fn(xc, tc) for xc, tc in zip(x.split(self.max_batch), t.split(self.max_batch))]
            # A chunk that is not a Tensor (a tuple, a dict) reaches the check below, not torch.cat's own error.
            bad = [o for o in outs if not isinstance(o, torch.Tensor)]
            out = bad[0] if bad else torch.cat(outs)
        else:
            out = self.fn(x, t)
        if version is not None and x._version != version:
            raise RuntimeError("the network modified its input x in place; it is the sampler's state, which that "
                               "corrupts: compute out of place (or work on x.clone() inside the network)")
        if not torch.compiler.is_compiling():
            # Compiled and captured transitions are counted by their caller: a counter traced here
            # would become a guard on its value and recompile the transition at every call.
            self.calls += 1
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model output must be a Tensor, got {type(out).__name__}")
        if out.shape != x.shape:
            raise ValueError(f"model output has shape {tuple(out.shape)}, expected the input's shape {tuple(x.shape)}")
        if out.dtype != x.dtype:
            raise TypeError(f"model output has dtype {out.dtype}, expected the input's dtype {x.dtype}")
        if out.device != x.device:
            raise ValueError(f"model output is on {out.device}, expected the input's device {x.device}")
        return out

    def with_max_batch(self, max_batch: int | None) -> "FlowModel":
        """The same model, calling the network in chunks of at most ``max_batch`` rows.

        The copy counts its calls on this model's counter (``calls``), so a run through it is accounted to
        the model the caller holds."""
        copy = FlowModel(self.fn, self.schedule, self.prediction, dtype=self.dtype, time_range=self.time_range,
                         max_batch=max_batch)
        copy._count = self._count
        return copy

    def clamp_time(self, t):
        lo, hi = self.time_range
        if isinstance(t, torch.Tensor):
            return t.clamp(lo, hi)
        return min(max(float(t), lo), hi)

    # -- conversions ----------------------------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, t) -> torch.Tensor:
        """D_t(x) = E[z | x_t = x] (one network call). ``t``: float or Tensor[B] in [0, 1] (see ``_linear``)."""
        return self._linear(x, t, denoiser_coefficients)

    def velocity(self, x: torch.Tensor, t) -> torch.Tensor:
        """u_t(x), the marginal velocity (one network call). ``t``: float or Tensor[B] in [0, 1] (see ``_linear``)."""
        return self._linear(x, t, velocity_coefficients)

    def _linear(self, x: torch.Tensor, t, coefficients) -> torch.Tensor:
        """c_x x + c_o out with (c_x, c_o) = coefficients(schedule, prediction, t), in x's dtype (combine_output).

        A float ``t`` stays on the host (no copy to the device: nothing here synchronises a CUDA stream).
        Times outside [0, 1] (or NaN) are refused for a float and for a CPU tensor; a tensor on an accelerator
        is not checked, since reading its values would synchronise the host with the stream: its times are
        clamped to ``time_range`` as they are.
        """
        if isinstance(t, torch.Tensor):
            if t.device.type == "cpu":
                _check_host_times(t)
            t_net = tc = self.clamp_time(_row_times(t.to(device=x.device, dtype=torch.float64), x))
        else:
            if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0.0 <= float(t) <= 1.0:
                raise ValueError(f"t must be a time in [0, 1] (0 noise, 1 data) or a Tensor, got {t!r}")
            tc = self.clamp_time(float(t))
            t_net = torch.full((x.shape[0],), tc, dtype=torch.float32, device=x.device)
            tc = torch.tensor(tc, dtype=torch.float64)  # CPU tensor: inf, not ZeroDivisionError, at singularities
        c = self._coefficients(tc, coefficients)
        return combine_output(c, x, self(x, t_net)).to(x.dtype)

    def denoised_from(self, x: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """D_t(x) from ``out``, the network's output at (x, t) already computed: ``denoise`` without its call.
        ``t``: the model time(s) ``out`` was computed at, in float64 (0-d or [B])."""
        return combine_output(self._coefficients(t, denoiser_coefficients), x, out).to(x.dtype)

    def _coefficients(self, tc: torch.Tensor, coefficients):
        c = coefficients(self.schedule, self.prediction, tc)
        if tc.device.type == "cpu":
            self._check_finite(c, tc, coefficients)
        return c

    def _check_finite(self, c, tc: torch.Tensor, coefficients) -> None:
        """Refuse host times where the conversion is singular (the velocity of a model that does not predict
        it, at sigma = 0): its Inf / NaN would come back as if the network had returned them."""
        tc, a_x, a_o = torch.broadcast_tensors(tc, *(torch.as_tensor(v, dtype=torch.float64) for v in c))
        bad = ~(torch.isfinite(a_x) & torch.isfinite(a_o))
        if bool(bad.any()):
            t = tc[bad].reshape(-1)[0]
            at = f"alpha_t={float(self.schedule.alpha(t)):.6g}, sigma_t={float(self.schedule.sigma(t)):.6g}"
            if coefficients is velocity_coefficients:
                raise ValueError(f"FlowModel.velocity: the velocity of a model with prediction={self.prediction!r} "
                                 f"is singular at t={float(t):g} ({at}: u = (sigma_t'/sigma_t) x + ... divides by "
                                 f"sigma_t; only prediction='velocity' is finite there): evaluate it where sigma_t > 0")
            raise ValueError(f"FlowModel.denoise: the conversion of prediction={self.prediction!r} to the denoiser "
                             f"is singular at t={float(t):g} ({at}): {_SINGULAR[self.prediction]}")

    def __repr__(self) -> str:
        return f"FlowModel({getattr(self.fn, '__name__', type(self.fn).__name__)}, {self.schedule!r}, prediction={self.prediction!r})"
