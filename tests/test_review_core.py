"""Edge cases of the core sampler math (schedules, plans, transitions), and the transitions against their
formulas in MATH.md sections 2-3 written out independently of the plans."""
import math

import pytest
import torch

import glass_fast as gf
from glass_fast import plan as plan_mod

F64 = dict(dtype=torch.float64)


def test_sde_plug_in_steps_end_at_t_next_not_past_it(mixture):
    """t + j h + h can round past t_next (here 1190 steps over [0, 1]: the last step's end is 1 + 2e-16). A
    plug-in step there (the model's time range ends at 1 - 1e-3) evaluated the VP schedule past the data,
    where sigma = sqrt(1 - exp(-T)) is NaN, and the run returned NaN without an error."""
    sch = gf.VPSchedule()
    model = gf.FlowModel(mixture.flow_model(sch, "velocity").fn, sch, "velocity", time_range=(1e-3, 1 - 1e-3))
    t, tn, calls = torch.tensor(0.0, **F64), torch.tensor(1.0, **F64), 1190
    h = (tn - t) / calls
    assert float(t + (calls - 1) * h + h) > 1.0   # the rounding this test is about
    plan = plan_mod.sde_plan(model, t, tn, calls)
    assert bool(torch.isfinite(plan.coefs).all())
    # The last step is the DDPM plug-in step onto the data: rho_DDPM = 0 there, so x_1 = D (k_out = 1, no noise).
    a_x, a_o = plan_mod.denoiser_coefficients(sch, "velocity", plan.times[-1])
    torch.testing.assert_close(plan.coefs[-1], torch.stack([a_x, torch.zeros((), **F64), torch.zeros((), **F64), a_o,
                                                            torch.zeros((), **F64), torch.ones((), **F64)]),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 1), (1, 4), (2, 2), (4, 4)])
def test_a_rho_callable_of_more_than_one_value_per_state_is_named(mixture, shape):
    """rho(t, t_next) of shape [B, 1] broadcasts with the times but would make rows [B, B, 6]: refused naming
    rho and the shape it returned, not deep in the fused step as 'coef has shape (4, 4, 6)'."""
    model = mixture.flow_model(gf.LinearSchedule(), "x0")
    t = torch.tensor([0.1, 0.2, 0.3, 0.4])
    for times in ((t, t + 0.2), (0.1, 0.3)):
        with pytest.raises(ValueError, match=rf"rho: the callable must return .* got a Tensor of shape \({shape[0]}, "
                                             rf"{shape[1]}\)"):
            gf.glass_transition(model, torch.zeros(4, 2), *times, rho=lambda a, b: torch.full(shape, 0.4))
    # One rho per state is per-sample rho, with shared or per-sample times.
    x = torch.zeros(4, 2)
    for times in ((t, t + 0.2), (0.1, 0.3)):
        per_state = gf.glass_transition(model, x, *times, rho=lambda a, b: torch.full((4,), 0.4), inner_steps=2,
                                        generator=torch.Generator().manual_seed(0))
        shared = gf.glass_transition(model, x, *times, rho=0.4, inner_steps=2,
                                     generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(per_state, shared, rtol=0, atol=1e-6)


def _linear_custom():
    lin = gf.LinearSchedule()
    return gf.CustomSchedule(lin.alpha, lin.sigma, lin.d_alpha, lin.d_sigma)


@pytest.mark.parametrize("sch", [gf.LinearSchedule(), gf.CosineSchedule(), gf.VPSchedule(), gf.VPSchedule(1.0, 1.0),
                                 _linear_custom()], ids=repr)
def test_time_at_snr_of_zero_and_nan_agree_for_floats_and_tensors(sch):
    """SNR 0 (pure noise) is the time 0, as a float and as a tensor (VP's lowest SNR is above 0: clamped to
    0; a float raised ZeroDivisionError). A NaN SNR gives NaN, also from the bisection of a custom schedule
    (which returned 3e-20, a valid-looking time)."""
    assert sch.time_at_snr(0.0) == pytest.approx(0.0, abs=1e-15)
    assert float(sch.time_at_snr(torch.tensor([0.0], **F64))[0]) == pytest.approx(0.0, abs=1e-15)
    assert math.isnan(sch.time_at_snr(math.nan))
    assert bool(torch.isnan(sch.time_at_snr(torch.tensor([math.nan, 1.0], **F64))[0]))


@pytest.mark.parametrize("bad", [torch.tensor(False), torch.tensor(0.1 + 0.5j)])
def test_times_of_bool_or_complex_dtype_are_refused(mixture, bad):
    """A Python bool is refused as a time; a bool tensor was read as 0 / 1, and a complex one lost its
    imaginary part (with only a warning)."""
    model = mixture.flow_model(gf.LinearSchedule(), "x0")
    with pytest.raises(TypeError, match=rf"t must be a float or a Tensor of real times, got a Tensor of dtype "
                                        rf"{bad.dtype}"):
        gf.glass_transition(model, torch.zeros(2, 2), bad, 0.9)
    with pytest.raises(TypeError, match="t_next must be a float or a Tensor of real times"):
        gf.ode_transition(model, torch.zeros(2, 2), 0.0, bad)


def _glass_by_the_formulas(mixture, sch, x, t, tn, rho, n, solver, eps0, sb0):
    """The GLASS inner flow of MATH.md section 3 written out directly (Python floats, no plan): the inner
    velocity u_s = w1 xbar + w2 zhat + w3 x_t with zhat = D_{t*}(alpha_{t*} S), integrated from
    xbar_0 = gamma x_t + sigmabar_0 eps0 by ``solver`` (Heun's last step Euler where sigma_bar = 0). The
    denoiser is the mixture's exact one at the float32 time the network is handed."""
    a, s = (lambda v: float(sch.alpha(torch.tensor(v, **F64)))), (lambda v: float(sch.sigma(torch.tensor(v, **F64))))
    den = lambda y, v: mixture.denoise(y, float(torch.tensor(v, dtype=torch.float32)), sch)   # noqa: E731
    if rho == "ddpm":
        rho = a(t) * s(tn) / (s(t) * a(tn))
    gamma = rho * s(tn) / s(t)
    alpha_bar, sigma_bar = a(tn) - gamma * a(t), s(tn) * math.sqrt(1 - rho * rho)

    def u(xb, si):
        abar_s, sbar_s = si * alpha_bar, (1 - si) * sb0 + si * sigma_bar
        if si == 0:
            zhat = den(x, t)
        else:
            prec = a(t) ** 2 / s(t) ** 2 + abar_s ** 2 / sbar_s ** 2
            S = ((a(t) / s(t) ** 2) * x + (abar_s / sbar_s ** 2) * (xb - gamma * x)) / prec
            ts = float(sch.time_at_snr(torch.tensor(prec, **F64)))
            zhat = den(a(ts) * S, ts)
        w1 = (sigma_bar - sb0) / sbar_s
        return w1 * xb + (alpha_bar - abar_s * w1) * zhat - gamma * w1 * x

    return _integrate(u, gamma * x + sb0 * eps0, 0.0, 1.0 / n, n, solver, euler_last=sigma_bar == 0)


def _integrate(f, y, s0: float, h: float, n: int, solver: str, euler_last: bool):
    """n explicit Euler / midpoint / Heun steps of dy/ds = f(y, s) from s0 (Heun's last one Euler if euler_last)."""
    for j in range(n):
        s = s0 + j * h
        if solver == "euler" or (solver == "heun" and euler_last and j == n - 1):
            y = y + h * f(y, s)
        elif solver == "midpoint":
            y = y + h * f(y + h / 2 * f(y, s), s + h / 2)
        else:
            k1 = f(y, s)
            y = y + h / 2 * (k1 + f(y + h * k1, s + h))
    return y


@pytest.mark.parametrize("sch", [gf.LinearSchedule(), gf.CosineSchedule(), gf.VPSchedule()], ids=repr)
def test_glass_transition_equals_the_inner_flow_written_from_the_formulas(mixture, sch):
    """Every solver, a non-default sigmabar_0, t = 0, t' = 1, rho_DDPM, a negative rho and rho = 1: the planned
    rows reproduce the formulas to float64 rounding (a deterministic check of the algebra the fused rows fold)."""
    model = mixture.flow_model(sch, "x0")
    for t, tn, rho in ((0.0, 0.3, 0.4), (0.3, 0.7, "ddpm"), (0.5, 1.0, 0.4), (0.2, 0.6, -0.7), (0.2, 0.6, 1.0)):
        x = mixture.marginal_sample(sch, t, 16, torch.Generator().manual_seed(2)).double()
        for solver, n in (("euler", 5), ("midpoint", 3), ("heun", 3)):
            for sb0 in (1.0, 0.6):
                got = gf.glass_transition(model, x, t, tn, rho=rho, inner_steps=n * (1 if solver == "euler" else 2),
                                          solver=solver, sigmabar0=sb0, generator=torch.Generator().manual_seed(9))
                eps0 = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), **F64)
                want = _glass_by_the_formulas(mixture, sch, x, t, tn, rho, n, solver, eps0, sb0)
                torch.testing.assert_close(got, want, rtol=0, atol=1e-10,
                                           msg=lambda m: f"{t, tn, rho, solver, sb0}: {m}")


@pytest.mark.parametrize("sch", [gf.LinearSchedule(), gf.CosineSchedule(), gf.VPSchedule()], ids=repr)
def test_ode_and_sde_transitions_equal_their_formulas(mixture, sch):
    """MATH.md section 2 written out: u = (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) D for the ODE (Euler,
    midpoint, Heun; Heun's last step Euler onto sigma = 0), and Euler-Maruyama for
    dX = [u + (nu^2 / 2) (alpha D - x) / sigma^2] dt + nu dW, nu^2 = 2 (alpha'/alpha) sigma^2 - 2 sigma sigma',
    with the DDPM plug-in step x' = gamma x + alpha_bar D + sigma_bar eps where alpha_t = 0."""
    model = mixture.flow_model(sch, "x0")
    fns = (sch.alpha, sch.sigma, sch.d_alpha, sch.d_sigma)
    parts = lambda v: [float(f(torch.tensor(v, **F64))) for f in fns]   # noqa: E731
    den = lambda y, v: mixture.denoise(y, float(torch.tensor(v, dtype=torch.float32)), sch)   # noqa: E731

    def vel(y, v):
        a, s, da, ds = parts(v)
        return (ds / s) * y + (da - a * ds / s) * den(y, v)

    for t, tn in ((0.0, 0.4), (0.3, 0.7), (0.6, 1.0)):
        x = mixture.marginal_sample(sch, t, 16, torch.Generator().manual_seed(4)).double()
        n, h = 4, (tn - t) / 4
        for solver in ("euler", "midpoint", "heun"):
            want = _integrate(vel, x, t, h, n, solver, euler_last=tn == 1.0)
            got = gf.ode_transition(model, x, t, tn, steps=n * (1 if solver == "euler" else 2), solver=solver)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=lambda m: f"ode {t, tn, solver}: {m}")
        noise = torch.randn((n,) + x.shape, generator=torch.Generator().manual_seed(5), **F64)
        want = x
        for j in range(n):
            tau = t + j * h
            (a, s, da, ds), d = parts(tau), den(want, tau)
            if a == 0:
                a1, s1 = parts(tau + h)[:2]
                rho = a * s1 / (s * a1)
                gamma = rho * s1 / s
                want = gamma * want + (a1 - gamma * a) * d + s1 * math.sqrt(1 - rho * rho) * noise[j]
            else:
                nu2 = 2 * (da / a) * s * s - 2 * s * ds
                drift = (ds / s) * want + (da - a * ds / s) * d + nu2 / 2 * (a * d - want) / s ** 2
                want = want + h * drift + math.sqrt(h * nu2) * noise[j]
        got = gf.sde_transition(model, x, t, tn, steps=n, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=lambda m: f"sde {t, tn}: {m}")


def test_a_rho_callable_returning_a_tensor_that_requires_grad_is_detached(mixture):
    """As the times are: the rows are constants of the fused step, which has no derivative. A rho requiring
    grad made the samples require grad, and backward then failed inside the fused step."""
    model, x = mixture.flow_model(gf.LinearSchedule(), "x0"), torch.randn(4, 2, **F64)
    rho = torch.tensor(0.4, **F64, requires_grad=True)
    got = gf.glass_transition(model, x, 0.1, 0.3, rho=lambda a, b: rho * torch.ones(4, **F64), inner_steps=2,
                              generator=torch.Generator().manual_seed(0))
    assert not got.requires_grad
    want = gf.glass_transition(model, x, 0.1, 0.3, rho=lambda a, b: torch.full((4,), 0.4, **F64), inner_steps=2,
                               generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_heun_spends_one_call_fewer_where_its_last_stage_would_be_singular(mixture):
    """What the docstrings say: Heun's last step is Euler onto sigma_bar = 0 (GLASS) or sigma = 0 (ODE, except for
    velocity models)."""
    sch, x = gf.LinearSchedule(), torch.zeros(2, 2)

    def calls(prediction, run):
        model = mixture.flow_model(sch, prediction)
        run(model)
        return model.calls

    glass = lambda tn, rho: lambda m: gf.glass_transition(m, x, 0.3, tn, rho=rho, inner_steps=4,  # noqa: E731
                                                          solver="heun")
    assert [calls("x0", glass(*a)) for a in ((0.6, 0.4), (1.0, 0.4), (0.6, 1.0), (0.6, -1.0))] == [4, 3, 3, 3]
    ode = lambda tn: lambda m: gf.ode_transition(m, x, 0.3, tn, steps=4, solver="heun")  # noqa: E731
    assert [calls(p, ode(tn)) for p, tn in (("x0", 0.6), ("x0", 1.0), ("velocity", 1.0))] == [4, 3, 4]


@pytest.mark.parametrize("sch", [gf.LinearSchedule(), gf.CosineSchedule(), gf.VPSchedule()], ids=repr)
def test_time_at_snr_refuses_a_negative_float(sch):
    with pytest.raises(ValueError, match=r"snr must be >= 0 \(alpha\^2 / sigma\^2\), got -0.5"):
        sch.time_at_snr(-0.5)
    assert math.isnan(float(sch.time_at_snr(torch.tensor(-0.5, dtype=torch.float64))))
