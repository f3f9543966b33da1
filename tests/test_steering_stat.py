"""Statistical checks against closed forms: FK steering reaches the exact tilted mixture; value estimates.

Weighted particle systems are compared with weighted Kolmogorov-Smirnov statistics over several 1-D
projections; the sample size in the KS critical value is the final effective sample size, with a Bonferroni
split of alpha over the projections. That sample size is an approximation (particles that share an ancestor
after resampling are correlated, so it overstates the independent draws); the one-draw-per-group test uses
independent groups instead, where the sample size is exact. The exact x0 model of the mixture removes model error; the midpoint
inner solver keeps the discretisation error below the statistical resolution at these sizes.
"""
import math

import pytest
import torch

import glass_fast as gf
from glass_fast.mixtures import ks_critical, ks_statistic, mixture_cdf
from glass_fast.steering import ess, fk_steering, value_estimate

SCH = gf.LinearSchedule()
B_VEC = torch.tensor([0.8, -0.6], dtype=torch.float64)
DIRECTIONS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
ALPHA = 0.001


def linear_reward(x):
    return x @ B_VEC.to(x.dtype)


def weighted_ks(x: torch.Tensor, log_w: torch.Tensor, target: gf.GaussianMixture, u: torch.Tensor) -> float:
    """sup_y |F_w(y) - F(y)| for the weighted empirical CDF of u.x against the mixture's projection."""
    y = x.to(torch.float64) @ u
    order = torch.argsort(y)
    y, w = y[order], torch.softmax(log_w.to(torch.float64)[order], 0)
    cw = torch.cumsum(w, 0)
    f = mixture_cdf(y, target.weights, target.means, target.stds ** 2, u)
    return float(torch.maximum((cw - f).abs(), (cw - w - f).abs()).max())


def _check_tilted(mixture, res, lmbda=1.0):
    target = mixture.tilted(lmbda * B_VEC)
    for g in range(res.samples.shape[0]):
        n_eff = float(ess(res.log_weights[g:g + 1])[0])
        crit = ks_critical(int(n_eff), ALPHA / len(DIRECTIONS))
        for u in DIRECTIONS:
            d = weighted_ks(res.samples[g], res.log_weights[g], target, u)
            assert d < crit, (g, u.tolist(), d, crit, n_eff)
    return target


def test_fk_diff_reaches_the_tilted_mixture(mixture):
    k = 3000
    noise = torch.randn(1, k, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    res = fk_steering(mixture.flow_model(SCH, "x0"), linear_reward, noise, method="glass", potential="diff",
                      lmbda=1.0, solver="midpoint", generator=torch.Generator().manual_seed(12))
    _check_tilted(mixture, res)
    # The same statistic rejects the untilted data distribution: the check has power at this size.
    n_eff = float(ess(res.log_weights)[0])
    assert max(weighted_ks(res.samples[0], res.log_weights[0], mixture, u) for u in DIRECTIONS) > \
        ks_critical(int(n_eff), ALPHA)


@pytest.mark.slow
@pytest.mark.parametrize("potential,scheme", [("diff", "systematic"), ("diff", "multinomial"),
                                              ("max", "stratified"), ("add", "residual"),
                                              ("immediate", "systematic"), ("value", "systematic")])
def test_fk_reaches_the_tilted_mixture_large(mixture, potential, scheme):
    # Every potential targets p_r once the final correction is applied; two groups steer independently.
    k = 20000 if potential != "value" else 5000
    noise = torch.randn(2, k, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(21))
    res = fk_steering(mixture.flow_model(SCH, "x0"), linear_reward, noise, potential=potential, resample=scheme,
                      lmbda=1.0, solver="midpoint", value_samples=4, generator=torch.Generator().manual_seed(22))
    _check_tilted(mixture, res)


@pytest.mark.slow
def test_fk_diff_reaches_a_stronger_tilt_large(mixture):
    k = 20000
    noise = torch.randn(1, k, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(31))
    res = fk_steering(mixture.flow_model(SCH, "x0"), linear_reward, noise, lmbda=2.0, solver="midpoint",
                      inner_steps=20, ess_threshold=1.0, generator=torch.Generator().manual_seed(32))
    _check_tilted(mixture, res, lmbda=2.0)


def test_value_estimate_matches_closed_form(mixture):
    # V_t(x) = log sum_k r_k exp(b.m_k + v_k |b|^2 / 2) over the posterior components (r_k, m_k, v_k).
    t, n = 0.4, 4000
    x = mixture.marginal_sample(SCH, t, 3, torch.Generator().manual_seed(0))
    logr, mean, var = mixture.posterior(x, SCH.alpha(t), SCH.sigma(t))
    e1 = torch.logsumexp(logr + mean @ B_VEC + 0.5 * var * (B_VEC @ B_VEC), -1)
    e2 = torch.logsumexp(logr + 2 * mean @ B_VEC + 2 * var * (B_VEC @ B_VEC), -1)
    se = torch.sqrt(torch.exp(e2 - 2 * e1) - 1) / math.sqrt(n)   # delta method for log of a mean
    v = value_estimate(mixture.flow_model(SCH, "x0"), linear_reward, x, t, samples=n, solver="midpoint",
                       generator=torch.Generator().manual_seed(1))
    assert v.shape == (3,) and v.dtype == torch.float64
    assert torch.all((v - e1).abs() < 5 * se), ((v - e1) / se).tolist()


def test_value_estimate_edges(mixture):
    model = mixture.flow_model(SCH, "x0")
    x = torch.randn(4, 2, dtype=torch.float64)
    torch.testing.assert_close(value_estimate(model, linear_reward, x, 1.0), linear_reward(x))
    calls = model.calls
    value_estimate(model, linear_reward, x, 0.5, samples=3, inner_steps=4, denoised=model.denoise(x, 0.5))
    assert model.calls - calls == 1 + 3            # the denoise above, then 3 calls (the first reused)
    with pytest.raises(ValueError, match=r"t must be a float in \[0, 1\]"):
        value_estimate(model, linear_reward, x, 1.5)
    with pytest.raises(ValueError, match="samples must be an integer >= 1"):
        value_estimate(model, linear_reward, x, 0.5, samples=0)


@pytest.mark.slow
@pytest.mark.parametrize("method,kwargs", [("glass", dict(solver="midpoint")), ("sde", dict(inner_steps=20))])
def test_one_draw_per_group_follows_the_tilted_mixture_large(mixture, method, kwargs):
    """Independent groups give an exact sample size: one particle drawn by weight from each of B groups is B
    independent draws (of p_r up to the O(1/K) bias of K particles), so the plain KS critical value at B
    applies, with no effective-sample-size approximation (resampled particles are correlated). Covers the
    SDE proposal as well as GLASS."""
    b, k = 2000, 32
    noise = torch.randn(b, k, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(51))
    res = fk_steering(mixture.flow_model(SCH, "x0"), linear_reward, noise, method=method,
                      generator=torch.Generator().manual_seed(52), **kwargs)
    z = res.select(generator=torch.Generator().manual_seed(53))
    crit = ks_critical(b, ALPHA / len(DIRECTIONS))
    for dist, expect_close in ((mixture.tilted(B_VEC), True), (mixture, False)):   # and the check has power
        d = max(ks_statistic(z @ u, lambda y, u=u: mixture_cdf(y, dist.weights, dist.means, dist.stds ** 2, u))
                for u in DIRECTIONS)
        assert (d < crit) == expect_close, (d, crit)
