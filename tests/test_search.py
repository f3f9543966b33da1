"""Beam search over GLASS transitions: selection, cost accounting, and that search finds high rewards."""
import math

import pytest
import torch

import glass_fast as gf
from glass_fast.mixtures import standard_mixture

SCH = gf.LinearSchedule()
MIX = standard_mixture()
TARGET = torch.tensor([0.0, -2.0])   # the smallest mode's centre


def near_target(z):
    return -(z - TARGET.to(z.dtype)).square().sum(-1)


def _noise(b, k, seed=0):
    return torch.randn(b, k, 2, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["glass", "sde", "plugin"])
def test_kept_beams_are_the_best_and_the_cost_is_counted(method):
    model = MIX.flow_model(SCH, "velocity")
    res = gf.beam_search(model, near_target, _noise(3, 4), expansions=3, method=method, transitions=4,
                         inner_steps=2, generator=torch.Generator().manual_seed(1))
    assert res.samples.shape == (3, 4, 2) and res.rewards.shape == (3, 4)
    torch.testing.assert_close(res.rewards, near_target(res.samples).double())       # scores of the kept beams
    assert torch.all(res.rewards[:, :-1] >= res.rewards[:, 1:])                      # best first
    torch.testing.assert_close(res.best, res.samples[:, 0])
    calls = 1 if method == "plugin" else 2
    # D at t_0 once, then every call on 3 copies of each beam; the last transition scores x_1 itself.
    assert res.nfe == 1 + 4 * calls * 3 - 3 and model.calls == 1 + 4 * calls - 1
    assert res.reward_calls == 4 * 3


def test_compiled_search_equals_eager_and_counts_the_same_calls():
    model = MIX.flow_model(SCH, "velocity")
    kw = dict(expansions=3, transitions=4, inner_steps=2)
    eager = gf.beam_search(model, near_target, _noise(3, 4), generator=torch.Generator().manual_seed(1), **kw)
    comp = gf.beam_search(model, near_target, _noise(3, 4), generator=torch.Generator().manual_seed(1),
                          compile={"backend": "eager"}, **kw)
    torch.testing.assert_close(comp.samples, eager.samples, rtol=0, atol=1e-6)
    assert comp.nfe == eager.nfe and comp.reward_calls == eager.reward_calls


def test_value_scored_search_counts_its_posterior_draws():
    model = MIX.flow_model(SCH, "velocity")
    res = gf.beam_search(model, near_target, _noise(3, 2), expansions=3, transitions=4, inner_steps=4,
                         value_samples=5, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(res.rewards, near_target(res.samples).double())   # t = 1: the reward itself
    assert torch.all(res.rewards[:, :-1] >= res.rewards[:, 1:])
    # The plain search's calls, plus at each of the 3 inner grid times 3 posterior calls (the first is the
    # handed-in D) on 5 draws of each of the 3 children of a beam.
    assert res.nfe == (1 + 4 * 4 * 3 - 3) + 3 * 3 * 3 * 5
    with pytest.raises(ValueError, match="value_samples must be an integer >= 1"):
        gf.beam_search(model, near_target, _noise(2, 2), value_samples=0)


def test_search_beats_best_of_n_at_equal_model_calls():
    model = MIX.flow_model(SCH, "velocity")
    groups = 64
    beam = gf.beam_search(model, near_target, _noise(groups, 4), expansions=4, transitions=5, inner_steps=4,
                          generator=torch.Generator().manual_seed(1))
    per_group = 4 * beam.nfe                                   # 4 beams x their model calls
    n = int(per_group // 20)                                   # best-of-N particles with the same calls
    bon = gf.best_of_n(model, near_target, _noise(groups, n, seed=2), transitions=5, inner_steps=4,
                       generator=torch.Generator().manual_seed(3))
    assert bon.nfe * n <= per_group
    beam_best, bon_best = beam.rewards[:, 0], bon.rewards.max(dim=1).values.double()
    # Paired per group, a sign test (the reward gaps are heavy-tailed): were search no better, the number of
    # groups where it wins would be Binomial(64, 1/2); require the one-sided 0.1% critical value.
    wins = int((beam_best > bon_best).sum())
    assert wins > groups / 2 + 3.09 * math.sqrt(groups / 4), (wins, beam_best.mean(), bon_best.mean())


def test_nan_rewards_never_win():
    model = MIX.flow_model(SCH, "velocity")

    def half_nan(z):
        r = near_target(z)
        return torch.where(z[:, 0] > 0, torch.full_like(r, float("nan")), r)
    with pytest.warns(UserWarning, match=r"beam_search: the reward was NaN or Inf for \d+ candidate evaluations"):
        res = gf.beam_search(model, half_nan, _noise(8, 2), expansions=6, transitions=3, inner_steps=2,
                             generator=torch.Generator().manual_seed(4))
    assert torch.isfinite(res.rewards).all() and torch.all(res.samples[..., 0] <= 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_group_without_any_valid_reward_is_named(bad):
    # Group 1's children all score NaN (or Inf) from the second transition on: no beam can be chosen.
    model = MIX.flow_model(SCH, "velocity")
    calls = []

    def reward(z):
        calls.append(1)
        r = near_target(z)
        if len(calls) >= 2:
            r = r.clone()
            r[6:12] = bad            # group 1's 2 beams x 3 children, rows 6..11
        return r
    with pytest.raises(RuntimeError, match=r"beam_search: .* every candidate of group 1 after transition 1 "
                                           r"\(t=0\.3333 -> 0\.6667\)"):
        gf.beam_search(model, reward, _noise(3, 2), expansions=3, transitions=3, inner_steps=2,
                       generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("kwargs,match", [(dict(expansions=0), "expansions must be an integer >= 1"),
                                          (dict(method="ode"), "deterministic"),
                                          (dict(transitions=0), "transitions must be an integer >= 1")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gf.beam_search(MIX.flow_model(SCH, "velocity"), near_target, _noise(2, 2), **kwargs)
