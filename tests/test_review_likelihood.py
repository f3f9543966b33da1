"""log_likelihood against the closed-form mixture density p_t (MATH.md section 5) on awkward inputs: every
schedule and prediction, odd [B, C, H, W] states, batch 1, non-contiguous and half-precision data, both ends of
the time range, and arguments that must be refused by name."""
import math

import pytest
import torch

import glass_fast as gf
from glass_fast.mixtures import GaussianMixture, standard_mixture

MIX = standard_mixture()
SCHEDULES = {"linear": gf.LinearSchedule(), "cosine": gf.CosineSchedule(), "vp": gf.VPSchedule()}
PREDICTIONS = ("velocity", "x0", "epsilon", "score")


def log_density(mix: GaussianMixture, schedule, x: torch.Tensor, t: float) -> torch.Tensor:
    """log p_t(x) in float64 for x [B, ...] holding points of the mixture's dimension."""
    w, means, var = mix.marginal_law(schedule, t)
    flat = x.double().reshape(x.shape[0], -1)
    sq = ((flat[:, None, :] - means) ** 2).sum(-1)
    return torch.logsumexp(torch.log(w) - 0.5 * mix.dim * torch.log(2 * math.pi * var) - 0.5 * sq / var, dim=1)


def base_error(schedule, mix: GaussianMixture, lo: float) -> float:
    """Bound on the error of taking N(0, sigma_lo^2 I) for p_lo: alpha_lo times the data's scale (the module's
    own statement; 0 where alpha_lo = 0)."""
    alpha = float(schedule.alpha(torch.tensor(lo, dtype=torch.float64)))
    return alpha * float(mix.means.norm(dim=1).max() + mix.stds.max() * math.sqrt(mix.dim))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_every_schedule_and_prediction_matches_the_closed_form(schedule, prediction):
    # Heun with 100 steps from t = 0.9: the discretisation error is about 4e-4 nats on this mixture (second
    # order; test_likelihood checks the rate), the rest is the base's alpha_lo term.
    sch, x = SCHEDULES[schedule], MIX.sample(16, torch.Generator().manual_seed(10))
    model = MIX.flow_model(sch, prediction)
    lp = gf.log_likelihood(model, x, steps=100, t_max=0.9)
    assert lp.dtype == torch.float64 and lp.shape == (16,)
    err = float((lp - log_density(MIX, sch, x, 0.9)).abs().max())
    assert err < 1e-3 + base_error(sch, MIX, model.time_range[0]), err


def _mixture_30():
    g = torch.Generator().manual_seed(11)
    means = torch.randn(3, 30, generator=g, dtype=torch.float64)
    return GaussianMixture(means, [0.6, 0.8, 1.0], [0.2, 0.3, 0.5])


def test_odd_image_shape_batch_one_and_non_contiguous_data():
    """[B, 2, 3, 5] states (30 dimensions: exact divergence under "auto") are points of a 30-D mixture."""
    mix, sch = _mixture_30(), gf.CosineSchedule()
    x = mix.sample(3, torch.Generator().manual_seed(12)).reshape(3, 2, 3, 5)
    model = mix.flow_model(sch, "x0")
    lp = gf.log_likelihood(model, x, steps=120, t_max=0.95)
    # Heun at 120 steps: 7e-4 nats here (1e-2 at 30 steps, 2.7e-3 at 60: second order).
    torch.testing.assert_close(lp, log_density(mix, sch, x, 0.95), rtol=0, atol=2e-3)
    strided = x.transpose(2, 3).contiguous().transpose(2, 3)     # same values, other strides
    assert not strided.is_contiguous()
    torch.testing.assert_close(gf.log_likelihood(model, strided, steps=120, t_max=0.95), lp, rtol=0, atol=1e-12)
    torch.testing.assert_close(gf.log_likelihood(model, x[1:2], steps=120, t_max=0.95), lp[1:2], rtol=0, atol=1e-12)


# Lower precision against the same (rounded) points in float64, which isolates the rounding from the
# discretisation. Measured on these points: float32 3e-6, float16 1.9e-3, bfloat16 1.2e-2 nats (x0 model;
# about 4x unit roundoff per unit of log-density): the network sees the data's dtype and its outputs are rounded
# to it; the state itself is carried in float32 (rounded to bfloat16 at every step it was 0.04 nats off).
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("prediction", ["velocity", "x0"])
def test_lower_precision_data_matches_float64_at_its_rounded_values(dtype, prediction, atol):
    sch = gf.LinearSchedule()
    x = MIX.sample(16, torch.Generator().manual_seed(13)).to(dtype)
    model = MIX.flow_model(sch, prediction)
    lp = gf.log_likelihood(model, x, steps=100, t_max=0.9)
    assert lp.dtype == torch.float64
    torch.testing.assert_close(lp, gf.log_likelihood(model, x.double(), steps=100, t_max=0.9), rtol=0, atol=atol)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_velocity_models_integrate_from_t_equal_1(schedule):
    sch, x = SCHEDULES[schedule], MIX.sample(8, torch.Generator().manual_seed(14))
    lp = gf.log_likelihood(MIX.flow_model(sch, "velocity"), x, steps=200)   # default t_max: 1
    err = float((lp - log_density(MIX, sch, x, 1.0)).abs().max())
    assert err < 1e-3 + base_error(sch, MIX, 0.0), err


def test_t_max_just_above_the_lowest_time_gives_the_base_density():
    # At t_max = 1e-3 the path is nearly the base N(0, sigma^2 I); the one-step integral is tiny but not zero.
    sch, x = gf.LinearSchedule(), MIX.sample(8, torch.Generator().manual_seed(15))
    lp = gf.log_likelihood(MIX.flow_model(sch, "velocity"), x, steps=4, t_max=1e-3)
    torch.testing.assert_close(lp, log_density(MIX, sch, x, 1e-3), rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction", ["x0", "epsilon"])
def test_t_max_where_the_velocity_is_singular_is_refused_by_name(prediction):
    # sigma_1 = 0: an x0 or epsilon model's velocity divides by it. The error used to name only FlowModel.velocity
    # and "t=1", not the argument the caller passed.
    model = MIX.flow_model(gf.LinearSchedule(), prediction)
    with pytest.raises(ValueError, match=rf"t_max=1\.0: .*{prediction!r} model's velocity is singular at t=1"):
        gf.log_likelihood(model, MIX.sample(3), steps=4, t_max=1.0)
    assert model.calls == 0


def test_auto_divergence_is_exact_up_to_32_dimensions_and_random_above():
    # 32 dimensions: exact (no randomness, the generator is not read); 33: Hutchinson (the seed changes it).
    for dims, random in ((32, False), (33, True)):
        # Two components: the velocity's Jacobian is not a multiple of I (for which Hutchinson is exact).
        means = torch.zeros(2, dims, dtype=torch.float64)
        means[0, 0] = 1.0
        mix = GaussianMixture(means, [0.7, 0.4], [0.5, 0.5])
        x = mix.sample(2, torch.Generator().manual_seed(16))
        runs = [gf.log_likelihood(mix.flow_model(gf.LinearSchedule(), "velocity"), x, steps=3, t_max=0.9,
                                  generator=torch.Generator().manual_seed(seed)) for seed in (0, 1)]
        assert bool((runs[0] != runs[1]).any()) == random, dims


def test_t_max_above_the_models_time_range_is_clamped_to_it():
    # A score model is evaluated up to t = 1 - 1e-4: t_max = 1 integrates from there, as documented.
    model, x = MIX.flow_model(gf.CosineSchedule(), "score"), MIX.sample(4, torch.Generator().manual_seed(17))
    hi = model.time_range[1]
    assert hi < 1.0
    torch.testing.assert_close(gf.log_likelihood(model, x, steps=20, t_max=1.0),
                               gf.log_likelihood(model, x, steps=20, t_max=hi), rtol=0, atol=0)


def test_torch_no_grad_around_the_call_gives_the_same_result():
    # The divergence needs autograd: it is switched on inside, whatever the caller's grad mode.
    model, x = MIX.flow_model(gf.LinearSchedule(), "x0"), MIX.sample(4, torch.Generator().manual_seed(18))
    want = gf.log_likelihood(model, x, steps=10, t_max=0.9)
    with torch.no_grad():
        got = gf.log_likelihood(model, x, steps=10, t_max=0.9)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(want, log_density(MIX, gf.LinearSchedule(), x, 0.9), rtol=0, atol=0.05)
