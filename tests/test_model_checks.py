"""FlowModel's checks of its arguments and inputs, and its call accounting."""

import pytest
import torch

import glass_fast as gf
from glass_fast.model import PREDICTIONS, denoiser_coefficients


def _custom_linear():
    return gf.CustomSchedule(lambda t: t, lambda t: 1 - t, lambda t: torch.ones_like(t), lambda t: -torch.ones_like(t))


SCHEDULES = [gf.LinearSchedule(), gf.CosineSchedule(), gf.VPSchedule(), gf.VPSchedule(beta_min=0.0, beta_max=1.0),
             _custom_linear()]


# ------------------------------------------------------------------------------------- time_range end points
@pytest.mark.parametrize("prediction", ["epsilon", "score"])
@pytest.mark.parametrize("sch", [gf.LinearSchedule(), gf.CosineSchedule(), _custom_linear()], ids=repr)
def test_time_range_through_alpha_zero_is_refused(sch, prediction):
    # alpha_0 = 0: the denoiser divides by it, so a network with finite outputs would be reported as the
    # source of the NaN at the first transition.
    with pytest.raises(ValueError, match=rf"time_range \(0.0, 0.5\) includes t=0.0, where a '{prediction}' model's "
                                         r"output cannot be converted.*alpha_t=0.*divides by alpha_t"):
        gf.FlowModel(lambda x, t: x.clone(), sch, prediction, time_range=(0.0, 0.5))


def test_singular_time_range_is_refused_before_sampling():
    with pytest.raises(ValueError, match="time_range"):
        gf.FlowModel(lambda x, t: x.clone(), gf.LinearSchedule(), "epsilon", time_range=(0, 1))


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("sch", SCHEDULES, ids=repr)
def test_default_time_ranges_pass_every_schedule(sch, prediction):
    model = gf.FlowModel(lambda x, t: x.clone(), sch, prediction)
    ends = torch.tensor(model.time_range, dtype=torch.float64)
    for c in denoiser_coefficients(sch, prediction, ends):
        assert bool(torch.isfinite(torch.as_tensor(c)).all())


@pytest.mark.parametrize("sch", SCHEDULES, ids=repr)
def test_velocity_denoiser_at_sigma_zero_is_x_over_alpha(sch):
    # VP's sigma' is infinite at t = 1: the general quotient is inf / inf there, its limit x / alpha.
    t = torch.tensor([1.0], dtype=torch.float64)
    a_x, a_o = denoiser_coefficients(sch, "velocity", t)
    assert torch.allclose(torch.as_tensor(a_x), 1 / sch.alpha(t)) and float(torch.as_tensor(a_o)) == 0.0
    a_x, a_o = denoiser_coefficients(sch, "velocity", 1.0)   # the float path agrees
    assert a_x == pytest.approx(1 / float(sch.alpha(t))) and a_o == 0.0


def test_nonsingular_end_points_stay_allowed():
    # Finite conversions at the ends are fine even where they are degenerate (score at sigma = 0: D = x / alpha).
    m = gf.FlowModel(lambda x, t: x.clone(), gf.LinearSchedule(), "score", time_range=(1e-3, 1.0))
    assert m.time_range == (1e-3, 1.0)
    x = gf.sample(m, torch.randn(8, 2), transitions=2, inner_steps=2, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(x).all())


# ------------------------------------------------------------------------------------------ tensor times
@pytest.mark.parametrize("t,match", [
    (torch.tensor(1.7), r"got tensor\(1.7000\)"),
    (torch.tensor(-0.1, dtype=torch.float64), r"got tensor\(-0.1000"),
    (torch.tensor(float("nan")), r"got tensor\(nan\)"),
    (torch.tensor([0.2, 1.5, 0.3]), r"got a Tensor of shape \(3,\) holding values in \[0.2.*, 1.5\]"),
    (torch.tensor([0.2, float("nan"), 0.3]), r"got a Tensor of shape \(3,\) holding NaN"),
])
@pytest.mark.parametrize("method", ["denoise", "velocity"])
def test_cpu_tensor_times_outside_0_1_are_refused(t, match, method):
    # Before, a tensor time was clamped to time_range silently while the same float raised.
    m = gf.FlowModel(lambda x, t: x.clone(), gf.LinearSchedule(), "x0")
    with pytest.raises(ValueError, match=r"t must be times in \[0, 1\] \(0 noise, 1 data\), " + match):
        getattr(m, method)(torch.randn(3, 2), t)
    assert m.calls == 0


def test_cpu_tensor_times_inside_0_1_match_floats():
    m = gf.FlowModel(lambda x, t: x * t[:, None], gf.LinearSchedule(), "velocity")
    x = torch.randn(3, 2)
    for t in (0.0, 0.3, 1.0):
        torch.testing.assert_close(m.denoise(x, torch.tensor(t)), m.denoise(x, t))
        torch.testing.assert_close(m.denoise(x, torch.full((3,), t, dtype=torch.float64)), m.denoise(x, t))
    mixed = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(m.velocity(x, mixed)[1], m.velocity(x, 0.5)[1])
