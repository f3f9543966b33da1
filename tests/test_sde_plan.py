"""SDE steps that start at alpha_t = 0 or below the model's time range: Euler-Maruyama's drift and diffusion
diverge like 1/alpha there, so those steps are DDPM plug-in steps (finite, exact in law for the given denoiser)."""
import pytest
import torch

import glass_fast as gf
from glass_fast.mixtures import ks_critical, ks_statistic, mixture_cdf

U = torch.tensor([0.6, 0.8], dtype=torch.float64)


def models(mixture):
    sch = gf.LinearSchedule()
    velocity = mixture.flow_model(sch, "velocity")
    return {"velocity": velocity, "epsilon": mixture.flow_model(sch, "epsilon"),
            "score": mixture.flow_model(sch, "score"),
            "velocity, time_range from 1e-3": gf.FlowModel(velocity.fn, sch, "velocity", time_range=(1e-3, 1.0))}


@pytest.mark.parametrize("kind", ["velocity", "epsilon", "score", "velocity, time_range from 1e-3"])
def test_an_sde_step_from_noise_reaches_the_exact_marginal(mixture, kind):
    """One SDE step 0 -> 0.2 from pure noise: x_0.2 must follow the mixture's marginal at 0.2 whatever the
    parameterization (it used to blow up to variances of 4e4-4e6 for epsilon/score models and clamped ranges)."""
    n, sch = 8000, gf.LinearSchedule()
    noise = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x = gf.sde_transition(models(mixture)[kind], noise, 0.0, 0.2, steps=1, generator=torch.Generator().manual_seed(4))
    W, M, V = mixture.marginal_law(sch, 0.2)
    assert ks_statistic(x @ U, lambda y: mixture_cdf(y, W, M, V, U)) < ks_critical(n, 0.001)


@pytest.mark.parametrize("kind", ["epsilon", "velocity, time_range from 1e-3"])
def test_sde_sampling_reaches_the_data_for_every_parameterization(mixture, kind):
    n = 4000
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    x = gf.sample(models(mixture)[kind], noise, method="sde", transitions=10, inner_steps=1,
                  generator=torch.Generator().manual_seed(2))
    W, M, V = mixture.marginal_law(gf.LinearSchedule(), 1.0)
    assert ks_statistic(x.double() @ U, lambda y: mixture_cdf(y, W, M, V, U)) < ks_critical(n, 0.001)


@pytest.mark.parametrize("method,rho", [("glass", 0.4), ("plugin", "ddpm")])
def test_rho_defaults_to_each_kernels_own(mixture, method, rho):
    """rho unset: 0.4 for GLASS, rho_DDPM for the plug-in kernel (as plugin_transition's default), everywhere."""
    model = mixture.flow_model(gf.LinearSchedule(), "velocity")
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(5))
    kw = dict(method=method, transitions=3, inner_steps=2)
    default = gf.sample(model, noise, generator=torch.Generator().manual_seed(6), **kw)
    named = gf.sample(model, noise, generator=torch.Generator().manual_seed(6), rho=rho, **kw)
    torch.testing.assert_close(default, named, rtol=0, atol=0)
    steered = [run(model, lambda z: z[:, 0], noise.reshape(8, 8, 2), generator=torch.Generator().manual_seed(7),
                   **kw, **extra).samples for extra in ({}, {"rho": rho})
               for run in (gf.fk_steering,)]
    torch.testing.assert_close(steered[0], steered[1], rtol=0, atol=0)
    if method == "plugin":
        x = noise[:8]
        torch.testing.assert_close(gf.plugin_transition(model, x, 0.2, 0.5, generator=torch.Generator().manual_seed(8)),
                                   gf.Sampler(model, method="plugin", grid=[0.2, 0.5]).step(
                                       0, x, generator=torch.Generator().manual_seed(8)))


def test_options_a_kernel_does_not_take_are_refused(mixture):
    model, x = mixture.flow_model(gf.LinearSchedule(), "velocity"), torch.zeros(4, 2)
    for method in ("ode", "sde"):
        with pytest.raises(ValueError, match=f"rho=0.4 is the GLASS / plug-in kernels' correlation; method='{method}'"):
            gf.sample(model, x, method=method, rho=0.4)
        with pytest.raises(ValueError, match=f"sigmabar0=2.0 is the GLASS inner flow's start; method='{method}'"):
            gf.sample(model, x, method=method, sigmabar0=2.0)
    for method in ("sde", "plugin"):
        with pytest.raises(ValueError, match=f"solver='midpoint': method='{method}' steps with Euler"):
            gf.fk_steering(model, lambda z: z[:, 0], x.reshape(2, 2, 2), method=method, solver="midpoint")
