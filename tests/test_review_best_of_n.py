"""Review checks of best-of-N and of the accounting every steering routine shares (``steering/result.py``).

The law of best-of-N's selection is known in closed form: with a reward r, the r-value of the selected
sample is the largest of N independent draws of r(z), whose CDF is F^N for F the CDF of r(z) under the
data. The accounting checks count what a wrapping network and reward actually saw, and time only through
nested intervals (a measured part covers the intervals measured inside it), never against thresholds.
"""
import math
import time
import warnings

import pytest
import torch

import glass_fast as gf
from glass_fast.mixtures import ks_critical, ks_statistic, mixture_cdf
from glass_fast.steering import beam_search, best_of_n, fk_steering

SCH = gf.LinearSchedule()
B_VEC = torch.tensor([0.8, -0.6], dtype=torch.float64)
ALPHA = 0.001


def linear_reward(x):
    return x @ B_VEC.to(x)


def _noise(b, k, seed=0):
    return torch.randn(b, k, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


class Network:
    """Wraps a network: counts calls, rows (particle evaluations) and the seconds spent inside it."""

    def __init__(self, fn):
        self.fn, self.calls, self.rows, self.seconds = fn, 0, 0, 0.0

    def __call__(self, x, t):
        start = time.perf_counter()
        out = self.fn(x, t)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.rows += x.shape[0]
        return out


class Reward:
    """Wraps a reward: counts rows and the seconds spent inside it."""

    def __init__(self, fn=linear_reward):
        self.fn, self.rows, self.seconds = fn, 0, 0.0

    def __call__(self, x):
        start = time.perf_counter()
        out = self.fn(x)
        self.seconds += time.perf_counter() - start
        self.rows += x.shape[0]
        return out


def _model(mixture, prediction="x0"):
    net = Network(mixture.flow_model(SCH, prediction).fn)
    return gf.FlowModel(net, SCH, prediction), net


# ------------------------------------------------------------------------------- the law of the selection
def _projection_cdf(mixture, u):
    return lambda y: mixture_cdf(y, mixture.weights, mixture.means, mixture.stds ** 2, u)


@pytest.mark.parametrize("case", ["max", "min", "abs"])
def test_the_selection_follows_the_law_of_the_best_of_n_draws(mixture, case):
    """B independent groups of N: the selected rewards are B independent draws of max_N r(z). Linear
    rewards give F^N (max of u.z) and 1 - (1 - F)^N (the min, for r = -u.z); r = |z_0| gives
    (F(y) - F(-y))^N, a reward that is not monotone in any projection. The same statistic rejects the laws
    with N - 1 and 1 candidates: the check sees an off-by-one in N."""
    b, n = 2000, 4
    u = B_VEC if case != "abs" else torch.tensor([1.0, 0.0], dtype=torch.float64)
    reward = {"max": lambda x: x @ u.to(x.dtype), "min": lambda x: -(x @ u.to(x.dtype)),
              "abs": lambda x: (x @ u.to(x.dtype)).abs()}[case]
    res = best_of_n(mixture.flow_model(SCH, "x0"), reward, _noise(b, n, seed=31), solver="midpoint",
                    generator=_gen(32))
    F = _projection_cdf(mixture, u)
    law = {"max": lambda y, m: F(y) ** m, "min": lambda y, m: 1 - (1 - F(y)) ** m,
           "abs": lambda y, m: (F(y) - F(-y)).clamp_min(0) ** m}[case]
    picked = {"max": res.best @ u, "min": res.best @ u, "abs": (res.best @ u).abs()}[case]
    crit = ks_critical(b, ALPHA / 3)
    assert ks_statistic(picked, lambda y: law(y, n)) < crit
    for wrong in (n - 1, 1):
        assert ks_statistic(picked, lambda y, m=wrong: law(y, m)) > crit, wrong


def test_each_group_selects_its_own_best_as_if_run_alone(mixture):
    """The ODE is deterministic: a batch of B groups must equal B runs of one group each (rows and
    groups kept in order), and each group's best is the argmax of its own rewards."""
    model = mixture.flow_model(SCH, "x0")
    noise = _noise(5, 6, seed=3)
    res = best_of_n(model, linear_reward, noise, method="ode", transitions=3, inner_steps=4)
    for g in range(5):
        alone = best_of_n(model, linear_reward, noise[g:g + 1], method="ode", transitions=3, inner_steps=4)
        torch.testing.assert_close(res.samples[g], alone.samples[0])
        torch.testing.assert_close(res.best[g], alone.best[0])
        r = linear_reward(res.samples[g])
        torch.testing.assert_close(res.rewards[g], r)
        torch.testing.assert_close(res.best[g], res.samples[g, int(r.argmax())])
    assert len({int(i) for i in res.rewards.argmax(-1)}) > 1       # the groups do not share one index


def test_ties_pick_the_first_of_the_best(mixture):
    def reward(x):   # per group of 4: [nan, 1, 1, 0] then [1, 1, 1, 1]
        return torch.tensor([math.nan, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=x.dtype)

    with pytest.warns(UserWarning, match="for 1 candidate evaluations"):
        res = best_of_n(mixture.flow_model(SCH, "x0"), reward, _noise(2, 4), transitions=2, inner_steps=2)
    torch.testing.assert_close(res.best, torch.stack([res.samples[0, 1], res.samples[1, 0]]), rtol=0, atol=0)


def test_one_candidate_is_plain_sampling(mixture):
    model = mixture.flow_model(SCH, "x0")
    noise = _noise(3, 1)
    res = best_of_n(model, linear_reward, noise, transitions=3, inner_steps=2, generator=_gen(4))
    ref = gf.sample(model, noise.reshape(3, 2), transitions=3, inner_steps=2, generator=_gen(4))
    torch.testing.assert_close(res.samples[:, 0], ref, rtol=0, atol=0)
    torch.testing.assert_close(res.best, ref, rtol=0, atol=0)
    torch.testing.assert_close(res.log_weights, torch.zeros(3, 1, dtype=torch.float64))


@pytest.mark.parametrize("method", ["glass", "sde", "plugin"])
def test_the_generator_decides_the_run(mixture, method):
    model = mixture.flow_model(SCH, "x0")
    kw = dict(method=method, transitions=3, inner_steps=2)
    bon = gf.BestOfN(model, linear_reward, **kw)
    a = best_of_n(model, linear_reward, _noise(2, 4), generator=_gen(7), **kw)
    b = bon(_noise(2, 4), generator=_gen(7))
    c = bon(_noise(2, 4), generator=_gen(8))
    torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=0)
    torch.testing.assert_close(a.best, b.best, rtol=0, atol=0)
    assert (a.samples - c.samples).abs().max() > 1e-3


# ------------------------------------------------------------------------------------ invalid rewards
def test_a_partly_invalid_reward_is_reported_with_where_it_first_happened(mixture):
    def reward(x):
        r = linear_reward(x).clone()
        r[5], r[6] = math.nan, -math.inf            # group 1, candidates 1 and 2
        return r

    with pytest.warns(UserWarning, match=r"best_of_n: the reward was NaN or Inf for 2 candidate evaluations "
                                         r"\(the first: group 1, candidate 1\)"):
        res = best_of_n(mixture.flow_model(SCH, "x0"), reward, _noise(2, 4), transitions=2, inner_steps=2)
    assert math.isnan(res.rewards[1, 1]) and math.isinf(res.rewards[1, 2])   # reported as returned
    finite = torch.where(torch.isfinite(res.rewards), res.rewards, -math.inf)
    torch.testing.assert_close(res.best, res.samples[torch.arange(2), finite.argmax(-1)])


@pytest.mark.parametrize("bad", [-math.inf, math.nan])
def test_a_group_without_a_finite_reward_is_named(mixture, bad):
    def reward(x):
        r = linear_reward(x).clone()
        r[6:9] = bad                                  # all of group 2
        return r

    with pytest.raises(RuntimeError, match=r"best_of_n: the reward was NaN or Inf for every candidate of group 2 "
                                           r"after transition 1 \(t=0.5000 -> 1.0000\)"):
        best_of_n(mixture.flow_model(SCH, "x0"), reward, _noise(4, 3), transitions=2, inner_steps=2)


@pytest.mark.parametrize("name", ["best_of_n", "beam_search", "fk_steering"])
def test_reward_warnings_point_at_the_callers_line(mixture, name):
    """A warning attributed to a line inside the library (or torch's no_grad wrapper) hides where the run
    was started, and the default filter then shows it once for every caller together."""
    def reward(x):
        return torch.where(x[:, 0] > 0.5, math.nan, linear_reward(x))

    run = {"best_of_n": best_of_n, "beam_search": beam_search, "fk_steering": fk_steering}[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(mixture.flow_model(SCH, "x0"), reward, _noise(2, 8), transitions=2, inner_steps=2, generator=_gen(0))
        gf.BestOfN(mixture.flow_model(SCH, "x0"), reward, transitions=2, inner_steps=2)(_noise(2, 8), generator=_gen(0))
    assert len(caught) == 2 and {w.filename for w in caught} == {__file__}, [(w.filename, w.lineno) for w in caught]


@pytest.mark.parametrize("out,err,match", [
    (lambda x: x[:, :1] @ torch.ones(1, 1, dtype=x.dtype), ValueError, r"shape \[8\] .* got shape \(8, 1\)"),
    (lambda x: x[1:, 0], ValueError, r"shape \[8\] .* got shape \(7,\)"),
    (lambda x: x[:, 0].sum(), ValueError, r"shape \[8\] .* got shape \(\)"),
    (lambda x: (x[:, 0] > 0).long(), TypeError, "floating-point Tensor, got dtype torch.int64"),
    (lambda x: x[:, 0] > 0, TypeError, "floating-point Tensor, got dtype torch.bool"),
    (lambda x: x[:, 0].tolist(), TypeError, r"must return a Tensor\[8\], got list"),
    (lambda x: torch.zeros(8, device="meta"), ValueError, "on the particles' device cpu, got meta"),
])
def test_a_reward_of_the_wrong_kind_is_refused_by_name(mixture, out, err, match):
    with pytest.raises(err, match=match + r".*\(in best_of_n\)"):
        best_of_n(mixture.flow_model(SCH, "x0"), out, _noise(2, 4), transitions=2, inner_steps=2)


@pytest.mark.parametrize("name", ["best_of_n", "fk_steering", "beam_search"])
def test_a_reward_that_edits_its_input_in_place_is_refused(mixture, name):
    """The reward is handed the particles, their x0-predictions, and at t = 1 the samples returned: an in-place
    edit, e.g. a rescale to a pixel range, silently changed the returned samples."""
    def rescale(x):
        x.mul_(0.5).add_(0.5)
        return linear_reward(x)

    run = {"best_of_n": best_of_n, "fk_steering": fk_steering, "beam_search": beam_search}[name]
    with pytest.raises(RuntimeError, match=r"the reward modified its input x in place \(in " + name):
        run(mixture.flow_model(SCH, "x0"), rescale, _noise(2, 3), transitions=2, inner_steps=2)
    # Out of place is fine, and so is editing a copy; under inference_mode (no version counter) runs still work.
    run(mixture.flow_model(SCH, "x0"), lambda x: linear_reward(x.clone().mul_(0.5)), _noise(2, 3), transitions=2,
        inner_steps=2)
    with torch.inference_mode():
        res = run(mixture.flow_model(SCH, "x0"), linear_reward, _noise(2, 3), transitions=2, inner_steps=2)
    assert res.best.shape == (2, 2) and torch.isfinite(res.best).all()


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(noise=torch.zeros(4, 2)), ValueError, r"noise must be a Tensor\[B, K, \.\.\.\] .* got shape \(4, 2\)"),
    (dict(noise=torch.zeros(2, 0, 2)), ValueError, "K >= 1 particles, got B=2, K=0"),
    (dict(noise=torch.zeros(2, 3, 2, dtype=torch.int64)), TypeError, "noise must be a floating Tensor"),
    (dict(reward=3.0), TypeError, "reward must be callable"),
    (dict(generator=0), TypeError, "generator must be a torch.Generator or None, got int"),
    (dict(project=1), TypeError, "project must be None or callable"),
    (dict(guidance="g"), TypeError, "guidance must be None or callable"),
    (dict(timings="yes"), ValueError, "timings must be None .*, True or False, got 'yes'"),
    (dict(model=lambda x, t: x), TypeError, "model must be a glass_fast.FlowModel, got function"),
])
def test_bad_arguments_are_refused_by_name(mixture, kwargs, err, match):
    args = {"model": mixture.flow_model(SCH, "x0"), "reward": linear_reward, "noise": _noise(2, 3), **kwargs}
    with pytest.raises(err, match=match):
        best_of_n(args.pop("model"), args.pop("reward"), args.pop("noise"), **args)
    built = {key: kwargs[key] for key in ("model", "reward", "guidance", "timings") if key in kwargs}
    if built:   # the reusable object refuses these when built, before any batch
        with pytest.raises(err, match=match):
            gf.BestOfN(built.pop("model", mixture.flow_model(SCH, "x0")), built.pop("reward", linear_reward),
                       **built)


# ------------------------------------------------------------------------------------------- accounting
@pytest.mark.parametrize("method,solver", [("glass", "euler"), ("glass", "midpoint"), ("glass", "heun"),
                                           ("ode", "midpoint"), ("sde", "euler"), ("plugin", "euler")])
@pytest.mark.parametrize("max_batch", [None, 4])
def test_best_of_n_counts_the_evaluations_the_network_made(mixture, method, solver, max_batch):
    model, net = _model(mixture)
    reward = Reward()
    n = 3 * 5
    res = best_of_n(model, reward, _noise(3, 5), method=method, solver=solver, transitions=3, inner_steps=4,
                    max_batch=max_batch, generator=_gen(1))
    assert res.nfe == net.rows / n > 0                        # evaluations per particle
    assert model.calls == res.nfe                             # batched calls, however max_batch splits them
    assert net.calls == (res.nfe if max_batch is None else res.nfe * math.ceil(n / max_batch))
    assert res.reward_calls == reward.rows / n == 1


def test_guidance_through_the_network_is_counted(mixture):
    model, net = _model(mixture)
    detached = best_of_n(model, linear_reward, _noise(2, 3), transitions=3, inner_steps=4, generator=_gen(1),
                         guidance=gf.RewardGuidance(linear_reward, scale=1.0))
    rows = net.rows
    through = best_of_n(model, linear_reward, _noise(2, 3), transitions=3, inner_steps=4, generator=_gen(1),
                        guidance=gf.RewardGuidance(linear_reward, scale=1.0, detach=False))
    assert detached.nfe == rows / 6 == 12
    assert through.nfe == (net.rows - rows) / 6 > detached.nfe   # one more call per guided stage


@pytest.mark.parametrize("max_batch", [None, 5])
@pytest.mark.parametrize("method", ["glass", "plugin"])
def test_value_estimates_are_counted_per_copy(mixture, method, max_batch):
    """FK steering's value potential and beam search's children and value draws run several rows per
    particle: nfe must be the rows the network saw per particle."""
    model, net = _model(mixture)
    reward = Reward()
    res = fk_steering(model, reward, _noise(2, 3), method=method, potential="value", value_samples=3,
                      transitions=3, inner_steps=4, max_batch=max_batch, generator=_gen(1))
    assert res.nfe == net.rows / 6 and res.reward_calls == reward.rows / 6
    for value_samples in (None, 3):
        model, net = _model(mixture)
        reward = Reward()
        res = beam_search(model, reward, _noise(2, 3), method=method, expansions=2, value_samples=value_samples,
                          transitions=3, inner_steps=4, max_batch=max_batch, generator=_gen(1))
        assert res.nfe == net.rows / 6 and res.reward_calls == reward.rows / 6
        assert model.calls == net.calls if max_batch is None else model.calls < net.calls


def _run(name, model, reward, **kw):
    kw = dict(transitions=3, inner_steps=2, generator=_gen(0), **kw)
    if name == "fk_steering":
        return fk_steering(model, reward, _noise(2, 3), potential="value", value_samples=2, **kw)
    if name == "beam_search":
        return beam_search(model, reward, _noise(2, 3), expansions=2, value_samples=2, **kw)
    return best_of_n(model, reward, _noise(2, 3), **kw)


@pytest.mark.parametrize("name", ["best_of_n", "fk_steering", "beam_search"])
@pytest.mark.parametrize("timings", [None, True])
def test_timings_cover_what_was_timed_inside(mixture, name, timings):
    """On CPU every part is measured (timings None or True): each covers the seconds the network and the
    reward measured inside themselves, the parts sum to the total, and the reward is part of the total."""
    model, net = _model(mixture)
    reward = Reward()
    t = _run(name, model, reward, timings=timings).timings
    assert set(t) == {"model", "reward", "sampler", "total"}
    assert all(math.isfinite(v) and v >= 0 for v in t.values()), t
    assert t["model"] >= net.seconds > 0 and t["reward"] >= reward.seconds > 0
    assert t["total"] >= t["model"] + t["reward"]
    assert math.isclose(t["model"] + t["reward"] + t["sampler"], t["total"], rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("name", ["best_of_n", "fk_steering", "beam_search"])
def test_timings_off_are_nan_and_counts_stay(mixture, name):
    model, net = _model(mixture)
    res = _run(name, model, Reward(), timings=False)
    assert all(math.isnan(v) for v in res.timings.values()) and set(res.timings) == {"model", "reward", "sampler",
                                                                                     "total"}
    assert res.nfe == net.rows / 6


@torch.no_grad()
def test_compiled_runs_time_the_reward_and_leave_the_model_unmeasured(mixture):
    # Inside compiled transitions the network cannot be timed on its own: "model" is NaN and its seconds are
    # part of "sampler"; the reward is still timed, and the counts equal the eager run's.
    model = mixture.flow_model(SCH, "x0")   # fullgraph: no clock or counter inside the network
    reward = Reward()
    kw = dict(transitions=3, inner_steps=2)
    eager = best_of_n(model, linear_reward, _noise(2, 3), generator=_gen(0), **kw)
    res = gf.BestOfN(model, reward, compile={"backend": "eager", "fullgraph": True}, **kw)(_noise(2, 3),
                                                                                           generator=_gen(0))
    t = res.timings
    assert math.isnan(t["model"]) and t["reward"] >= reward.seconds > 0
    assert t["total"] >= t["reward"] + t["sampler"] - 1e-12 and t["sampler"] > 0
    assert res.nfe == eager.nfe == 6 and res.reward_calls == reward.rows / 6 == 1
    torch.testing.assert_close(res.samples, eager.samples)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_timings_need_asking_and_the_reward_must_stay_on_the_device(mixture):
    model = mixture.flow_model(SCH, "x0")        # the exact model moves its output to the state's device
    noise = _noise(2, 3).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    off = best_of_n(model, linear_reward, noise, transitions=2, inner_steps=2, generator=gen)
    assert all(math.isnan(v) for v in off.timings.values())           # no synchronisation unless asked
    t = best_of_n(model, linear_reward, noise, transitions=2, inner_steps=2, timings=True).timings
    assert all(math.isfinite(v) and v >= 0 for v in t.values()) and t["total"] >= t["model"] + t["reward"]
    with pytest.raises(ValueError, match="on the particles' device cuda:0, got cpu"):
        best_of_n(model, lambda x: linear_reward(x).cpu(), noise, transitions=2, inner_steps=2)


def test_reused_objects_reset_the_accounting_per_call(mixture):
    model, net = _model(mixture)
    bon = gf.BestOfN(model, linear_reward, transitions=3, inner_steps=2)
    first = bon(_noise(2, 3), generator=_gen(0))
    rows = net.rows
    second = bon(_noise(4, 3), generator=_gen(1))
    assert first.nfe == second.nfe == 6 and (net.rows - rows) / 12 == 6
    assert model.calls == 12 and second.reward_calls == 1   # the user's count advanced by both runs
    assert second.timings["reward"] <= second.timings["total"]


@pytest.mark.parametrize("make", [gf.BestOfN, gf.FKSteering, gf.BeamSearch])
def test_every_steering_object_refuses_a_model_that_is_not_a_flow_model_when_built(make):
    with pytest.raises(TypeError, match="model must be a glass_fast.FlowModel, got function"):
        make(lambda x, t: x, linear_reward)
    with pytest.raises(TypeError, match="reward must be callable"):
        make(gf.FlowModel(lambda x, t: x, SCH), 3.0)
