import math

import pytest
import torch

import glass_fast as gf

SCHEDULES = [gf.LinearSchedule(), gf.CosineSchedule(), gf.VPSchedule(), gf.VPSchedule(beta_min=1.0, beta_max=1.0)]
TS = torch.linspace(0.01, 0.99, 37, dtype=torch.float64)


@pytest.mark.parametrize("sch", SCHEDULES, ids=repr)
def test_endpoints_and_monotone(sch):
    assert float(sch.alpha(1.0)) == pytest.approx(1.0)
    assert float(sch.sigma(1.0)) == 0.0
    if not isinstance(sch, gf.VPSchedule):
        assert float(sch.alpha(0.0)) == 0.0 and float(sch.sigma(0.0)) == pytest.approx(1.0)
    assert torch.all(sch.alpha(TS)[1:] > sch.alpha(TS)[:-1])
    assert torch.all(sch.sigma(TS)[1:] < sch.sigma(TS)[:-1])


@pytest.mark.parametrize("sch", SCHEDULES, ids=repr)
def test_derivatives_match_finite_differences(sch):
    h = 1e-6
    fd_a = (sch.alpha(TS + h) - sch.alpha(TS - h)) / (2 * h)
    fd_s = (sch.sigma(TS + h) - sch.sigma(TS - h)) / (2 * h)
    torch.testing.assert_close(sch.d_alpha(TS), fd_a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sch.d_sigma(TS), fd_s, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sch", SCHEDULES, ids=repr)
def test_time_at_snr_inverts_snr(sch):
    torch.testing.assert_close(sch.time_at_snr(sch.snr(TS)), TS, rtol=0, atol=1e-10)
    assert float(sch.time_at_snr(math.inf)) == pytest.approx(1.0)
    # Floats in, floats out.
    assert isinstance(sch.time_at_snr(2.0), float)


def test_closed_form_inverse_agrees_with_bisection():
    for sch in SCHEDULES:
        snr = sch.snr(TS)
        torch.testing.assert_close(gf.Schedule.time_at_snr(sch, snr), sch.time_at_snr(snr), rtol=0, atol=1e-12)


def test_custom_schedule_falls_back_to_bisection():
    lin = gf.LinearSchedule()
    sch = gf.CustomSchedule(lin.alpha, lin.sigma, lin.d_alpha, lin.d_sigma)
    torch.testing.assert_close(sch.time_at_snr(lin.snr(TS)), TS, rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match="d_sigma must be callable"):
        gf.CustomSchedule(lin.alpha, lin.sigma, lin.d_alpha, 3.0)


@pytest.mark.parametrize("betas", [(2.0, 1.0), (0.0, 0.0), (0.1, math.inf), (math.nan, 1.0), ("0.1", 1.0), (-1.0, 1.0)])
def test_vp_rejects_bad_betas(betas):
    # beta_min = beta_max = 0 is the constant path alpha = 1, sigma = 0: nothing to sample.
    with pytest.raises(ValueError, match="VPSchedule needs finite numbers 0 <= beta_min <= beta_max with beta_max > 0"):
        gf.VPSchedule(*betas)


def _lin_parts():
    lin = gf.LinearSchedule()
    return lin.alpha, lin.sigma, lin.d_alpha, lin.d_sigma


def test_custom_schedule_accepts_float32_callables_and_piecewise_linear_tables():
    """The derivative check admits float32 rounding and kinks, yet refuses a derivative off by 1%."""
    f32 = gf.CustomSchedule(lambda t: t.float(), lambda t: (1 - t).float(), lambda t: torch.ones_like(t).float(),
                            lambda t: -torch.ones_like(t).float())
    assert f32.alpha(torch.tensor([0.25])).item() == 0.25
    # A discrete schedule as a table of 1000 knots, interpolated linearly (alpha^2 + sigma^2 = 1 at knots).
    knots = torch.linspace(0, 1, 1001, dtype=torch.float64)
    a_tab = torch.sin(0.5 * math.pi * knots)
    s_tab = torch.cos(0.5 * math.pi * knots).clamp_min(1e-4)

    def table(values):
        def at(t):
            i = (t * 1000).floor().clamp(0, 999).long()
            w = t * 1000 - i
            return values[i] * (1 - w) + values[i + 1] * w
        return at

    def slope(values):
        return lambda t: (values[1:] - values[:-1])[(t * 1000).floor().clamp(0, 999).long()] * 1000

    gf.CustomSchedule(table(a_tab), table(s_tab), slope(a_tab), slope(s_tab))
    with pytest.raises(ValueError, match="d_alpha is not the derivative of alpha"):
        gf.CustomSchedule(table(a_tab), table(s_tab), lambda t: 1.01 * slope(a_tab)(t), slope(s_tab))


def test_custom_schedule_is_checked_when_built():
    a, s, da, ds = _lin_parts()
    with pytest.raises(TypeError, match="alpha must accept a float64 Tensor of times"):
        gf.CustomSchedule(lambda t: math.sin(t), s, da, ds)            # a float-only callable
    with pytest.raises(TypeError, match=r"sigma must return one value per time, got shape \(\)"):
        gf.CustomSchedule(a, lambda t: torch.tensor(0.5, dtype=torch.float64), da, ds)
    # SNR falling after t = 0.5: time_at_snr would bisect a non-monotone function.
    with pytest.raises(ValueError, match=r"the SNR alpha\^2 / sigma\^2 must increase strictly with t"):
        gf.CustomSchedule(lambda t: torch.minimum(t, 1 - t), lambda t: 1 - t + 0 * t, da, ds)
    with pytest.raises(ValueError, match="d_alpha is not the derivative of alpha"):
        gf.CustomSchedule(a, s, lambda t: 2 * torch.ones_like(t), ds)
    with pytest.raises(ValueError, match="d_sigma is not the derivative of sigma"):
        gf.CustomSchedule(a, s, da, da)                                  # swapped sign
    with pytest.raises(ValueError, match="alpha is not finite"):
        gf.CustomSchedule(lambda t: t / (t - 0.5), s, da, ds)
    cos = gf.CosineSchedule()                                            # a correct schedule passes
    gf.CustomSchedule(cos.alpha, cos.sigma, cos.d_alpha, cos.d_sigma)


@pytest.mark.parametrize("beta_min,limit", [(0.1, -math.inf), (0.0, -math.sqrt(0.5 * 20.0))])
def test_vp_sigma_derivative_at_the_data_end_is_its_limit(beta_min, limit):
    """sigma'(1) is -inf for beta_min > 0 and -sqrt(beta_max / 2) for beta_min = 0 (sigma is linear there): for
    floats and tensors alike, not a ZeroDivisionError or a NaN."""
    sch = gf.VPSchedule(beta_min, 20.0)
    assert sch.d_sigma(1.0) == limit
    assert float(sch.d_sigma(torch.tensor([1.0], dtype=torch.float64))[0]) == limit
    if math.isfinite(limit):
        assert (sch.sigma(1.0) - sch.sigma(1.0 - 1e-7)) / 1e-7 == pytest.approx(limit, rel=1e-5)
