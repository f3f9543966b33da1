"""Sampler configurations against the Gaussian mixture's closed forms (MATH.md section 5).

Fills the cells the other statistical tests leave open: every schedule (CustomSchedule included, whose
time_at_snr is a bisection), solver and parameterization; rho = -1, negative, 1, ("ddpm", kappa), callables
and one rho per state; sigmabar0; posterior sampling (t' = 1) and starts at t = 0; float64 and half-precision
states; the Sampler's step / run / predict entry points, max_batch, non-uniform grids and compile=.

Every check compares draws with the exact law over four 1-D projections: a Kolmogorov-Smirnov distance
against the closed-form CDF and a z-test of the projected mean with the law's exact variance, both at
ALPHA = 1e-4 split (Bonferroni) over the projections. The exact model removes model error; the inner step
counts are chosen from each solver's order (Euler first, midpoint and Heun second) so that the discretisation
bias stays below the statistical resolution at the sample size, not tuned per case. Where sigma_bar = 0
(t' = 1 or |rho| = 1) Heun's last step is an Euler step onto a singular end, so those cases take more steps.
"""
import math
from statistics import NormalDist

import pytest
import torch

import glass_fast as gf
from glass_fast.mixtures import ks_critical, ks_statistic, mixture_cdf, standard_mixture

MIX = standard_mixture()
DIRS = [torch.tensor(d, dtype=torch.float64) for d in ([1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-0.8, 0.6])]
# The slow sweeps make about 500 law checks of two statistics each: at 1e-3 per check one false alarm per run
# would be expected, at 1e-4 one in twenty runs.
ALPHA = 1e-4
LEVEL = ALPHA / len(DIRS)                              # Bonferroni over the projections
Z_CRIT = NormalDist().inv_cdf(1 - LEVEL / 2)           # two-sided z-test of the projected mean


def _custom_schedule():
    # alpha = t, sigma = 1 - t^2: a valid path (SNR increasing) that is none of the built-in ones, so
    # time_at_snr goes through the generic bisection.
    return gf.CustomSchedule(lambda t: t, lambda t: 1 - t * t,
                             lambda t: torch.ones_like(torch.as_tensor(t, dtype=torch.float64)), lambda t: -2 * t)


SCHEDULES = {"linear": gf.LinearSchedule(), "cosine": gf.CosineSchedule(), "vp": gf.VPSchedule(),
             "custom": _custom_schedule()}


# ------------------------------------------------------------------------------------------------- helpers
def projected_moments(law, u):
    """Exact mean and variance of u.X for X ~ sum_k w_k N(mu_k, var_k I)."""
    w, mu, var = (v.to(torch.float64) for v in law)
    m = mu @ u
    mean = float((w * m).sum())
    second = float((w * (var * (u @ u) + m * m)).sum())
    return mean, second - mean * mean


def projected_pdf_max(law, u, points: int = 20001) -> float:
    """Largest density of u.X over a grid covering every component to 12 standard deviations."""
    w, mu, var = (v.to(torch.float64) for v in law)
    m, sd = mu @ u, torch.sqrt(var * (u @ u))
    y = torch.linspace(float((m - 12 * sd).min()), float((m + 12 * sd).max()), points, dtype=torch.float64)
    dens = (w * torch.exp(-0.5 * ((y[:, None] - m) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))).sum(-1)
    return float(dens.max())


def check_law(y: torch.Tensor, law, rounding: torch.Tensor | None = None) -> None:
    """Assert that the rows of y [n, d] are draws of the mixture ``law`` (weights [C], means [C, d], variances [C]).

    ``rounding`` [n, d]: a bound on how far each coordinate of y may lie from the value the sampler computed
    before it was rounded to the state's dtype. A projection u.y then moves by at most e = max |u|.rounding,
    so its empirical CDF lies between F(. - e) and F(. + e): the KS threshold grows by (largest density) * e
    and the mean's by e. Nothing else is allowed for.
    """
    y = y.to(torch.float64)
    n = y.shape[0]
    crit = ks_critical(n, LEVEL)
    for u in DIRS:
        e = 0.0 if rounding is None else float((rounding.to(torch.float64) @ u.abs()).max())
        ks = ks_statistic(y @ u, lambda v, u=u: mixture_cdf(v, *law, u))
        allow = crit + projected_pdf_max(law, u) * e
        assert ks < allow, f"KS {ks:.4f} >= {allow:.4f} (n={n}, direction {u.tolist()})"
        mean, var = projected_moments(law, u)
        dev, tol = abs(float((y @ u).mean()) - mean), Z_CRIT * math.sqrt(var / n) + e
        assert dev < tol, f"mean off by {dev:.4f} >= {tol:.4f} (n={n}, direction {u.tolist()})"


def transition_law(x_cond, t, t_next, rho, sch):
    w, mu, var = MIX.transition_law(x_cond.to(torch.float64), t, t_next, rho, sch)
    return w[0], mu[0], var[0]


def conditioning_point(sch, t, seed=3, dtype=torch.float32):
    """One x_t ~ p_t in the state's dtype (the law is then computed at exactly that point)."""
    return MIX.marginal_sample(sch, t, 1, torch.Generator().manual_seed(seed)).to(dtype)


def steps_for(solver: str, singular_end: bool) -> int:
    """Inner model calls by the solver's order: first-order Euler needs many more than the second-order
    midpoint and Heun; Heun onto sigma_bar = 0 ends with an Euler step, so it gets Euler's count."""
    if solver == "euler" or (solver == "heun" and singular_end):
        return 64
    return 16


def glass_draws(model, x_cond, t, t_next, n, *, seed=11, **kw):
    x = x_cond.repeat(n, 1)
    return gf.glass_transition(model, x, t, t_next, generator=torch.Generator().manual_seed(seed), **kw)


def _singular(t_next, rho) -> bool:
    """sigma_bar = 0 at the end of the transition (t' = 1 or |rho| = 1)."""
    return t_next == 1.0 or (isinstance(rho, float) and abs(rho) == 1.0)


# ----------------------------------------------------------------------------- single GLASS transitions
# (schedule, prediction, t, t_next, rho, solver): each a cell no other test checks against the exact law.
CELLS = [
    ("linear", "x0", 0.3, 0.7, 1.0, "midpoint"),          # rho = 1: sigma_bar = 0, still random through z
    ("linear", "x0", 0.3, 0.7, -1.0, "heun"),             # rho = -1, Heun's Euler fallback
    ("linear", "velocity", 0.3, 0.7, -0.6, "euler"),      # negative correlation
    ("linear", "velocity", 0.5, 1.0, 0.4, "heun"),        # posterior sampling, Heun onto sigma_bar = 0
    ("linear", "score", 0.5, 1.0, "ddpm", "midpoint"),    # score model at t' = 1
    ("linear", "velocity", 0.0, 1.0, 0.4, "midpoint"),    # noise to data in one transition
    ("cosine", "epsilon", 0.3, 1.0, 0.4, "midpoint"),     # epsilon model at t' = 1 (clamped time range)
    ("cosine", "velocity", 0.2, 0.6, ("ddpm", 2.0), "heun"),
    ("vp", "velocity", 0.0, 0.4, 0.4, "midpoint"),        # VP's t = 0 has alpha_0 > 0
    ("vp", "score", 0.3, 0.8, "callable", "euler"),
    ("custom", "x0", 0.2, 0.6, "ddpm", "midpoint"),
    ("custom", "epsilon", 0.0, 0.5, 0.4, "heun"),         # epsilon model from alpha = 0
    ("custom", "velocity", 0.4, 1.0, 0.0, "midpoint"),
]


def _rho(rho):
    # A callable of (t, t_next): the mean of the two times, a value no closed form of the library produces.
    return (lambda a, b: 0.5 * (a + b)) if rho == "callable" else rho


@pytest.mark.parametrize("name,pred,t,t_next,rho,solver", CELLS, ids=lambda v: str(v))
def test_glass_transition_follows_the_exact_law(name, pred, t, t_next, rho, solver):
    sch, n, rho = SCHEDULES[name], 4000, _rho(rho)
    x_cond = conditioning_point(sch, t)
    y = glass_draws(MIX.flow_model(sch, pred), x_cond, t, t_next, n, rho=rho, solver=solver,
                    inner_steps=steps_for(solver, _singular(t_next, rho)))
    check_law(y, transition_law(x_cond, t, t_next, rho, sch))


def test_the_check_has_power_against_a_wrong_rho():
    # The same statistics reject draws made with another rho (0.4 vs 0.0): a passing check means something.
    sch, n, t, t_next = SCHEDULES["linear"], 4000, 0.3, 0.7
    x_cond = conditioning_point(sch, t)
    y = glass_draws(MIX.flow_model(sch, "x0"), x_cond, t, t_next, n, rho=0.4, solver="midpoint", inner_steps=16)
    with pytest.raises(AssertionError):
        check_law(y, transition_law(x_cond, t, t_next, 0.0, sch))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_float64_and_float32_states_follow_the_exact_law(dtype):
    sch, n, t, t_next = SCHEDULES["cosine"], 4000, 0.25, 0.65
    x_cond = conditioning_point(sch, t, dtype=dtype)
    y = glass_draws(MIX.flow_model(sch, "velocity"), x_cond, t, t_next, n, rho="ddpm", solver="heun", inner_steps=16)
    assert y.dtype == dtype
    check_law(y, transition_law(x_cond, t, t_next, "ddpm", sch))


def half_rounding(y: torch.Tensor) -> torch.Tensor:
    """Bound on |y - y_unrounded| per element for y rounded to nearest in its half dtype: half a unit in the
    last place, at most |y| eps / 2 for normal numbers (eps = 2^-7 bfloat16, 2^-10 float16; the unrounded
    value may lie just above a power of two, hence |y| eps rather than |y| eps / 2), plus half the smallest
    subnormal step."""
    fi = torch.finfo(y.dtype)
    return y.to(torch.float64).abs() * fi.eps + fi.smallest_normal * fi.eps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name,pred,t,t_next,rho", [("linear", "velocity", 0.3, 0.7, 0.4),
                                                    ("cosine", "x0", 0.5, 1.0, "ddpm")])
def test_half_precision_state_follows_the_exact_law_up_to_its_rounding(dtype, name, pred, t, t_next, rho):
    """The transition carries its state in float32 and rounds the result once to the state's dtype
    (transitions.execute): that final rounding moves each draw by at most half_rounding, allowed for in
    check_law. n = 20000 makes it visible: the plain KS threshold is below bfloat16's allowance at t' = 1,
    where the posterior is narrow (standard deviations down to 0.3 against a rounding step of 2^-6 near
    |x| = 2; without the allowance this case fails). The network also sees and returns half-precision
    tensors at every call: that is model error of relative size eps per call, NOT allowed for here, so the
    test also asserts it stays below the resolution at this size."""
    sch, n = SCHEDULES[name], 20000
    x_cond = conditioning_point(sch, t, dtype=dtype)
    y = glass_draws(MIX.flow_model(sch, pred), x_cond, t, t_next, n, rho=rho, solver="midpoint", inner_steps=16)
    assert y.dtype == dtype
    check_law(y, transition_law(x_cond, t, t_next, rho, sch), rounding=half_rounding(y))


def test_one_rho_per_state_gives_each_state_its_own_law():
    """A callable returning one rho per state: rows with rho = -0.5 and rows with rho = 0.8, from the same
    x_t, follow their own exact laws (the law helper takes one rho at a time)."""
    sch, n, t, t_next = SCHEDULES["linear"], 4000, 0.3, 0.75
    x_cond = conditioning_point(sch, t)
    per_state = torch.tensor([-0.5, 0.8], dtype=torch.float64).repeat(n)
    y = glass_draws(MIX.flow_model(sch, "velocity"), x_cond, t, t_next, 2 * n, rho=lambda a, b: per_state,
                    solver="midpoint", inner_steps=16)
    check_law(y[0::2], transition_law(x_cond, t, t_next, -0.5, sch))
    check_law(y[1::2], transition_law(x_cond, t, t_next, 0.8, sch))


def test_one_interval_per_state_gives_each_state_its_own_law():
    sch, n = SCHEDULES["cosine"], 4000
    x_cond = conditioning_point(sch, 0.3)
    t = torch.tensor([0.3, 0.3], dtype=torch.float64).repeat(n)
    t_next = torch.tensor([0.5, 1.0], dtype=torch.float64).repeat(n)
    y = glass_draws(MIX.flow_model(sch, "x0"), x_cond, t, t_next, 2 * n, rho="ddpm", solver="midpoint", inner_steps=16)
    check_law(y[0::2], transition_law(x_cond, 0.3, 0.5, "ddpm", sch))
    check_law(y[1::2], transition_law(x_cond, 0.3, 1.0, "ddpm", sch))


@pytest.mark.parametrize("sigmabar0,solver", [(0.25, "heun"), (4.0, "euler")])
def test_any_inner_start_noise_with_other_solvers_and_schedules(sigmabar0, solver):
    sch, n, t, t_next = SCHEDULES["vp"], 4000, 0.2, 0.6
    x_cond = conditioning_point(sch, t)
    y = glass_draws(MIX.flow_model(sch, "epsilon"), x_cond, t, t_next, n, rho=0.4, solver=solver,
                    sigmabar0=sigmabar0, inner_steps=steps_for(solver, False))
    check_law(y, transition_law(x_cond, t, t_next, 0.4, sch))


def test_posterior_sampling_close_to_the_data_with_a_matching_inner_start_noise():
    """From t = 0.99 the posterior p(z | x_t) has the scale sigma_t / alpha_t = 0.0101: an inner flow that
    starts at sigmabar_0 = 1 must shrink its noise 100-fold and is stiff (16 midpoint calls give a standard
    deviation 4x too small, KS 18x the critical value at n = 20000; 256 calls are needed). Any sigmabar_0
    gives the same law (MATH.md section 3), and one of the posterior's scale makes the inner flow easy."""
    sch, n, t, t_next = SCHEDULES["linear"], 4000, 0.99, 1.0
    x_cond = conditioning_point(sch, t)
    scale = float(sch.sigma(torch.tensor(t, dtype=torch.float64)) / sch.alpha(torch.tensor(t, dtype=torch.float64)))
    y = glass_draws(MIX.flow_model(sch, "x0"), x_cond, t, t_next, n, rho=0.4, solver="midpoint", inner_steps=16,
                    sigmabar0=scale)
    check_law(y, transition_law(x_cond, t, t_next, 0.4, sch))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
def test_every_cpu_backend_of_the_fused_step_follows_the_exact_law(backend, dtype):
    """The fused step runs on the backend chosen per device (C++ by default here): each one that can run on
    the CPU (Triton under its interpreter) must give the exact law, in every state dtype."""
    from glass_fast import ops
    from glass_fast.ops._backend import unavailable_reason
    why = unavailable_reason(backend, "cpu")
    if why is not None:
        pytest.skip(f"backend {backend!r} cannot run here: {why}")
    sch, n, t, t_next = SCHEDULES["cosine"], 4000, 0.3, 0.8
    x_cond = conditioning_point(sch, t, dtype=dtype)
    with ops.use_backend(backend):
        y = glass_draws(MIX.flow_model(sch, "epsilon"), x_cond, t, t_next, n, rho=-0.5, solver="heun", inner_steps=16)
    assert y.dtype == dtype
    check_law(y, transition_law(x_cond, t, t_next, -0.5, sch),
              rounding=half_rounding(y) if dtype == torch.bfloat16 else None)


# --------------------------------------------------------------------------- Sampler's entry points
@pytest.mark.parametrize("handed", ["nothing", "denoised", "first_output"])
def test_sampler_step_follows_the_exact_law_whatever_the_first_call_is_handed(handed):
    """Sampler.step on a one-interval grid, making its first model call itself or handed D_t(x) (the FK
    reuse path) or the raw output from Sampler.predict: the same exact law."""
    sch, n, t, t_next = SCHEDULES["custom"], 4000, 0.35, 0.8
    model = MIX.flow_model(sch, "velocity")
    x_cond = conditioning_point(sch, t)
    x = x_cond.repeat(n, 1)
    sampler = gf.Sampler(model, method="glass", grid=[t, t_next], inner_steps=16, solver="midpoint", rho=0.4)
    kw = {}
    if handed == "denoised":
        kw["denoised"] = model.denoise(x, t)
    elif handed == "first_output":
        kw["first_output"] = sampler.predict(0, x)[0]
    y = sampler.step(0, x, generator=torch.Generator().manual_seed(5), **kw)
    check_law(y, transition_law(x_cond, t, t_next, 0.4, sch))


@pytest.mark.parametrize("method", ["glass", "ode", "sde", "plugin"])
def test_max_batch_and_a_chain_of_steps_change_nothing(method):
    """max_batch splits the model calls and Sampler.step chained by hand is Sampler.run: both must give the
    very same draws (so the laws checked elsewhere carry over), with the exact model's row-wise arithmetic."""
    model = MIX.flow_model(SCHEDULES["cosine"], "velocity")
    noise = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    kw = dict(method=method, transitions=3, inner_steps=4 if method != "plugin" else 1)
    plain = gf.Sampler(model, **kw).run(noise, generator=torch.Generator().manual_seed(1))
    split = gf.sample(model, noise, max_batch=7, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(split, plain)
    sampler, g, x = gf.Sampler(model, max_batch=7, **kw), torch.Generator().manual_seed(1), noise
    for k in range(sampler.transitions):
        x = sampler.step(k, x, generator=g)
    assert torch.equal(x, plain)
    assert not torch.equal(plain, noise)


# ------------------------------------------------------------------- transitions carry the marginal
@pytest.mark.parametrize("method,name", [("glass", "custom"), ("ode", "vp"), ("sde", "cosine")])
def test_transitions_from_exact_marginal_draws_reach_the_next_marginal(method, name):
    """From x_t ~ p_t (every row its own point, unlike the fixed-point tests), one transition gives p_t'."""
    sch, n, t, t_next = SCHEDULES[name], 4000, 0.2, 0.7
    model = MIX.flow_model(sch, "score")
    x = MIX.marginal_sample(sch, t, n, torch.Generator().manual_seed(8)).float()
    g = torch.Generator().manual_seed(9)
    if method == "glass":
        y = gf.glass_transition(model, x, t, t_next, rho=-0.3, inner_steps=64, solver="euler", generator=g)
    elif method == "ode":
        y = gf.ode_transition(model, x, t, t_next, steps=16, solver="heun")
    else:
        y = gf.sde_transition(model, x, t, t_next, steps=64, generator=g)
    check_law(y, MIX.marginal_law(sch, t_next))


# -------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("method,name,solver,grid", [
    ("glass", "cosine", "heun", [0.0, 0.1, 0.35, 0.8, 1.0]),
    ("glass", "custom", "euler", [0.0, 0.3, 0.6]),                 # a partial run, Euler inner steps
    ("ode", "custom", "midpoint", [0.0, 0.05, 0.2, 0.5, 0.9, 1.0]),
])
def test_generation_on_non_uniform_grids_reaches_the_marginal(method, name, solver, grid):
    sch, n = SCHEDULES[name], 4000
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    x = gf.sample(MIX.flow_model(sch, "velocity"), noise, method=method, grid=grid, solver=solver,
                  inner_steps=64 if solver == "euler" else 16, generator=torch.Generator().manual_seed(2))
    check_law(x, MIX.marginal_law(sch, grid[-1]))


@pytest.mark.parametrize("pred", ["x0", "epsilon", "score"])
def test_ode_heun_onto_the_data_with_a_singular_parameterization(pred):
    """For models other than velocity, Heun's last ODE step onto sigma = 0 is an Euler step (u is singular
    there): the data's law must still come out."""
    sch, n = SCHEDULES["linear"], 4000
    x = MIX.marginal_sample(sch, 0.5, n, torch.Generator().manual_seed(12)).float()
    y = gf.ode_transition(MIX.flow_model(sch, pred), x, 0.5, 1.0, steps=32, solver="heun")
    check_law(y, MIX.marginal_law(sch, 1.0))


def test_generation_with_one_rho_per_state():
    """A per-state rho through gf.sample: rows with rho = -0.5 and rows with rho = 0.9 both reach the data."""
    sch, n = SCHEDULES["linear"], 4000
    per_state = torch.tensor([-0.5, 0.9], dtype=torch.float64).repeat(n)
    noise = torch.randn(2 * n, 2, generator=torch.Generator().manual_seed(1))
    x = gf.sample(MIX.flow_model(sch, "x0"), noise, transitions=4, inner_steps=16, solver="midpoint",
                  rho=lambda a, b: per_state, generator=torch.Generator().manual_seed(2))
    check_law(x[0::2], MIX.marginal_law(sch, 1.0))
    check_law(x[1::2], MIX.marginal_law(sch, 1.0))


# ------------------------------------------------ Heun beside rows that end where the velocity is singular
def test_glass_heun_rows_keep_their_accuracy_beside_rows_ending_at_the_data():
    """Rows t = 0.3 -> 0.6 with 8 Heun calls follow the exact law when run alone; in a batch whose other rows
    go to t' = 1 (sigma_bar = 0) they must still do (they are the same rows of the same per-state kernel)."""
    sch, n = SCHEDULES["linear"], 20000
    model = MIX.flow_model(sch, "velocity")
    x_cond = conditioning_point(sch, 0.3)
    law = transition_law(x_cond, 0.3, 0.6, 0.4, sch)
    alone = glass_draws(model, x_cond, 0.3, 0.6, n, rho=0.4, solver="heun", inner_steps=8)
    check_law(alone, law)                     # the step count suffices for these rows on their own
    t = torch.full((2 * n,), 0.3, dtype=torch.float64)
    t_next = torch.tensor([0.6, 1.0], dtype=torch.float64).repeat(n)
    mixed = glass_draws(model, x_cond, t, t_next, 2 * n, rho=0.4, solver="heun", inner_steps=8)
    check_law(mixed[0::2], law)


def test_ode_heun_rows_keep_their_accuracy_beside_rows_ending_at_the_data():
    """The ODE's Heun: rows 0.3 -> 0.6 of an x0 model carry p_0.3 to p_0.6 with 4 calls alone, and must do so
    beside rows that end at t' = 1 (sigma = 0, where an x0 model's velocity is singular)."""
    sch, n = SCHEDULES["linear"], 20000
    model = MIX.flow_model(sch, "x0")
    x = MIX.marginal_sample(sch, 0.3, 2 * n, torch.Generator().manual_seed(8)).float()
    law = MIX.marginal_law(sch, 0.6)
    check_law(gf.ode_transition(model, x[0::2], 0.3, 0.6, steps=4, solver="heun"), law)
    t = torch.full((2 * n,), 0.3, dtype=torch.float64)
    t_next = torch.tensor([0.6, 1.0], dtype=torch.float64).repeat(n)
    check_law(gf.ode_transition(model, x, t, t_next, steps=4, solver="heun")[0::2], law)


@pytest.mark.parametrize("entry", ["glass per-state times", "glass per-state rho", "ode per-state times"])
def test_heun_rows_equal_the_same_rows_run_alone(entry):
    """The deterministic side of the same defect: with one N(0, I) draw per transition, a row of a per-state
    batch must equal that row run with its own scalar times and rho (as it does for midpoint and Euler)."""
    sch = SCHEDULES["linear"]
    x = MIX.marginal_sample(sch, 0.3, 4, torch.Generator().manual_seed(0)).float()
    t = torch.full((4,), 0.3, dtype=torch.float64)
    ends = torch.tensor([0.6, 0.6, 1.0, 1.0], dtype=torch.float64)
    if entry == "ode per-state times":
        model = MIX.flow_model(sch, "x0")
        batched = gf.ode_transition(model, x, t, ends, steps=4, solver="heun")
        alone = gf.ode_transition(model, x, 0.3, 0.6, steps=4, solver="heun")
    else:
        model = MIX.flow_model(sch, "velocity")
        rhos = torch.tensor([0.4, 0.4, 1.0, 1.0], dtype=torch.float64)
        kw = (dict(t_next=ends, rho=0.4) if entry == "glass per-state times"
              else dict(t_next=0.6, rho=lambda a, b: rhos))
        batched = gf.glass_transition(model, x, t, kw["t_next"], rho=kw["rho"], inner_steps=4, solver="heun",
                                      generator=torch.Generator().manual_seed(1))
        alone = gf.glass_transition(model, x, 0.3, 0.6, rho=0.4, inner_steps=4, solver="heun",
                                    generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(batched[:2], alone[:2], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- slow sweeps
SWEEP_RHOS = [0.4, -0.5, "ddpm", ("ddpm", 0.5), "callable"]


@pytest.mark.slow
@pytest.mark.parametrize("rho", SWEEP_RHOS, ids=str)
@pytest.mark.parametrize("pred", ["velocity", "x0", "epsilon", "score"])
@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun"])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_glass_transition_sweep(name, solver, pred, rho):
    """Every schedule x solver x parameterization x rho form, on two intervals: interior, and posterior
    sampling (t' = 1) from t = 0.4."""
    sch, n, rho = SCHEDULES[name], 4000, _rho(rho)
    model = MIX.flow_model(sch, pred)
    for t, t_next, seed in ((0.15, 0.55, 4), (0.4, 1.0, 5)):
        x_cond = conditioning_point(sch, t, seed=seed)
        y = glass_draws(model, x_cond, t, t_next, n, rho=rho, solver=solver, seed=seed,
                        inner_steps=steps_for(solver, _singular(t_next, rho)))
        check_law(y, transition_law(x_cond, t, t_next, rho, sch))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun"])
def test_half_precision_sweep(dtype, name, solver):
    sch, n, t, t_next = SCHEDULES[name], 20000, 0.3, 0.8
    x_cond = conditioning_point(sch, t, dtype=dtype)
    y = glass_draws(MIX.flow_model(sch, "velocity"), x_cond, t, t_next, n, rho=0.4, solver=solver,
                    inner_steps=steps_for(solver, False))
    assert y.dtype == dtype
    check_law(y, transition_law(x_cond, t, t_next, 0.4, sch), rounding=half_rounding(y))


@pytest.mark.slow
@pytest.mark.parametrize("sigmabar0", [0.25, 4.0])
@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun"])
def test_inner_start_noise_sweep(sigmabar0, name, solver):
    sch, n, t, t_next = SCHEDULES[name], 4000, 0.25, 0.75
    x_cond = conditioning_point(sch, t, seed=6)
    y = glass_draws(MIX.flow_model(sch, "x0"), x_cond, t, t_next, n, rho="ddpm", solver=solver, sigmabar0=sigmabar0,
                    inner_steps=steps_for(solver, False))
    check_law(y, transition_law(x_cond, t, t_next, "ddpm", sch))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("method,solver", [("glass", "euler"), ("glass", "midpoint"), ("glass", "heun"),
                                           ("ode", "euler"), ("ode", "midpoint"), ("ode", "heun"), ("sde", "euler"),
                                           ("plugin", "euler")])
def test_generation_sweep(name, method, solver):
    """Whole runs from p_0 on a non-uniform grid in float64 (the marginal at 1 is the data). Call counts by
    the solver's order; the SDE (weak order 1) and the plug-in kernel (consistent only as the grid refines)
    get many transitions."""
    sch, n = SCHEDULES[name], 4000
    noise = MIX.marginal_sample(sch, 0.0, n, torch.Generator().manual_seed(1))   # VP: alpha_0 > 0
    if method == "plugin":
        grid = torch.linspace(0, 1, 201, dtype=torch.float64) ** 1.5
        kw = dict(grid=grid, rho="ddpm")
    else:
        grid = [0.0, 0.1, 0.3, 0.6, 0.85, 1.0]
        steps = 64 if method == "sde" or solver == "euler" else 16
        kw = dict(grid=grid, inner_steps=steps, solver=solver)
    x = gf.sample(MIX.flow_model(sch, "velocity"), noise, method=method, generator=torch.Generator().manual_seed(2),
                  **kw)
    assert x.dtype == torch.float64
    check_law(x, MIX.marginal_law(sch, 1.0))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["glass", "ode", "sde"])
def test_compiled_sampler_follows_the_exact_law(method):
    """compile= traces the transitions around the exact model: same draws as eager (to float32 rounding)
    and the data's law at the end."""
    sch, n = SCHEDULES["linear"], 4000
    model = MIX.flow_model(sch, "velocity")
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    kw = dict(method=method, transitions=4, inner_steps=16 if method != "sde" else 64,
              solver="midpoint" if method != "sde" else "euler")
    torch.compiler.reset()
    compiled = gf.Sampler(model, compile={"backend": "aot_eager"}, **kw).run(
        noise, generator=torch.Generator().manual_seed(2))
    eager = gf.Sampler(model, **kw).run(noise, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    check_law(compiled, MIX.marginal_law(sch, 1.0))
