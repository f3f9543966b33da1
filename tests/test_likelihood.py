"""Log-likelihoods from the probability-flow ODE against the mixture's closed-form density."""
import math

import pytest
import torch

import glass_fast as gf
from glass_fast.mixtures import standard_mixture

SCH = gf.LinearSchedule()
MIX = standard_mixture()


def exact_log_density(x: torch.Tensor, t: float) -> torch.Tensor:
    """log p_t(x) of the mixture's marginal (isotropic components)."""
    w, means, var = MIX.marginal_law(SCH, t)
    sq = ((x.double()[:, None, :] - means) ** 2).sum(-1)
    return torch.logsumexp(torch.log(w) - 0.5 * MIX.dim * torch.log(2 * math.pi * var) - 0.5 * sq / var, dim=1)


@pytest.fixture(scope="module")
def data():
    return MIX.sample(200, torch.Generator().manual_seed(0))


def test_heun_converges_to_the_exact_density_at_second_order(data):
    model = MIX.flow_model(SCH, "velocity")
    err = {n: float((gf.log_likelihood(model, data, steps=n) - exact_log_density(data, 1.0)).abs().max())
           for n in (50, 100, 200)}
    # Second order: halving the step divides the error by about 4.
    assert 3.0 < err[50] / err[100] < 5.0 and 3.0 < err[100] / err[200] < 5.0, err
    assert err[200] < 1e-3, err


def test_other_parameterizations_give_the_smoothed_density(data):
    # An x0 model's velocity is singular at sigma = 0: the integration starts at t_max = 1 - 1e-3.
    lp = gf.log_likelihood(MIX.flow_model(SCH, "x0"), data, steps=200)
    torch.testing.assert_close(lp, exact_log_density(data, 1 - 1e-3), rtol=0, atol=1e-3)
    lp = gf.log_likelihood(MIX.flow_model(SCH, "velocity"), data, steps=200, t_max=0.8)
    torch.testing.assert_close(lp, exact_log_density(data, 0.8), rtol=0, atol=1e-3)


def test_hutchinson_is_unbiased(data):
    model = MIX.flow_model(SCH, "velocity")
    x = data[:20]
    exact = gf.log_likelihood(model, x, steps=20, divergence="exact")
    runs = torch.stack([gf.log_likelihood(model, x, steps=20, divergence="hutchinson", probes=2,
                                          generator=torch.Generator().manual_seed(seed)) for seed in range(24)])
    assert runs.std(0).min() > 0                       # the probes are random...
    se = runs.std(0) / math.sqrt(runs.shape[0])        # ...and their mean is the exact value within 4.5 SE
    assert torch.all((runs.mean(0) - exact).abs() < 4.5 * se), ((runs.mean(0) - exact) / se).tolist()


def test_any_state_shape_and_float32():
    model = MIX.flow_model(SCH, "velocity")
    x = MIX.sample(6, torch.Generator().manual_seed(1))
    flat = gf.log_likelihood(model, x, steps=50, t_max=0.99)
    shaped = gf.log_likelihood(model, x.reshape(6, 1, 2), steps=50, t_max=0.99)
    torch.testing.assert_close(shaped, flat, rtol=0, atol=1e-12)
    # (Not at t = 1: this exact model's velocity there comes from a 1e-9 denominator, beyond float32.)
    f32 = gf.log_likelihood(model, x.float(), steps=50, t_max=0.99)
    assert f32.dtype == torch.float64
    torch.testing.assert_close(f32, flat, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(steps=0), ValueError, "steps must be an integer >= 1"),
    (dict(solver="rk4"), ValueError, "solver must be 'euler' or 'heun'"),
    (dict(divergence="trace"), ValueError, "divergence must be one of"),
    (dict(divergence="hutchinson", probes=0), ValueError, "probes must be an integer >= 1"),
    (dict(t_max=0.0), ValueError, "t_max must lie in"),
])
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        gf.log_likelihood(MIX.flow_model(SCH, "velocity"), torch.zeros(3, 2), **kwargs)


def test_nan_model_output_is_reported_with_time_and_step():
    exact = MIX.flow_model(SCH, "velocity")
    poisoned = gf.FlowModel(lambda x, t: exact.fn(x, t).masked_fill(t.view(-1, 1) < 0.45, float("nan")), SCH,
                            "velocity")
    with pytest.raises(FloatingPointError, match=r"velocity is NaN/Inf at t=0\.4000 \(step 6\)"):
        gf.log_likelihood(poisoned, MIX.sample(4, torch.Generator().manual_seed(2)), steps=10, solver="euler")


def test_bad_model_data_or_generator_are_named():
    model = MIX.flow_model(SCH, "velocity")
    with pytest.raises(TypeError, match="model must be a glass_fast.FlowModel, got function"):
        gf.log_likelihood(lambda x, t: x, torch.zeros(3, 2))
    with pytest.raises(TypeError, match=r"x must be a floating Tensor\[B, ...\], got torch.int64"):
        gf.log_likelihood(model, torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="x holds NaN or Inf"):
        gf.log_likelihood(model, torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        gf.log_likelihood(model, torch.zeros(3, 64), divergence="hutchinson", generator=3)
