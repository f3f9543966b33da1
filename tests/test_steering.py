"""FK steering mechanics: model-call reuse, weight bookkeeping, best-of-N, accounting and bad input."""
import contextlib
import importlib
import math

import pytest
import torch

import glass_fast as gf
from glass_fast.steering import POTENTIALS, best_of_n, fk_steering

B_VEC = torch.tensor([0.8, -0.6], dtype=torch.float64)
SCH = gf.LinearSchedule()


def linear_reward(x):
    return x @ B_VEC.to(x.dtype)


class Counting:
    """Wraps a network: counts calls and rows (particle evaluations)."""

    def __init__(self, fn):
        self.fn, self.calls, self.rows = fn, 0, 0

    def __call__(self, x, t):
        self.calls += 1
        self.rows += x.shape[0]
        return self.fn(x, t)


class Recording:
    """A reward that keeps every output it returned."""

    def __init__(self, fn=linear_reward):
        self.fn, self.outputs = fn, []

    def __call__(self, x):
        r = self.fn(x)
        self.outputs.append(r.clone())
        return r


def _noise(b, k, seed=0):
    return torch.randn(b, k, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _counting_model(mixture, prediction="x0"):
    exact = mixture.flow_model(SCH, prediction)
    fn = Counting(exact.fn)
    return gf.FlowModel(fn, SCH, prediction), fn


@pytest.mark.parametrize("method,solver,expected", [("glass", "euler", 50), ("glass", "midpoint", 50),
                                                    ("ode", "euler", 50), ("sde", "euler", 50),
                                                    ("plugin", "euler", 5)])
def test_fk_steering_costs_transitions_times_inner_steps(mixture, method, solver, expected):
    model, fn = _counting_model(mixture)
    b, k = 2, 3
    res = fk_steering(model, linear_reward, _noise(b, k), method=method, solver=solver, transitions=5,
                      inner_steps=10, ess_threshold=1.0, generator=torch.Generator().manual_seed(1))
    assert fn.calls == expected                      # every network call sees all B * K particles at once
    assert fn.rows == expected * b * k
    assert res.nfe == expected and model.calls == expected
    assert res.reward_calls == 5 + 1                 # t_0, the four inner grid times and t = 1


def test_value_potential_cost(mixture):
    model, fn = _counting_model(mixture)
    res = fk_steering(model, linear_reward, _noise(1, 4), potential="value", value_samples=3, transitions=5,
                      inner_steps=10, generator=torch.Generator().manual_seed(1))
    # 4 inner grid times x 3 posterior draws x 9 calls (the first is the reused denoiser)
    assert res.nfe == 50 + 4 * 3 * 9 and fn.rows == res.nfe * 4


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("method", ["glass", "sde", "ode", "plugin"])
def test_without_reward_fk_is_the_plain_sampler(mixture, method, dtype):
    # lmbda = 0 and no resampling: the first model call made for the scores, handed to the transition, must
    # reproduce the sampler's own bit for bit (handed in as D rounded to bfloat16, it did not).
    model = mixture.flow_model(SCH, "velocity")
    noise = _noise(2, 5).to(dtype)
    res = fk_steering(model, linear_reward, noise, method=method, lmbda=0.0, ess_threshold=0.0,
                      generator=torch.Generator().manual_seed(7))
    ref = gf.sample(model, noise.reshape(10, 2), method=method, generator=torch.Generator().manual_seed(7))
    assert torch.equal(res.samples.reshape(10, 2), ref)
    torch.testing.assert_close(res.log_weights, torch.full((2, 5), -math.log(5), dtype=torch.float64))


def _normalized(lw):
    return lw - torch.logsumexp(lw, dim=-1, keepdim=True)


def test_weights_accumulate_without_resampling(mixture):
    # ess_threshold = 0 never resamples: the final log-weights are the summed potentials.
    model = mixture.flow_model(SCH, "x0")
    rec, lmbda = Recording(), 0.7
    res = fk_steering(model, rec, _noise(2, 6), potential="immediate", lmbda=lmbda, ess_threshold=0.0,
                      final_correction=False, generator=torch.Generator().manual_seed(2))
    summed = sum(lmbda * r for r in rec.outputs[1:]).reshape(2, 6)   # every score after t_0
    torch.testing.assert_close(res.log_weights, _normalized(summed))
    rec, res = Recording(), None
    res = fk_steering(model, rec, _noise(2, 6), potential="add", lmbda=lmbda, ess_threshold=0.0,
                      final_correction=False, generator=torch.Generator().manual_seed(2))
    s = [lmbda * r.reshape(2, 6) for r in rec.outputs]
    expected = sum(sum(s[: j + 1]) for j in range(1, len(s)))       # log G_j = s_j + sum_{i<j} s_i
    torch.testing.assert_close(res.log_weights, _normalized(expected))


def test_weights_reset_after_resampling(mixture):
    # ess_threshold = 1 resamples after every inner transition: only the last potential remains.
    model = mixture.flow_model(SCH, "x0")
    rec = Recording()
    res = fk_steering(model, rec, _noise(2, 6), potential="immediate", ess_threshold=1.0,
                      final_correction=False, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(res.log_weights, _normalized(rec.outputs[-1].reshape(2, 6)))
    assert torch.equal(res.rewards, rec.outputs[-1].reshape(2, 6))


@pytest.mark.parametrize("potential", POTENTIALS)
def test_final_correction_leaves_exp_lambda_r(mixture, potential):
    # Without resampling, the corrected weight of every path is exp(lmbda r(x_1)) whatever the potential.
    model = mixture.flow_model(SCH, "x0")
    lmbda = 1.3
    res = fk_steering(model, linear_reward, _noise(3, 4), potential=potential, lmbda=lmbda, ess_threshold=0.0,
                      value_samples=2, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(res.log_weights, _normalized(lmbda * res.rewards))


def test_diff_telescopes_without_correction(mixture):
    # D_0(x_0) = E[z] for every particle (alpha_0 = 0), so "diff" alone already weights by exp(lmbda r(x_1)).
    model = mixture.flow_model(SCH, "x0")
    res = fk_steering(model, linear_reward, _noise(2, 5), potential="diff", ess_threshold=0.0,
                      final_correction=False, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(res.log_weights, _normalized(res.rewards))


def test_resampling_window_and_frequency(mixture):
    # A window that excludes every inner grid time draws no uniforms: identical to never resampling.
    model = mixture.flow_model(SCH, "x0")
    kw = dict(potential="immediate", final_correction=False)
    never = fk_steering(model, linear_reward, _noise(2, 6), ess_threshold=0.0,
                        generator=torch.Generator().manual_seed(2), **kw)
    outside = fk_steering(model, linear_reward, _noise(2, 6), ess_threshold=1.0, resample_window=(0.9, 1.0),
                          generator=torch.Generator().manual_seed(2), **kw)
    sparse = fk_steering(model, linear_reward, _noise(2, 6), ess_threshold=1.0, resample_every=10,
                         generator=torch.Generator().manual_seed(2), **kw)
    for other in (outside, sparse):
        torch.testing.assert_close(other.samples, never.samples)
        torch.testing.assert_close(other.log_weights, never.log_weights)


def test_result_fields(mixture):
    model = mixture.flow_model(SCH, "x0")
    res = fk_steering(model, linear_reward, _noise(3, 4), generator=torch.Generator().manual_seed(0),
                      progress=True)
    assert res.samples.shape == (3, 4, 2) and res.log_weights.shape == (3, 4) and res.rewards.shape == (3, 4)
    torch.testing.assert_close(torch.logsumexp(res.log_weights, -1), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(res.best, res.samples[torch.arange(3), res.rewards.argmax(-1)])
    assert set(res.timings) == {"model", "reward", "sampler", "total"}
    assert all(v >= 0 for v in res.timings.values())
    assert res.resample(generator=torch.Generator().manual_seed(0)).shape == (3, 4, 2)
    assert res.select(generator=torch.Generator().manual_seed(0)).shape == (3, 2)


@pytest.mark.parametrize("scheme", ["multinomial", "systematic"])
def test_final_selection_draws_by_weight(scheme):
    # G groups of particles 0, 1, 2 (the sample is its index) with weights (0.2, 0.8, 0): selected and
    # resampled particles come from their own group, never the zero weight, with frequencies w (5 SE).
    g, w = 4000, torch.tensor([0.2, 0.8, 0.0], dtype=torch.float64)
    samples = torch.arange(3, dtype=torch.float64).expand(g, 3)[..., None] + 10 * torch.arange(g)[:, None, None]
    res = gf.SteeringResult(samples=samples, log_weights=torch.log(w).expand(g, 3), rewards=torch.zeros(g, 3),
                            best=samples[:, 0], nfe=0.0)
    picked = res.select(generator=torch.Generator().manual_seed(1))[:, 0] - 10 * torch.arange(g)
    kept = res.resample(scheme, generator=torch.Generator().manual_seed(2))[..., 0] - 10 * torch.arange(g)[:, None]
    assert set(picked.tolist()) <= {0.0, 1.0} and set(kept.flatten().tolist()) <= {0.0, 1.0}
    se = math.sqrt(0.2 * 0.8 / g)
    assert abs(float((picked == 0).double().mean()) - 0.2) < 5 * se
    assert abs(float((kept == 0).double().mean()) - 0.2) < 5 * se


@pytest.mark.parametrize("method", ["glass", "ode", "sde"])
def test_best_of_n(mixture, method):
    model, fn = _counting_model(mixture, "velocity")
    noise = _noise(3, 8)
    res = best_of_n(model, linear_reward, noise, method=method, transitions=5, inner_steps=10,
                    generator=torch.Generator().manual_seed(1))
    ref = gf.sample(mixture.flow_model(SCH, "velocity"), noise.reshape(24, 2), method=method,
                    generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(res.samples.reshape(24, 2), ref)
    torch.testing.assert_close(res.rewards, linear_reward(ref).reshape(3, 8))
    torch.testing.assert_close(res.best, res.samples[torch.arange(3), res.rewards.argmax(-1)])
    assert res.nfe == 50 and fn.calls == 50 and res.reward_calls == 1
    torch.testing.assert_close(res.log_weights, torch.full((3, 8), -math.log(8), dtype=torch.float64))
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        best_of_n(model, linear_reward, noise, potential="diff")


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(potential="best"), "potential must be one of"),
    (dict(resample="bogus"), "resample must be one of"),
    (dict(lmbda=-1.0), "lmbda must be a finite number >= 0"),
    (dict(ess_threshold=1.5), r"ess_threshold must be a number in \[0, 1\]"),
    (dict(resample_window=(0.7, 0.2)), "resample_window must satisfy"),
    (dict(resample_every=0), "resample_every must be an integer >= 1"),
    (dict(method="euler"), "method must be one of"),
])
def test_bad_options(mixture, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fk_steering(mixture.flow_model(SCH, "x0"), linear_reward, _noise(1, 2), **kwargs)


def test_bad_noise(mixture):
    model = mixture.flow_model(SCH, "x0")
    with pytest.raises(ValueError, match="K >= 1"):
        fk_steering(model, linear_reward, torch.zeros(2, 0, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"noise must be a Tensor\[B, K, ...\]"):
        fk_steering(model, linear_reward, torch.zeros(4, 2, dtype=torch.float64))


@pytest.mark.parametrize("reward,err,match", [
    (lambda x: linear_reward(x)[:, None], ValueError, r"shape \[6\]"),
    (lambda x: linear_reward(x)[:3], ValueError, r"shape \[6\]"),
    (lambda x: (x[:, 0] > 0).long(), TypeError, "floating-point"),
    (lambda x: torch.zeros(x.shape[0], device="meta"), ValueError, "device"),
    (lambda x: x[:, 0].tolist(), TypeError, "must return a Tensor"),
])
def test_bad_reward(mixture, reward, err, match):
    with pytest.raises(err, match=match):
        fk_steering(mixture.flow_model(SCH, "x0"), reward, _noise(2, 3))
    with pytest.raises(err, match=match):
        best_of_n(mixture.flow_model(SCH, "x0"), reward, _noise(2, 3))


def test_nan_reward_gives_zero_weight_and_warns(mixture):
    def reward(x):
        r = linear_reward(x).clone()
        r[0] = math.nan                          # group 0, particle 0, at every evaluation
        return r

    with pytest.warns(UserWarning, match="NaN or Inf for 6 particle evaluations"):
        res = fk_steering(mixture.flow_model(SCH, "x0"), reward, _noise(2, 3), ess_threshold=0.0)
    assert math.isinf(float(res.log_weights[0, 0])) and torch.all(torch.isfinite(res.log_weights[0, 1:]))
    assert torch.all(torch.isfinite(res.log_weights[1]))
    assert not torch.equal(res.best[0], res.samples[0, 0])     # a NaN reward never wins


def test_nan_reward_with_resampling_is_dropped(mixture):
    def reward(x):
        r = linear_reward(x).clone()
        r[1] = math.nan
        return r

    with pytest.warns(UserWarning, match="NaN or Inf"):
        res = fk_steering(mixture.flow_model(SCH, "x0"), reward, _noise(1, 4), ess_threshold=1.0,
                          generator=torch.Generator().manual_seed(0))
    assert torch.isneginf(res.log_weights[0, 1]) and torch.all(torch.isfinite(res.log_weights[0, [0, 2, 3]]))


def test_group_with_only_nan_rewards_raises(mixture):
    def reward(x):
        r = linear_reward(x).clone()
        r[3:6] = math.nan                        # all of group 1
        return r

    with pytest.raises(RuntimeError, match=r"group 1 has zero weight after transition 0 \(t=0.0000 -> 0.2000\)"):
        fk_steering(mixture.flow_model(SCH, "x0"), reward, _noise(2, 3))


def test_max_batch_splits_calls_without_changing_results(mixture):
    model, fn = _counting_model(mixture)
    kw = dict(potential="value", value_samples=2, generator=None)
    a = fk_steering(model, linear_reward, _noise(2, 4), **{**kw, "generator": torch.Generator().manual_seed(0)})
    calls = fn.calls
    b = fk_steering(model, linear_reward, _noise(2, 4), max_batch=3,
                    **{**kw, "generator": torch.Generator().manual_seed(0)})
    torch.testing.assert_close(a.samples, b.samples)
    assert a.nfe == b.nfe and fn.calls - calls > calls     # more, smaller network calls; same evaluations


def test_custom_grid_is_used_by_steering_and_best_of_n(mixture):
    m = mixture.flow_model(gf.LinearSchedule(), "x0")
    noise = torch.randn(2, 4, 2, generator=torch.Generator().manual_seed(0))
    uniform = torch.linspace(0, 1, 4, dtype=torch.float64)
    shifted = torch.tensor([0.0, 0.5, 0.8, 1.0], dtype=torch.float64)
    runs = {}
    for name, grid in (("default", None), ("uniform", uniform), ("shifted", shifted)):
        kw = dict(transitions=3, inner_steps=2, generator=torch.Generator().manual_seed(1))
        if grid is not None:
            kw["grid"] = grid
        runs[name] = gf.fk_steering(m, lambda x: x[:, 0], noise, **kw).samples
        assert gf.best_of_n(m, lambda x: x[:, 0], noise, **kw).samples.shape == noise.shape
    torch.testing.assert_close(runs["uniform"], runs["default"])
    assert not torch.allclose(runs["shifted"], runs["default"])


# ------------------------------------------------------------------------------------ reusable objects
@pytest.mark.parametrize("potential", ["diff", "value"])
def test_fk_steering_object_reused_equals_the_function(mixture, potential):
    model, fn = _counting_model(mixture)
    kw = dict(method="glass", transitions=4, inner_steps=4, potential=potential, value_samples=2)
    steer = gf.FKSteering(model, linear_reward, **kw)
    for seed in (0, 1, 0):   # the third call repeats the first: no state carried over between calls
        want = fk_steering(model, linear_reward, _noise(2, 3, seed), generator=torch.Generator().manual_seed(seed),
                           **kw)
        calls, net_calls = model.calls, fn.calls
        got = steer(_noise(2, 3, seed), generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(got.samples, want.samples, rtol=0, atol=0)
        torch.testing.assert_close(got.log_weights, want.log_weights, rtol=0, atol=0)
        assert got.nfe == want.nfe and got.reward_calls == want.reward_calls
        assert model.calls - calls == fn.calls - net_calls > 0   # the user's count advanced by this call's calls
    assert len(steer._parts) == 1                       # one sampler for this device and dtype, kept


def test_best_of_n_object_reused_equals_the_function(mixture):
    model, _ = _counting_model(mixture)
    best = gf.BestOfN(model, linear_reward, method="sde", transitions=3, inner_steps=2)
    for seed in (0, 1):
        want = best_of_n(model, linear_reward, _noise(2, 4, seed), method="sde", transitions=3, inner_steps=2,
                         generator=torch.Generator().manual_seed(seed))
        got = best(_noise(2, 4, seed), generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(got.samples, want.samples, rtol=0, atol=0)
        assert got.nfe == want.nfe == 6
    got32 = best(_noise(2, 4).float())                  # another dtype builds its own sampler
    assert got32.samples.dtype == torch.float32 and len(best._parts) == 2


def test_beam_search_object_reused_equals_the_function(mixture):
    model, fn = _counting_model(mixture)
    kw = dict(method="glass", transitions=3, inner_steps=2, expansions=3, value_samples=2)
    search = gf.BeamSearch(model, linear_reward, **kw)
    for seed in (0, 1, 0):   # the third call repeats the first: no state carried over between calls
        want = gf.beam_search(model, linear_reward, _noise(2, 2, seed), generator=torch.Generator().manual_seed(seed),
                              **kw)
        calls, net_calls = model.calls, fn.calls
        got = search(_noise(2, 2, seed), generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(got.samples, want.samples, rtol=0, atol=0)
        torch.testing.assert_close(got.rewards, want.rewards, rtol=0, atol=0)
        assert got.nfe == want.nfe and got.reward_calls == want.reward_calls
        assert model.calls - calls == fn.calls - net_calls > 0
    assert len(search._parts) == 1
    with pytest.raises(ValueError, match="method='ode' is deterministic"):
        gf.BeamSearch(model, linear_reward, method="ode")


@torch.no_grad()
def test_reused_objects_compile_once(mixture):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    model = mixture.flow_model(SCH, "x0")
    compile_eager = {"backend": "eager", "fullgraph": True}
    steer = gf.FKSteering(model, linear_reward, transitions=3, inner_steps=2, compile=compile_eager)
    best = gf.BestOfN(model, linear_reward, transitions=3, inner_steps=2, compile=compile_eager)
    search = gf.BeamSearch(model, linear_reward, transitions=3, inner_steps=2, expansions=2, compile=compile_eager)
    for run, nfe in ((steer, 6), (best, 6), (search, 11)):
        before = counters["stats"]["unique_graphs"]
        first = run(_noise(2, 3, 0))
        compiled = counters["stats"]["unique_graphs"] - before
        assert 0 < compiled <= 3             # at most one graph per transition of the first batch
        res = run(_noise(2, 3, 1))
        assert counters["stats"]["unique_graphs"] - before == compiled   # the second batch reuses them
        # 3 transitions x 2 calls, counted outside the compiled code (beam search: the first call on each
        # beam, the other 5 on its 2 children)
        assert first.nfe == res.nfe == nfe
        # The network runs inside compiled code (fullgraph: no clock in it): its time is not separable.
        assert math.isnan(res.timings["model"]) and res.timings["total"] >= res.timings["sampler"] > 0


@pytest.mark.parametrize("make,kwargs,err,match", [
    (gf.FKSteering, dict(transitions=0), ValueError, "transitions"),
    (gf.FKSteering, dict(potential="best"), ValueError, "potential must be one of"),
    (gf.FKSteering, dict(compile=True, cuda_graph=True), ValueError, "choose one of compile= and cuda_graph="),
    (gf.BestOfN, dict(inner_steps=0), ValueError, "inner_steps"),
    (gf.BestOfN, dict(method="euler"), ValueError, "method must be one of"),
    (gf.BestOfN, dict(lmbda=1.0), TypeError, "unexpected keyword argument"),
])
def test_reusable_objects_check_settings_when_built(mixture, make, kwargs, err, match):
    with pytest.raises(err, match=match):
        make(mixture.flow_model(SCH, "x0"), linear_reward, **kwargs)
    with pytest.raises(TypeError, match="reward must be callable"):
        make(mixture.flow_model(SCH, "x0"), 3.0)


@pytest.mark.parametrize("make,kwargs,match", [
    (gf.FKSteering, dict(rho=3.0), r"rho must lie in \[-1, 1\], got 3.0"),
    (gf.FKSteering, dict(rho=("ddpm", -2)), "got kappa=-2"),
    (gf.FKSteering, dict(solver="midpoint", inner_steps=3), r"\(inner_steps\) must be a multiple of 2, got 3"),
    (gf.FKSteering, dict(final_correction="no"), "final_correction must be True or False, got 'no'"),
    (gf.BestOfN, dict(rho=5.0), r"rho must lie in \[-1, 1\], got 5.0"),
    (gf.BestOfN, dict(solver="heun", inner_steps=5), r"\(inner_steps\) must be a multiple of 2, got 5"),
    (gf.FKSteering, dict(grid=[0.0, 0.7, 0.5, 1.0]), "grid must hold finite, strictly increasing times"),
    (gf.BestOfN, dict(grid=[0.5]), "grid must be 1-D with at least two times"),
])
def test_sampler_settings_are_checked_when_built_not_at_the_first_batch(mixture, make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(mixture.flow_model(SCH, "x0"), linear_reward, **kwargs)


def test_best_of_n_never_picks_an_invalid_reward_and_says_so(mixture):
    def reward(x):
        r = linear_reward(x).clone()
        r[0], r[9] = math.nan, math.inf              # group 0 particle 0 (NaN), group 1 particle 1 (+inf)
        return r

    with pytest.warns(UserWarning, match="best_of_n: the reward was NaN or Inf for 2 candidate evaluations"):
        res = best_of_n(mixture.flow_model(SCH, "x0"), reward, _noise(2, 8), generator=torch.Generator().manual_seed(0))
    finite = torch.where(torch.isfinite(res.rewards), res.rewards, -math.inf)
    torch.testing.assert_close(res.best, res.samples[torch.arange(2), finite.argmax(-1)])
    assert not torch.equal(res.best[1], res.samples[1, 1])  # +inf is an invalid reward, not the best one


def test_best_of_n_group_without_a_valid_reward_raises(mixture):
    def reward(x):
        r = linear_reward(x).clone()
        r[4:8] = math.nan                            # all of group 1
        return r

    with pytest.raises(RuntimeError, match=r"best_of_n: the reward was NaN or Inf for every candidate of group 1"):
        best_of_n(mixture.flow_model(SCH, "x0"), reward, _noise(3, 4))


def test_steering_keeps_no_autograd_graph_of_the_reward(mixture):
    # A reward computed with gradients on (e.g. a network): the weights are values, not graphs that grow
    # with every transition.
    res = fk_steering(mixture.flow_model(SCH, "x0"), lambda x: linear_reward(x.requires_grad_()), _noise(2, 3))
    assert not res.log_weights.requires_grad and not res.rewards.requires_grad


def test_numpy_steering_settings(mixture):
    np = pytest.importorskip("numpy")
    model = mixture.flow_model(SCH, "x0")
    kw = dict(generator=torch.Generator().manual_seed(0))
    a = fk_steering(model, linear_reward, _noise(2, 3), lmbda=np.float32(0.5), ess_threshold=np.float64(0.5),
                    resample_every=np.int64(2), transitions=np.int64(3), inner_steps=np.int64(2), **kw)
    kw = dict(generator=torch.Generator().manual_seed(0))
    b = fk_steering(model, linear_reward, _noise(2, 3), lmbda=0.5, ess_threshold=0.5, resample_every=2,
                    transitions=3, inner_steps=2, **kw)
    torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=0)
    torch.testing.assert_close(a.log_weights, b.log_weights, rtol=0, atol=0)


# ------------------------------------------------------------------------ sampler settings, one list
ROUTINES = {"fk_steering": (fk_steering, gf.FKSteering), "best_of_n": (best_of_n, gf.BestOfN),
            "beam_search": (gf.beam_search, gf.BeamSearch)}


def test_every_routine_takes_the_sampler_settings_with_the_samplers_defaults():
    import inspect

    from glass_fast.steering.settings import SAMPLER_SETTINGS
    sampler = inspect.signature(gf.Sampler).parameters
    assert {name: sampler[name].default for name in SAMPLER_SETTINGS} == SAMPLER_SETTINGS
    for fn in [f for pair in ROUTINES.values() for f in pair]:
        params = inspect.signature(fn).parameters
        assert {name: params[name].default for name in SAMPLER_SETTINGS if name in params} == SAMPLER_SETTINGS, \
            (fn, sorted(set(SAMPLER_SETTINGS) - set(params)))


@pytest.mark.parametrize("name", list(ROUTINES))
def test_sigmabar0_reaches_the_sampler_of_every_routine(mixture, name):
    fn, make = ROUTINES[name]
    model = mixture.flow_model(SCH, "x0")
    kw = dict(transitions=3, inner_steps=2)

    def run(**extra):
        return fn(model, linear_reward, _noise(2, 3), generator=torch.Generator().manual_seed(1), **kw, **extra)
    base, again, wider = run(), run(sigmabar0=1.0), run(sigmabar0=0.5)
    torch.testing.assert_close(again.samples, base.samples, rtol=0, atol=0)   # same seed, same run
    assert (wider.samples - base.samples).abs().max() > 1e-3                 # the inner flow starts elsewhere
    for method in ("ode", "sde") if name != "beam_search" else ("sde",):    # beam search refuses "ode" itself
        with pytest.raises(ValueError, match=f"sigmabar0=0.5 is the GLASS inner flow's start; method='{method}'"):
            make(model, linear_reward, method=method, sigmabar0=0.5)        # when built, before any batch
        with pytest.raises(ValueError, match=f"sigmabar0=0.5 .* method='{method}'"):
            fn(model, linear_reward, _noise(1, 2), method=method, sigmabar0=0.5)
    for bad in (0.0, -1.0, math.nan, math.inf, True, "1"):
        with pytest.raises(ValueError, match=r"sigmabar0 must be a finite number > 0, got"):
            make(model, linear_reward, sigmabar0=bad)


def test_value_estimates_take_the_glass_settings(mixture):
    # potential="value" draws its posterior samples with the proposal's GLASS settings, sigmabar0 included.
    model = mixture.flow_model(SCH, "x0")
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v = {sb: gf.value_estimate(model, linear_reward, x, 0.4, samples=3, inner_steps=2, sigmabar0=sb,
                               generator=torch.Generator().manual_seed(1)) for sb in (1.0, 0.5)}
    assert (v[1.0] - v[0.5]).abs().max() > 1e-3
    kw = dict(transitions=3, inner_steps=2, potential="value", value_samples=2, ess_threshold=0.0)
    w = {sb: fk_steering(model, linear_reward, _noise(2, 3), sigmabar0=sb, generator=torch.Generator().manual_seed(1),
                         **kw).log_weights for sb in (1.0, 0.5)}
    assert (w[1.0] - w[0.5]).abs().max() > 1e-3


@pytest.mark.parametrize("max_batch", [0, 2.5, True])
def test_max_batch_is_checked_when_built(mixture, max_batch):
    for _, make in ROUTINES.values():
        with pytest.raises(ValueError, match="max_batch must be an integer >= 1"):
            make(mixture.flow_model(SCH, "x0"), linear_reward, max_batch=max_batch)


# ------------------------------------------------------------------------ host reads after the loop
READS = ("tolist", "item", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__array__")


@pytest.mark.parametrize("name", list(ROUTINES))
@pytest.mark.parametrize("nan_rewards", [False, True])
def test_one_host_read_after_the_loop(mixture, monkeypatch, name, nan_rewards):
    """Everything a run records on the device (non-finite model outputs, dead groups, non-finite rewards)
    is read in one transfer after its loop: each read is a host synchronisation on CUDA. Counted on CPU by
    wrapping every Tensor method that reads values into Python, switched on when the loop's iterator ends."""
    counting, reads = [False], []

    def loop(steps, on, desc):
        yield from steps
        counting[0] = True

    for mod in ("fk", "search", "best_of_n"):   # the modules (the package's names are the functions)
        monkeypatch.setattr(importlib.import_module(f"glass_fast.steering.{mod}"), "progress_bar", loop)
    for attr in READS:
        original = getattr(torch.Tensor, attr)

        def read(self, *args, _original=original, _attr=attr, **kwargs):
            if counting[0]:
                reads.append(_attr)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, attr, read)

    def reward(x):
        r = linear_reward(x)
        return torch.where(x[:, 0] > 1.0, math.nan, r) if nan_rewards else r
    fn, _ = ROUTINES[name]
    noise = _noise(2, 16)
    with pytest.warns(UserWarning, match="NaN or Inf") if nan_rewards else contextlib.nullcontext():
        fn(mixture.flow_model(SCH, "x0"), reward, noise, transitions=3, inner_steps=2,
           generator=torch.Generator().manual_seed(0))
    assert counting[0] and len(reads) == 1, reads


@pytest.mark.parametrize("timings", ["no", 0, 1.0])
def test_timings_must_be_none_or_a_bool(mixture, timings):
    # Read as a truth value, "no" would have switched timing (and CUDA synchronisation) on.
    for _, make in ROUTINES.values():
        with pytest.raises(ValueError, match=f"timings must be None .*, True or False, got {timings!r}"):
            make(mixture.flow_model(SCH, "x0"), linear_reward, timings=timings)


def test_a_grid_ending_before_one_is_refused(mixture):
    # The final reward would score noisy states at t = 0.8 as if they were data; a late start is fine.
    model = mixture.flow_model(SCH, "x0")
    for fn, make in ROUTINES.values():
        with pytest.raises(ValueError, match=r"grid must end at t = 1 for steering .* got a grid ending at 0.8"):
            make(model, linear_reward, grid=[0.0, 0.4, 0.8])
        res = fn(model, linear_reward, _noise(2, 3), grid=[0.3, 0.6, 1.0], inner_steps=2,
                 generator=torch.Generator().manual_seed(0))
        assert res.samples.shape == (2, 3, 2) and torch.isfinite(res.samples).all()


@pytest.mark.parametrize("name", list(ROUTINES))
def test_a_nan_model_output_is_named_even_when_the_reward_fails_on_it(mixture, name):
    # The network turns NaN from t > 0.5 on; a reward that refuses non-finite input must not hide the cause.
    exact = mixture.flow_model(SCH, "x0")
    model = gf.FlowModel(lambda x, t: exact.fn(x, t).masked_fill(t.view(-1, 1) > 0.5, math.nan), SCH, "x0")

    def strict(x):
        if not torch.isfinite(x).all():
            raise ValueError("strict reward: non-finite input")
        return linear_reward(x)
    fn, _ = ROUTINES[name]
    for reward in (linear_reward, strict):
        with pytest.raises(FloatingPointError, match=r"^the model returned NaN or Inf at "):
            fn(model, reward, _noise(2, 3), transitions=3, inner_steps=2, generator=torch.Generator().manual_seed(0))


def test_select_draws_by_weight_from_unnormalised_log_weights():
    # exp(1000) overflows: the cumulative weights were inf / inf and the last particle was picked every time.
    samples = torch.arange(2 * 3, dtype=torch.float64).reshape(2, 3, 1)
    lw = torch.tensor([[1000.0, -math.inf, 0.0], [-math.inf, 700.0, 700.0]], dtype=torch.float64)
    res = gf.SteeringResult(samples=samples, log_weights=lw, rewards=torch.zeros(2, 3), best=samples[:, 0], nfe=0.0)
    picks = torch.stack([res.select(generator=torch.Generator().manual_seed(s))[:, 0] for s in range(200)])
    assert torch.all(picks[:, 0] == 0.0)                      # weight 1 - e^-1000: particle 0 of group 0
    # Group 1: particles 4 and 5 with equal weights; 200 draws, the count of 4 is Binomial(200, 1/2) (5 SE).
    assert set(picks[:, 1].tolist()) <= {4.0, 5.0} and abs(float((picks[:, 1] == 4).sum()) - 100) < 5 * math.sqrt(50)
    for bad in ([-math.inf] * 3, [0.0, math.nan, 0.0], [0.0, math.inf, 0.0]):
        res.log_weights = torch.tensor([[0.0, 0.0, 0.0], bad], dtype=torch.float64)
        with pytest.raises(ValueError, match="log_weights of group 1 must be finite or -inf"):
            res.select()
