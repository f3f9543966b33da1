"""Schedules against high-precision references at and near the ends, the inverse of the SNR over its whole
range, user-supplied schedules, and the parameterization conversions built on them (MATH.md section 1)."""
import math
import re

import mpmath
import pytest
import torch

import glass_fast as gf
from glass_fast.model import PREDICTIONS, combine_output, denoiser_coefficients, solve_output, velocity_coefficients

F64 = dict(dtype=torch.float64)


def _cosine_parts():
    cos = gf.CosineSchedule()
    return cos.alpha, cos.sigma, cos.d_alpha, cos.d_sigma


def _linear_parts():
    lin = gf.LinearSchedule()
    return lin.alpha, lin.sigma, lin.d_alpha, lin.d_sigma


BUILT_IN = [gf.LinearSchedule(), gf.CosineSchedule(), gf.VPSchedule(), gf.VPSchedule(0.0, 20.0),
            gf.VPSchedule(1.0, 1.0)]
ALL = BUILT_IN + [gf.CustomSchedule(*_cosine_parts())]
# The ends, points a few ulps from them, and interior points.
SPECIAL = [0.0, 1e-300, 1e-12, 1e-6, 0.1, 0.5, 0.9, 1 - 1e-6, 1 - 1e-9, 1 - 1e-12, 1 - 2 ** -52, 1 - 2 ** -53, 1.0]


def _reference(sch):
    """(alpha, sigma, d_alpha, d_sigma) of ``sch`` as functions of an mpmath time, from MATH.md's formulas."""
    pi = mpmath.pi
    if isinstance(sch, gf.LinearSchedule):
        return lambda t: t, lambda t: 1 - t, lambda t: mpmath.mpf(1), lambda t: mpmath.mpf(-1)
    if isinstance(sch, (gf.CosineSchedule, gf.CustomSchedule)):
        # cos(pi t / 2) as sin(pi (1 - t) / 2): 0 at t = 1 (a 40-digit pi / 2 leaves cos at 2e-43).
        return (lambda t: mpmath.sin(pi * t / 2), lambda t: mpmath.sin(pi * (1 - t) / 2),
                lambda t: pi / 2 * mpmath.sin(pi * (1 - t) / 2), lambda t: -pi / 2 * mpmath.sin(pi * t / 2))
    lo, hi = mpmath.mpf(sch.beta_min), mpmath.mpf(sch.beta_max)
    T = lambda t: (1 - t) ** 2 * (hi - lo) / 2 + (1 - t) * lo  # noqa: E731
    dT = lambda t: -((1 - t) * (hi - lo) + lo)  # noqa: E731
    alpha = lambda t: mpmath.exp(-T(t) / 2)  # noqa: E731
    sigma = lambda t: mpmath.sqrt(-mpmath.expm1(-T(t)))  # noqa: E731
    d_alpha = lambda t: -dT(t) / 2 * alpha(t)  # noqa: E731
    return alpha, sigma, d_alpha, lambda t: -alpha(t) * d_alpha(t) / sigma(t)


@pytest.mark.parametrize("sch", ALL, ids=repr)
def test_values_and_derivatives_to_a_few_ulps_up_to_the_ends(sch):
    """Each of alpha, sigma, d_alpha, d_sigma within 16 ulps (relative 4e-15) of a 40-digit evaluation at the exact
    float64 time, for floats and tensors. The cosine path computed sigma and d_alpha as cos(pi t / 2), whose
    argument rounds near pi / 2: off by 3e-5 at t = 1 - 1e-12 and by 60% one ulp below 1, with d_alpha(1) = 1e-16."""
    ref = _reference(sch)
    tol = 16 * 2.0 ** -52
    with mpmath.workdps(40):
        for t in SPECIAL:
            for name, f in zip(("alpha", "sigma", "d_alpha", "d_sigma"), ref):
                if name == "d_sigma" and t == 1.0 and isinstance(sch, gf.VPSchedule):
                    continue   # its limit there: test_schedules.py
                exact = f(mpmath.mpf(t))
                for got in (getattr(sch, name)(t), getattr(sch, name)(torch.tensor([t], **F64))[0]):
                    err = abs(mpmath.mpf(float(got)) - exact)
                    assert err <= tol * abs(exact) + 1e-300, f"{name}({t!r}) = {float(got)!r}, exact {exact}"


@pytest.mark.parametrize("sch", ALL, ids=repr)
def test_derivatives_match_finite_differences_over_the_whole_interval(sch):
    """Central differences on a dense grid, second-order one-sided ones at the ends (error O(h^2) both). Near
    t = 1 VP's sigma ~ sqrt(1 - t) is singular: there the step shrinks with the distance to the end, and t = 1
    itself (sigma' infinite) is left to test_schedules.py."""
    t = torch.linspace(0, 1, 1001, **F64)
    for f, d in ((sch.alpha, sch.d_alpha), (sch.sigma, sch.d_sigma)):
        h = torch.full_like(t, 1e-5)
        keep = torch.ones_like(t, dtype=torch.bool)
        if f == sch.sigma and isinstance(sch, gf.VPSchedule) and sch.beta_min > 0:
            h = torch.where(t < 1, torch.minimum(h, 1e-3 * (1 - t)), h)
            keep = t < 1
        fd = (f(t + h) - f(t - h)) / (2 * h)
        fd[0] = (-3 * f(t[0]) + 4 * f(t[0] + h[0]) - f(t[0] + 2 * h[0])) / (2 * h[0])
        fd[-1] = (3 * f(t[-1]) - 4 * f(t[-1] - h[-1]) + f(t[-1] - 2 * h[-1])) / (2 * h[-1])
        # Truncation h^2 |f'''| / 3 (|f'''| < 1e3 here) and rounding 4 eps |f| / h.
        torch.testing.assert_close(d(t)[keep], fd[keep], rtol=1e-6, atol=1e-6)


def _snr_monotone_grid():
    return torch.cat([torch.tensor([0.0, 1e-300, 1e-100, 1e-20, 1e-9], **F64),
                      torch.linspace(1e-6, 1 - 1e-6, 20001, **F64),
                      torch.tensor([1 - 1e-9, 1 - 1e-12, 1 - 2 ** -52, 1 - 2 ** -53, 1.0], **F64)])


@pytest.mark.parametrize("sch", ALL, ids=repr)
def test_snr_increases_and_time_at_snr_inverts_it_over_the_whole_range(sch):
    """Round trip t -> SNR -> t for [B], 0-d and float inputs: near t = 0 to 1e-12 relative (tiny SNRs are well
    conditioned in relative terms when alpha_0 = 0); elsewhere to 4 ulps of 1. The bisection of a custom schedule
    halved [0, 1] in value, leaving an absolute error of 2^-64: all of a time like 1e-20 (a relative error
    of 1.7)."""
    t = _snr_monotone_grid()
    snr = sch.snr(t)
    assert bool((snr[1:] >= snr[:-1]).all()) and bool((snr[t > 1e-9][1:] > snr[t > 1e-9][:-1]).all())
    assert float(snr[-1]) == math.inf
    back = sch.time_at_snr(snr)
    assert back.dtype == torch.float64 and back.shape == t.shape
    full = back
    known = (snr > 1e-290) | (t == 0)   # 1e-300 has an SNR that underflows: no time to go back to
    t, back = t[known], back[known]
    if float(sch.alpha(0.0)) == 0:
        err = (back - t).abs() / torch.where(t < 0.5, t, torch.ones_like(t)).clamp_min(1e-300)
        bound = torch.where(t < 0.5, 1e-12, 4 * 2.0 ** -52)
    else:
        # VP: SNR_0 > 0 and d SNR / dt is finite there, so a time near 0 is known only to an absolute error.
        err, bound = (back - t).abs(), torch.full_like(t, 1e-14)
    assert bool((err <= bound).all()), f"worst at t={float(t[(err / bound).argmax()])!r}"
    for i in (0, 3, 1000, 15000, -3, -1):
        as_float = sch.time_at_snr(float(snr[i]))
        zero_d = sch.time_at_snr(snr[i])
        assert isinstance(as_float, float) and zero_d.dim() == 0
        # math and torch may round their exp / log one ulp apart
        assert as_float == pytest.approx(float(zero_d), rel=0, abs=4e-16) and float(zero_d) == float(full[i])


@pytest.mark.parametrize("sch", ALL, ids=repr)
def test_time_at_snr_of_extreme_and_float32_snrs(sch):
    for snr, t in ((0.0, 0.0), (5e-324, None), (1e-300, None), (1e300, None), (1.7e308, None), (math.inf, 1.0)):
        got = sch.time_at_snr(snr)
        assert 0.0 <= got <= 1.0 and (t is None or got == t)
        assert got == pytest.approx(float(sch.time_at_snr(torch.tensor([snr], **F64))[0]), rel=0, abs=4e-16)
    # Float32 SNRs: the float32 answer of the float64 computation.
    snr = torch.tensor([0.0, 1e-6, 0.3, 1.0, 7.0, 1e6, math.inf])
    got = sch.time_at_snr(snr)
    assert got.dtype in (torch.float32, torch.float64)
    torch.testing.assert_close(got.double(), sch.time_at_snr(snr.double()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sch", ALL, ids=repr)
def test_time_at_snr_of_a_negative_snr(sch):
    """A negative float is refused by name; a negative tensor entry gives NaN, never a valid-looking time.
    VP with beta_min = beta_max returned 1 for -1 (T = log1p(-1) = -inf, u = -inf, clamped), VP(0.1, 20) returned 1
    for -1e6, and a custom schedule 3e-20 (its bisection's lower end) and accepted a negative float."""
    with pytest.raises(ValueError, match=r"snr must be >= 0 \(alpha\^2 / sigma\^2\), got -1.0"):
        sch.time_at_snr(-1.0)
    got = sch.time_at_snr(torch.tensor([-1.0, -1e6, -1e-300, 2.0], **F64))
    assert bool(torch.isnan(got[:3]).all()) and bool(torch.isfinite(got[3]))


def test_cosine_sigma_is_exactly_zero_at_and_past_the_data_end():
    sch = gf.CosineSchedule()
    assert sch.sigma(1.0) == 0.0 and sch.d_alpha(1.0) == 0.0 and sch.alpha(1.0) == 1.0
    t = torch.tensor([1.0, 1 + 2 ** -52], **F64)
    assert bool((sch.sigma(t) == 0).all()) and bool((sch.snr(t) == math.inf).all())
    assert sch.time_at_snr(math.inf) == 1.0 and sch.time_at_snr(1e300) <= 1.0


def test_vp_beta_checks_and_ends():
    """alpha_1 = 1, sigma_1 = 0 exactly; alpha_0 = exp(-(beta_min + beta_max) / 4) > 0 (documented)."""
    for lo, hi in ((0.1, 20.0), (0.0, 1e-3), (5.0, 5.0)):
        sch = gf.VPSchedule(lo, hi)
        assert sch.alpha(1.0) == 1.0 and sch.sigma(1.0) == 0.0
        assert sch.alpha(0.0) == pytest.approx(math.exp(-(lo + hi) / 4), rel=1e-15)
    assert "never reaches pure noise" in gf.VPSchedule.__doc__
    for bad in ((True, 1.0), (0.1, torch.tensor(20.0)), (-0.0 - 1e-300, 1.0), (0.1, None)):
        with pytest.raises(ValueError, match=re.escape(f"beta_min={bad[0]!r}, beta_max={bad[1]!r}")):
            gf.VPSchedule(*bad)


def test_custom_schedule_takes_floats_as_the_built_in_ones_do():
    """The callables are only required (and checked) to take tensors; a float time is handed to them as a 0-d
    float64 tensor and the value comes back as a float. torch-only callables raised TypeError on a float."""
    sch = gf.CustomSchedule(lambda t: torch.sin(math.pi * t / 2), lambda t: torch.cos(math.pi * (t / 2)),
                            lambda t: math.pi / 2 * torch.cos(math.pi * t / 2),
                            lambda t: -math.pi / 2 * torch.sin(math.pi * t / 2))
    cos = gf.CosineSchedule()
    for name in ("alpha", "sigma", "d_alpha", "d_sigma", "snr"):
        got = getattr(sch, name)(0.3)
        assert isinstance(got, float) and got == pytest.approx(getattr(cos, name)(0.3), rel=1e-14)


def test_custom_schedule_snr_of_a_float_whose_sigma_squared_underflows():
    """sigma = (1 - t)^12 at t = 1 - 2^-53 is 1e-191 > 0, but its square is 0 in float64: the float SNR divided
    by zero (ZeroDivisionError); the tensor one was already inf."""
    sch = gf.CustomSchedule(lambda t: t, lambda t: (1 - t) ** 12, lambda t: torch.ones_like(t),
                            lambda t: -12 * (1 - t) ** 11)
    t = 1 - 2 ** -53
    assert sch.snr(t) == math.inf == float(sch.snr(torch.tensor(t, **F64)))


def _refused(match, *parts):
    with pytest.raises(ValueError, match=match):
        gf.CustomSchedule(*parts)


def test_custom_schedule_ends_are_checked():
    """The check covered [0.005, 0.995] only: a schedule NaN at the data end, falling SNR after t = 0.997, alpha NaN
    at t = 0, or NaN derivatives at an end were accepted, and sampled (or inverted the SNR) silently wrong."""
    a, s, da, ds = _linear_parts()
    _refused(r"sigma is not finite at t=0.999", a, lambda t: torch.sqrt(0.998 - t), da,
             lambda t: -0.5 / torch.sqrt(0.998 - t))
    _refused(r"the SNR alpha\^2 / sigma\^2 must increase strictly with t .* t=0.99",
             lambda t: torch.where(t > 0.997, 0.5 * t, t), s, lambda t: torch.where(t > 0.997, 0.5, 1.0) + 0 * t, ds)
    _refused(r"alpha is not finite at t=0", lambda t: torch.sin(t) / t * t, s, lambda t: torch.cos(t), ds)
    _refused(r"d_sigma is NaN at t=1", a, s, da, lambda t: torch.where(t == 1, math.nan, -1.0) + 0 * t)
    _refused(r"sigma must be > 0 at t=0", a, lambda t: torch.where(t == 0, 0.0, 1 - t), da, ds)
    _refused(r"alpha must be > 0 at t=1", lambda t: torch.where(t == 1, 0.0, t), s, da, ds)
    # The built-in paths, VP's infinite sigma' at the data end included, pass through CustomSchedule.
    for sch in BUILT_IN:
        gf.CustomSchedule(sch.alpha, sch.sigma, sch.d_alpha, sch.d_sigma)


# ---------------------------------------------------------------------------------------------- conversions
def _triple(sch, t, n=64, seed=0):
    """(x, z, eps, velocity) at time t: x = alpha z + sigma eps and the velocity alpha' z + sigma' eps."""
    g = torch.Generator().manual_seed(seed)
    z, eps = torch.randn(n, 3, generator=g, **F64), torch.randn(n, 3, generator=g, **F64)
    a, s, da, ds = sch.alpha(t), sch.sigma(t), sch.d_alpha(t), sch.d_sigma(t)
    return a * z + s * eps, z, eps, da * z + ds * eps


def _output(sch, prediction, t, z, eps, u):
    return {"x0": z, "epsilon": eps, "velocity": u, "score": -eps / sch.sigma(t)}[prediction]


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("sch", ALL, ids=repr)
def test_conversions_round_trip_a_known_triple(sch, prediction):
    """Output -> D = z and -> u = alpha' z + sigma' eps, and D -> output, to 1e-10 relative away from the
    singular times, for a float time, a 0-d and a [B] tensor of times."""
    for t in (0.02, 0.3, 0.5, 0.8, 0.98):
        x, z, eps, u = _triple(sch, t)
        out = _output(sch, prediction, t, z, eps, u)
        tb = torch.full((x.shape[0],), t, **F64)
        for tt in (t, torch.tensor(t, **F64), tb):
            c = denoiser_coefficients(sch, prediction, tt)
            torch.testing.assert_close(combine_output(c, x, out), z, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(solve_output(c, x, z), out, rtol=1e-10, atol=1e-10 * float(out.abs().max()))
            torch.testing.assert_close(combine_output(velocity_coefficients(sch, prediction, tt), x, out), u,
                                       rtol=1e-10, atol=1e-10 * float(u.abs().max()))


@pytest.mark.parametrize("sch", ALL, ids=repr)
def test_velocity_model_at_the_data_end_and_singular_conversions_are_refused(sch):
    """At t = 1 (sigma = 0) a velocity model's D is x / alpha and its velocity is itself; elsewhere's singular
    conversions are refused by FlowModel naming the prediction, not returned as Inf or NaN."""
    x = torch.randn(4, 3, **F64)
    for tt in (1.0, torch.tensor([1.0, 1.0, 1.0, 1.0], **F64)):
        c = denoiser_coefficients(sch, "velocity", tt)
        torch.testing.assert_close(combine_output(c, x, torch.randn(4, 3, **F64)), x / sch.alpha(1.0))
    model = gf.FlowModel(lambda x, t: x, sch, "velocity")
    torch.testing.assert_close(model.velocity(x, 1.0), x)
    for prediction in ("x0", "epsilon"):
        model = gf.FlowModel(lambda x, t: x, sch, prediction, time_range=(0.2, 1.0))
        with pytest.raises(ValueError, match=rf"velocity of a model with prediction='{prediction}' is singular at t=1"):
            model.velocity(x, 1.0)
    if float(sch.alpha(0.0)) == 0:
        for prediction in ("epsilon", "score"):
            with pytest.raises(ValueError, match=rf"time_range \(0.0, 0.5\) includes t=0.0, where a '{prediction}'"):
                gf.FlowModel(lambda x, t: x, sch, prediction, time_range=(0.0, 0.5))
