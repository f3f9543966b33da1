"""Review checks of FK steering, resampling, best-of-N and beam search: an independent re-implementation of the
weight recursion, selection for several groups, and large lmbda."""
import itertools
import math

import pytest
import torch

import glass_fast as gf
from glass_fast.steering import beam_search, fk_steering

SCH = gf.LinearSchedule()
B_VEC = torch.tensor([0.8, -0.6], dtype=torch.float64)


def linear_reward(x):
    return x @ B_VEC.to(x.dtype)


def bounded_reward(x):
    return torch.tanh(linear_reward(x))


def _noise(b, k, seed=0):
    return torch.randn(b, k, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("lmbda", [1e308, 1.7e308])
@pytest.mark.parametrize("potential,final_correction", [("diff", False), ("add", True), ("immediate", False)])
def test_an_overflowing_lmbda_is_named_not_blamed_on_the_reward(mixture, lmbda, potential, final_correction):
    # Finite rewards times a huge lmbda overflow float64: in the scores themselves, or in their differences and
    # sums along a path. That used to end in NaN log-weights returned without a word, or in an error saying that
    # the (finite) reward was NaN or Inf.
    with pytest.raises(FloatingPointError, match=r"lmbda=.*overflow"):
        fk_steering(mixture.flow_model(SCH, "x0"), bounded_reward, _noise(2, 4), lmbda=lmbda, potential=potential,
                    final_correction=final_correction, ess_threshold=0.0, generator=torch.Generator().manual_seed(1))


def test_a_large_lmbda_that_does_not_overflow_still_weights_by_exp_lambda_r(mixture):
    lmbda = 1e300
    res = fk_steering(mixture.flow_model(SCH, "x0"), bounded_reward, _noise(2, 4), lmbda=lmbda, ess_threshold=0.0,
                      generator=torch.Generator().manual_seed(1))
    expected = lmbda * res.rewards
    torch.testing.assert_close(res.log_weights, expected - expected.max(-1, keepdim=True).values, rtol=1e-12, atol=0)


def _reference_fk(model, noise, *, method, transitions, inner_steps, potential, lmbda, scheme, threshold, window,
                  every, final_correction, seed):
    """FK steering written out particle by particle in Python floats, from MATH.md section 4: log-weights that
    accumulate and reset to log(1/K) after resampling, ESS < threshold * K, the window and frequency, running
    states copied with their particle, and the final correction over each particle's whole ancestry. The
    proposal is the library's Sampler, drawing from the same generator in the same order (transition k, then
    the uniforms of a due step), so the two runs see the same randomness."""
    b_groups, k_part = noise.shape[:2]
    sampler = gf.Sampler(model, method=method, transitions=transitions, inner_steps=inner_steps, dtype=noise.dtype)
    grid, gen = sampler.grid, torch.Generator().manual_seed(seed)
    x = noise.reshape(b_groups * k_part, 2).clone()

    def scores(z, t=None):
        r = linear_reward(z if t is None else model.denoise(z, torch.tensor(t, dtype=torch.float64)))
        return [lmbda * float(v) for v in r]

    s0 = scores(x, float(grid[0]))
    state = [[dict(prev=s0[i], top=s0[i], total=s0[i], path=0.0) for i in range(g * k_part, (g + 1) * k_part)]
             for g in range(b_groups)]
    log_w = [[-math.log(k_part)] * k_part for _ in range(b_groups)]
    for k in range(transitions):
        x = sampler.step(k, x, generator=gen)
        last = k + 1 == transitions
        s = scores(x) if last else scores(x, float(grid[k + 1]))
        for g, j in itertools.product(range(b_groups), range(k_part)):
            p, v = state[g][j], s[g * k_part + j]
            if last and final_correction:
                log_g = v - p["path"]
            elif potential == "diff":
                log_g = v - p["prev"]
            elif potential == "max":
                log_g = p["top"] = max(v, p["top"])
            elif potential == "add":
                log_g, p["total"] = v + p["total"], p["total"] + v
            else:
                log_g = v
            p["prev"], p["path"] = v, p["path"] + log_g
            log_w[g][j] += log_g
        if last or not (window[0] <= float(grid[k + 1]) <= window[1] and (k + 1) % every == 0):
            continue
        u = torch.rand((b_groups, k_part), generator=gen, dtype=torch.float64)
        rows = list(range(b_groups * k_part))
        for g in range(b_groups):
            top = max(log_w[g])
            w = [math.exp(v - top) for v in log_w[g]]
            w = [v / sum(w) for v in w]
            if 1.0 / sum(v * v for v in w) >= threshold * k_part and threshold < 1.0:
                continue
            cdf = list(itertools.accumulate(w))
            cdf[-1] = 1.0
            ancestors = []
            for j in range(k_part):
                pos = (j + float(u[g, 0 if scheme == "systematic" else j])) / k_part
                ancestors.append(next(i for i, c in enumerate(cdf) if c > pos))
            for j, a in enumerate(ancestors):
                rows[g * k_part + j] = g * k_part + a
            state[g] = [dict(state[g][a]) for a in ancestors]
            log_w[g] = [-math.log(k_part)] * k_part
        x = x[rows]
    log_w = torch.tensor(log_w, dtype=torch.float64)
    return x.reshape(noise.shape), log_w - torch.logsumexp(log_w, -1, keepdim=True)


@pytest.mark.parametrize("potential", ["diff", "max", "add", "immediate"])
@pytest.mark.parametrize("final_correction", [True, False])
@pytest.mark.parametrize("scheme,threshold,window,every", [("systematic", 0.6, (0.0, 1.0), 1),
                                                           ("stratified", 0.9, (0.3, 0.7), 1),
                                                           ("systematic", 1.0, (0.0, 1.0), 2)])
def test_fk_steering_equals_a_particle_by_particle_reimplementation(mixture, potential, final_correction, scheme,
                                                                     threshold, window, every):
    model = mixture.flow_model(SCH, "x0")
    noise = _noise(3, 5, seed=11)
    kw = dict(method="glass", transitions=6, inner_steps=3, potential=potential, lmbda=2.0)
    x_ref, lw_ref = _reference_fk(model, noise, scheme=scheme, threshold=threshold, window=window, every=every,
                                  final_correction=final_correction, seed=4, **kw)
    res = fk_steering(model, linear_reward, noise, resample=scheme, ess_threshold=threshold, resample_window=window,
                      resample_every=every, final_correction=final_correction,
                      generator=torch.Generator().manual_seed(4), **kw)
    torch.testing.assert_close(res.samples, x_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.log_weights, lw_ref, rtol=0, atol=1e-10)


def test_a_bad_scheme_is_named_by_the_argument_that_took_it(mixture):
    # resample(..., scheme=) and SteeringResult.resample(scheme=) used to call it "resample", fk_steering's name.
    with pytest.raises(ValueError, match=r"^scheme must be one of .*got 'bogus'"):
        gf.resample(torch.zeros(2, 3), scheme="bogus")
    res = gf.SteeringResult(samples=torch.zeros(2, 3, 1), log_weights=torch.zeros(2, 3), rewards=torch.zeros(2, 3),
                            best=torch.zeros(2, 1), nfe=1.0)
    with pytest.raises(ValueError, match=r"^scheme must be one of .*got 'bogus'"):
        res.resample("bogus")
    with pytest.raises(ValueError, match=r"^resample must be one of .*got 'bogus'"):
        fk_steering(mixture.flow_model(gf.LinearSchedule(), "x0"), linear_reward, _noise(1, 2), resample="bogus")


@pytest.mark.parametrize("t", [0.55, 0.3, 0.7])
def test_a_window_edge_on_a_grid_time_includes_it(mixture, t):
    # The grid holds k / 20 in float64: 11 / 20 is 0.5499999999999999, and (0.55, 0.55) used to hold no grid time.
    model, noise = mixture.flow_model(SCH, "x0"), _noise(2, 6)
    kw = dict(transitions=20, inner_steps=1, potential="immediate", final_correction=False, ess_threshold=1.0)

    def run(window):
        return fk_steering(model, linear_reward, noise, resample_window=window,
                           generator=torch.Generator().manual_seed(1), **kw)
    edge, around = run((t, t)), run((t - 0.01, t + 0.01))   # both hold t alone
    never = fk_steering(model, linear_reward, noise, generator=torch.Generator().manual_seed(1),
                        **{**kw, "ess_threshold": 0.0})
    assert not torch.equal(around.samples, never.samples)
    torch.testing.assert_close(edge.samples, around.samples, rtol=0, atol=0)
    torch.testing.assert_close(edge.log_weights, around.log_weights, rtol=0, atol=0)


def test_beam_search_equals_a_per_group_reimplementation(mixture):
    # Each group keeps the K best of its own K x E children (never another group's), at every transition.
    model, noise = mixture.flow_model(SCH, "x0"), _noise(3, 2)
    b_groups, k_beams, e, steps = 3, 2, 3, 4
    res = beam_search(model, linear_reward, noise, expansions=e, transitions=steps, inner_steps=3,
                      generator=torch.Generator().manual_seed(5))
    sampler = gf.Sampler(model, method="glass", transitions=steps, inner_steps=3, dtype=noise.dtype)
    gen = torch.Generator().manual_seed(5)
    beams = [list(noise[g]) for g in range(b_groups)]
    for k in range(steps):
        children = sampler.step(k, torch.stack([z for g in beams for z in g]).repeat_interleave(e, 0), generator=gen)
        t = float(sampler.grid[k + 1])
        scores = linear_reward(children if k + 1 == steps else model.denoise(children, torch.tensor(t)))
        for g in range(b_groups):
            own = range(g * k_beams * e, (g + 1) * k_beams * e)
            kept = sorted(own, key=lambda i: -float(scores[i]))[:k_beams]
            beams[g] = [children[i] for i in kept]
    torch.testing.assert_close(res.samples, torch.stack([torch.stack(g) for g in beams]), rtol=0, atol=0)
    torch.testing.assert_close(res.rewards, linear_reward(res.samples), rtol=0, atol=0)
    assert res.nfe == 1 + (steps * 3 - 1) * e   # D_{t_0} once per beam, then every call on e children


@pytest.mark.parametrize("run", ["fk", "beam"])
def test_a_nan_in_the_handed_in_x0_prediction_names_its_transition(run):
    """D_t(x) at a grid time is the next transition's first model call, handed in: a NaN there is reported as
    that transition's stage 0, as the sampler reports it (not only as a time)."""
    def fn(x, t):
        return torch.where(t[:, None] >= 0.15, torch.full_like(x, math.nan), -x)
    model = gf.FlowModel(fn, gf.LinearSchedule(), prediction="x0")
    noise = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(0))
    call = fk_steering if run == "fk" else beam_search
    with pytest.raises(FloatingPointError, match=r"transition 1 \(t=0\.2000 -> 0\.4000\), stage 0"):
        call(model, lambda x: -x.pow(2).sum(-1), noise, method="sde", transitions=5, inner_steps=2)


def test_value_draws_handed_the_first_output_equal_their_own_call(mixture):
    # FK steering and beam search hand a state's predicted first call to its value estimate's posterior
    # draws: in bfloat16 too, the draws must be those the estimate would make on its own.
    from glass_fast.steering.value import PosteriorValue
    model = mixture.flow_model(gf.LinearSchedule(), "velocity")
    value = PosteriorValue(model, 0.4, samples=3, inner_steps=4, rho=0.4, solver="euler", device="cpu",
                           dtype=torch.bfloat16)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    draws = []

    def score(z):
        draws.append(z)
        return z[:, 0].double()

    own = value(x, score, generator=torch.Generator().manual_seed(1))
    out, _ = value.sampler.predict(0, x)
    handed = value(x, score, first_output=out, generator=torch.Generator().manual_seed(1))
    assert torch.equal(draws[1], draws[0]) and torch.equal(handed, own)
