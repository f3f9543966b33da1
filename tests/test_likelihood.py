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


@pytest.mark.parametrize("prediction", ["epsilon", "score"])
def test_cosine_path_and_singular_parameterizations(data, prediction):
    # Epsilon and score models stop at t = 1e-4 (alpha = 1.6e-4 on the cosine path): the base N(0, sigma^2 I)
    # is then off by far less than the 1e-3 tolerance; the top is 1 - 1e-3 (score: its time range ends below).
    model = MIX.flow_model(gf.CosineSchedule(), prediction)
    lp = gf.log_likelihood(model, data[:50], steps=200)
    w, means, var = MIX.marginal_law(gf.CosineSchedule(), 1 - 1e-3)
    sq = ((data[:50, None, :] - means) ** 2).sum(-1)
    want = torch.logsumexp(torch.log(w) - 0.5 * MIX.dim * torch.log(2 * math.pi * var) - 0.5 * sq / var, dim=1)
    torch.testing.assert_close(lp, want, rtol=0, atol=1e-3)


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


def test_half_precision_data_integrates_in_float32():
    # bfloat16 data: the network sees bfloat16 inputs, as a FlowModel(dtype=bfloat16) gives it from a float32
    # state; the state itself must not be rounded to bfloat16 at every step (off by 0.04 nats here when it was).
    exact = MIX.flow_model(SCH, "velocity")
    x = MIX.sample(6, torch.Generator().manual_seed(3)).to(torch.bfloat16)
    got = gf.log_likelihood(exact, x, steps=50, t_max=0.9)
    bf16_net = gf.FlowModel(exact.fn, SCH, "velocity", dtype=torch.bfloat16)
    want = gf.log_likelihood(bf16_net, x.float(), steps=50, t_max=0.9)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_a_base_that_is_not_pure_noise_is_refused():
    # VP(0.1, 5) keeps alpha_0 = 0.28 of the data at t = 0: N(0, sigma_0^2 I) is then not p_0 and the
    # log-density came out about 1 nat off on this mixture, silently.
    with pytest.raises(ValueError, match=r"alpha_t=0\.2[0-9]* of the data .*VPSchedule"):
        gf.log_likelihood(MIX.flow_model(gf.VPSchedule(0.1, 5.0), "velocity"), MIX.sample(4), steps=4)
    # The default VP path (alpha_0 = 6.6e-3) stays within alpha_0 times the data's scale of the exact value.
    vp = gf.VPSchedule()
    x = MIX.sample(20, torch.Generator().manual_seed(4))
    lp = gf.log_likelihood(MIX.flow_model(vp, "velocity"), x, steps=100, t_max=0.9)
    w, means, var = MIX.marginal_law(vp, 0.9)
    sq = ((x[:, None, :] - means) ** 2).sum(-1)
    want = torch.logsumexp(torch.log(w) - 0.5 * MIX.dim * torch.log(2 * math.pi * var) - 0.5 * sq / var, dim=1)
    alpha0 = float(vp.alpha(torch.tensor(0.0, dtype=torch.float64)))
    scale = float(MIX.means.norm(dim=1).max() + MIX.stds.max())
    assert float((lp - want).abs().max()) < alpha0 * scale, (lp - want).abs().max()


def test_a_network_without_gradients_is_refused():
    # Its divergence would read as 0 (velocity = 0 * x + out): a log-density silently off, not an error.
    exact = MIX.flow_model(SCH, "velocity")
    scale = torch.nn.Parameter(torch.ones(()))          # trainable: the output requires grad, not through x
    for fn in (lambda x, t: exact.fn(x.detach(), t), torch.no_grad()(exact.fn),
               lambda x, t: scale * exact.fn(x.detach(), t)):
        model = gf.FlowModel(fn, SCH, "velocity")
        with pytest.raises(RuntimeError, match="output carries no gradient"):
            gf.log_likelihood(model, MIX.sample(3), steps=2)
        assert model.calls == 0          # the check is not counted as a model call


def test_inference_mode_is_refused_and_inference_tensors_are_accepted():
    model = MIX.flow_model(SCH, "velocity")
    x = MIX.sample(3, torch.Generator().manual_seed(5))
    want = gf.log_likelihood(model, x, steps=4)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="outside torch.inference_mode"):
            gf.log_likelihood(model, x, steps=4)
        frozen = x.clone()
    torch.testing.assert_close(gf.log_likelihood(model, frozen, steps=4), want, rtol=0, atol=0)


def test_non_finite_divergence_is_reported():
    # A velocity that is finite but whose derivative is not: the divergence used to enter the result as NaN.
    model = gf.FlowModel(lambda x, t: (x - x.detach()).abs().sqrt(), SCH, "velocity")
    with pytest.raises(FloatingPointError, match="divergence of the model's velocity is NaN/Inf at t=1.0000"):
        gf.log_likelihood(model, torch.ones(2, 2), steps=2)


@pytest.mark.parametrize("t_max", [True, "0.5"])
def test_t_max_must_be_a_number(t_max):
    with pytest.raises(ValueError, match="t_max must be None or a number"):
        gf.log_likelihood(MIX.flow_model(SCH, "velocity"), torch.zeros(3, 2), steps=2, t_max=t_max)
