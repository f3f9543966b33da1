"""The Gaussian-mixture ground truth checked against independent computations (MATH.md section 5), its
input checks, and the accuracy table's helpers."""
import math

import pytest
import torch

import glass_fast as gf
from glass_fast.accuracy import METHODS, accuracy_table, transition_ks
from glass_fast.mixtures import GaussianMixture, ks_critical, ks_statistic, mixture_cdf, standard_mixture

MIX = standard_mixture()
SCHEDULES = [gf.LinearSchedule(), gf.CosineSchedule(), gf.VPSchedule()]
# Times that float32 holds exactly: FlowModel hands the network float32 times.
TIMES = [0.125, 0.5, 0.875]


def log_marginal(x: torch.Tensor, sch, t: float) -> torch.Tensor:
    w, means, var = MIX.marginal_law(sch, t)
    sq = ((x[:, None, :] - means) ** 2).sum(-1)
    return torch.logsumexp(torch.log(w) - 0.5 * MIX.dim * torch.log(2 * math.pi * var) - 0.5 * sq / var, dim=1)


@pytest.mark.parametrize("sch", SCHEDULES, ids=repr)
@pytest.mark.parametrize("t", TIMES)
def test_denoiser_and_every_parameterization_follow_from_the_marginal_score(sch, t):
    # Tweedie: D = (x + sigma^2 grad log p_t) / alpha, with the gradient taken by autograd of the marginal
    # density, independently of the posterior code; then each raw output from its MATH.md definition.
    x = MIX.marginal_sample(sch, t, 64, torch.Generator().manual_seed(0)).requires_grad_(True)
    (score,) = torch.autograd.grad(log_marginal(x, sch, t).sum(), x)
    x = x.detach()
    tt = torch.tensor(t, dtype=torch.float64)
    a, s, da, ds = sch.alpha(tt), sch.sigma(tt), sch.d_alpha(tt), sch.d_sigma(tt)
    d = (x + s * s * score) / a
    torch.testing.assert_close(MIX.denoise(x, t, sch), d, rtol=0, atol=1e-12)
    eps = (x - a * d) / s
    want = {"x0": d, "epsilon": eps, "score": score, "velocity": da * d + ds * eps}
    for prediction, out in want.items():
        got = MIX.flow_model(sch, prediction).fn(x, torch.full((64,), t, dtype=torch.float64))
        torch.testing.assert_close(got, out, rtol=0, atol=1e-10, msg=prediction)


@pytest.mark.parametrize("sch", SCHEDULES, ids=repr)
@pytest.mark.parametrize("rho", [0.4, -0.3, "ddpm"])
def test_transition_law_of_one_component_is_gaussian_conditioning(sch, rho):
    # One component N(m, s^2 I): (x_t, x_t') are jointly Gaussian per coordinate with covariance
    # alpha_t alpha_t' s^2 + rho sigma_t sigma_t', so p(x_t' | x_t) is plain Gaussian conditioning.
    one = GaussianMixture([[0.7, -1.2]], [0.6], [1.0])
    t, tn = 0.3, 0.7
    x = torch.tensor([[0.2, -0.5], [1.5, 0.3]], dtype=torch.float64)
    w, mean, var = one.transition_law(x, t, tn, rho, sch)
    t64, tn64 = torch.tensor(t, dtype=torch.float64), torch.tensor(tn, dtype=torch.float64)
    a, s, an, sn = sch.alpha(t64), sch.sigma(t64), sch.alpha(tn64), sch.sigma(tn64)
    r = a * sn / (s * an) if rho == "ddpm" else torch.tensor(rho, dtype=torch.float64)
    m, v = one.means[0], one.stds[0] ** 2
    var_t, var_tn, cov = a * a * v + s * s, an * an * v + sn * sn, a * an * v + r * s * sn
    torch.testing.assert_close(w, torch.ones(2, 1, dtype=torch.float64))
    torch.testing.assert_close(mean[:, 0], an * m + cov / var_t * (x - a * m), rtol=0, atol=1e-12)
    torch.testing.assert_close(var[:, 0], (var_tn - cov * cov / var_t).expand(2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("rho", [0.4, "ddpm"])
def test_transition_law_carries_the_marginal_forward(rho):
    # x_t ~ p_t, then x_t' drawn from transition_law(x_t): x_t' ~ p_t' (KS over projections, Bonferroni).
    sch, t, tn, n = gf.LinearSchedule(), 0.25, 0.6, 4000
    g = torch.Generator().manual_seed(1)
    x = MIX.marginal_sample(sch, t, n, g)
    w, mean, var = MIX.transition_law(x, t, tn, rho, sch)
    comp = torch.multinomial(w, 1, generator=g)[:, 0]
    rows = torch.arange(n)
    y = mean[rows, comp] + var[rows, comp].sqrt()[:, None] * torch.randn(n, 2, generator=g, dtype=torch.float64)
    W, M, V = MIX.marginal_law(sch, tn)
    dirs = [torch.tensor(d, dtype=torch.float64) for d in ([1.0, 0.0], [0.0, 1.0], [0.6, 0.8])]
    for u in dirs:
        assert ks_statistic(y @ u, lambda v: mixture_cdf(v, W, M, V, u)) < ks_critical(n, 0.001 / len(dirs))
    # The statistic has power here: the law at the wrong time is rejected.
    W2, M2, V2 = MIX.marginal_law(sch, t)
    assert ks_statistic(y @ dirs[0], lambda v: mixture_cdf(v, W2, M2, V2, dirs[0])) > ks_critical(n, 0.001)


def test_tilt_matches_quadrature_in_one_dimension():
    one_d = GaussianMixture([[-1.0], [0.5], [2.0]], [0.4, 0.7, 0.3], [0.5, 0.2, 0.3])
    b = 0.8
    z = torch.linspace(-8, 10, 200001, dtype=torch.float64)
    def density(gm):
        return (gm.weights * torch.exp(-0.5 * ((z[:, None] - gm.means[:, 0]) / gm.stds) ** 2)
                / (gm.stds * math.sqrt(2 * math.pi))).sum(-1)
    tilted = density(one_d) * torch.exp(b * z)
    tilted = tilted / torch.trapezoid(tilted, z)
    torch.testing.assert_close(density(one_d.tilted([b])), tilted, rtol=0, atol=1e-9)


def test_exact_epsilon_model_is_finite_at_sigma_zero():
    # At t = 1 the epsilon output does not enter D = x / alpha; a 0/0 output there would turn D into NaN.
    for sch in SCHEDULES:
        model = MIX.flow_model(sch, "epsilon")
        x = MIX.sample(5, torch.Generator().manual_seed(2))
        torch.testing.assert_close(model.denoise(x, 1.0), x, rtol=0, atol=1e-12)


def test_points_of_another_dimension_are_refused():
    # A [B, 1] tensor used to broadcast against the 2-D means and give a silently wrong D.
    sch = gf.LinearSchedule()
    with pytest.raises(ValueError, match=r"x must be a Tensor\[B, 2\] .* got shape \(4, 1\)"):
        MIX.denoise(torch.zeros(4, 1), 0.5, sch)
    with pytest.raises(ValueError, match=r"x_t must be a Tensor\[B, 2\]"):
        MIX.transition_law(torch.zeros(4, 1), 0.2, 0.5, 0.4, sch)
    with pytest.raises(ValueError, match=r"x must be a Tensor\[B, 2\]"):
        MIX.flow_model(sch, "x0").denoise(torch.zeros(4, 1), 0.5)
    with pytest.raises(ValueError, match="x holds NaN or Inf"):
        MIX.denoise(torch.tensor([[0.0, float("nan")]]), 0.5, sch)


def test_exact_model_passes_non_finite_states_to_the_sampler_checks():
    model = MIX.flow_model(gf.LinearSchedule(), "x0")
    out = model(torch.tensor([[0.0, float("nan")], [0.5, 0.5]]), torch.tensor([0.5, 0.5]))
    assert bool(out[0].isnan().all()) and bool(out[1].isfinite().all())


@pytest.mark.parametrize("call,match", [
    (lambda s: MIX.marginal_sample(s, 1.5, 3), r"t must lie in \[0, 1\], got 1.5"),
    (lambda s: MIX.marginal_law(s, float("nan")), r"t must lie in \[0, 1\]"),
    (lambda s: MIX.denoise(torch.zeros(2, 2), -0.1, s), r"t must lie in \[0, 1\]"),
    (lambda s: MIX.transition_law(torch.zeros(2, 2), 0.6, 0.3, 0.4, s), "t_next must be greater than t"),
    (lambda s: MIX.transition_law(torch.zeros(2, 2), 0.3, 0.3, 0.4, s), "t_next must be greater than t"),
    (lambda s: MIX.sample(0), "n must be an integer >= 1, got 0"),
    (lambda s: MIX.sample(True), "n must be an integer >= 1, got True"),
    (lambda s: MIX.sample(2.5), "n must be an integer >= 1, got 2.5"),
    (lambda s: MIX.tilted([float("nan"), 0.0]), "b must be finite"),
    (lambda s: GaussianMixture([[True, False]], [1.0], [1.0]), "means must be real numbers, got booleans"),
    (lambda s: ks_critical(0), "n must be an integer >= 1"),
    (lambda s: ks_critical(100, 1.5), r"alpha must be a level in \(0, 1\)"),
    (lambda s: ks_statistic(torch.zeros(0), lambda v: v), "samples must be a non-empty 1-D Tensor"),
    (lambda s: mixture_cdf(torch.zeros(3), *MIX.marginal_law(s, 0.5), torch.zeros(2)), "direction must be a non-zero"),
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(gf.LinearSchedule())


# ------------------------------------------------------------------------------------------- accuracy table
def test_ks_helpers_accept_exact_samples_and_reject_shifted_ones():
    n = 5000
    sch = gf.LinearSchedule()
    x = MIX.marginal_sample(sch, 0.7, n, torch.Generator().manual_seed(3))
    W, M, V = MIX.marginal_law(sch, 0.7)
    u = torch.tensor([0.6, 0.8], dtype=torch.float64)
    assert ks_statistic(x @ u, lambda v: mixture_cdf(v, W, M, V, u)) < ks_critical(n, 0.001)
    assert ks_statistic(x @ u + 0.2, lambda v: mixture_cdf(v, W, M, V, u)) > ks_critical(n, 0.001)


def test_transition_ks_of_an_accurate_glass_transition_is_within_the_critical_value():
    # Midpoint with 16 calls is accurate to well below the sampling error of 4,000 draws (README table);
    # the worst of four projections is compared with the Bonferroni critical value.
    n = 4000
    assert transition_ks("glass-midpoint", 16, 0.2, 0.4, n=n) < ks_critical(n, 0.001 / 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="ode"), "method must be one of"),
    (dict(method="glass"), "method must be one of"),
    (dict(method="glass-euler", n=0), "n must be an integer >= 1"),
    (dict(mixture=GaussianMixture([[0.0, 0.0, 0.0]], [1.0], [1.0])), "mixture must be a 2-D GaussianMixture"),
])
def test_transition_ks_names_bad_arguments(kwargs, match):
    args = dict(method="glass-euler", calls=4, t=0.2, t_next=0.4, n=100) | kwargs
    with pytest.raises(ValueError, match=match):
        transition_ks(**args)


def test_accuracy_table_names_bad_methods():
    with pytest.raises(ValueError, match="methods must be drawn from"):
        accuracy_table(methods="sde")
    assert set(METHODS) >= {"sde", "glass-euler"}
