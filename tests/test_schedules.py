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


def test_vp_rejects_bad_betas():
    with pytest.raises(ValueError, match="beta_min"):
        gf.VPSchedule(beta_min=2.0, beta_max=1.0)
