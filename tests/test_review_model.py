"""Bringing one's own network and reward: time shapes the network is handed, guidance with a half-precision
network and a float32 reward model, rewards whose output does not depend on their input."""
import re

import pytest
import torch

import glass_fast as gf
from glass_fast.steering import RewardGuidance

SCH = gf.LinearSchedule()


# ------------------------------------------------------------------------------------------ time shapes
@pytest.mark.parametrize("shape", [(4, 1), (2,), (4, 3), (1, 1)])
@pytest.mark.parametrize("method", ["__call__", "denoise", "velocity"])
def test_times_that_are_not_one_per_row_are_refused(shape, method):
    # A [4, 3] time for x [4, 3, 5] became per-element coefficients, and [4, 1] or [1, 1] reached the
    # network, whose contract is t [B]: silently wrong where the network broadcasts them.
    seen = []

    def net(x, t):
        seen.append(tuple(t.shape))
        return -x

    m = gf.FlowModel(net, SCH, "velocity")
    with pytest.raises(ValueError, match=re.escape(f"t must be a 0-d Tensor or a Tensor[4] (one time per row of x "
                                                   f"[4, 3, 5]), got shape {shape}")):
        getattr(m, method)(torch.randn(4, 3, 5), torch.full(shape, 0.5))
    assert seen == [] and m.calls == 0


@pytest.mark.parametrize("method", ["__call__", "denoise", "velocity"])
def test_one_element_time_reaches_the_network_per_row(method):
    seen = []

    def net(x, t):
        seen.append(tuple(t.shape))
        return -x * t[:, None]

    m = gf.FlowModel(net, SCH, "velocity")
    x = torch.randn(4, 3)
    got = getattr(m, method)(x, torch.tensor([0.5]))
    assert seen == [(4,)]
    torch.testing.assert_close(got, getattr(m, method)(x, torch.tensor(0.5)))


# ------------------------------------------------------------------------------ guidance, network dtypes
def _classifier():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_network_guidance_with_a_float32_reward_model(mixture, dtype, detach):
    # The network runs in half precision, the state stays float32: FK steering's scores hand the reward float32
    # denoisers, and guidance must too (it handed half precision, and a float32 reward model raised).
    net, seen = _classifier(), set()

    def reward(x):
        seen.add(x.dtype)
        return net(x)[:, 0]

    model = mixture.flow_model(SCH, "velocity", dtype=dtype)
    noise = torch.randn(2, 4, 2, generator=torch.Generator().manual_seed(0))
    g = RewardGuidance(reward, 1.0, detach=detach)
    res = gf.fk_steering(model, reward, noise, guidance=g, generator=torch.Generator().manual_seed(1))
    assert bool(torch.isfinite(res.samples).all())
    x = gf.sample(model, noise.reshape(8, 2), guidance=g, generator=torch.Generator().manual_seed(1))
    assert x.dtype == torch.float32 and bool(torch.isfinite(x).all())
    assert seen == {torch.float32}


@pytest.mark.parametrize("prediction", ["velocity", "x0", "epsilon"])
def test_half_network_guidance_shift_is_rounded_once(mixture, prediction):
    # The shift of the raw output is computed in float32 and rounded to bfloat16 once: the guided output is
    # the nearest bfloat16 to the float32 result, out + shift / a_o, whatever the rounding of D.
    model = mixture.flow_model(SCH, prediction, dtype=torch.bfloat16)
    y = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    t_host = torch.full((64,), 0.45, dtype=torch.float64)
    t_dev = t_host.float()
    out = model(y, t_dev)
    b = torch.tensor([0.8, -0.6])
    guided = RewardGuidance(lambda z: z @ b.to(z.dtype), scale=0.37)(model, y, t_dev, t_host, out)
    a_o = gf.model.denoiser_coefficients(SCH, prediction, torch.tensor(0.45, dtype=torch.float64))[1]
    coef = 0.37 * float(SCH.sigma(0.45)) ** 2 / float(SCH.alpha(0.45))
    exact = out.double() + coef / float(a_o) * b.double()
    assert torch.equal(guided, exact.float().to(torch.bfloat16))


# ---------------------------------------------------------------------------- rewards without a gradient
def test_reward_that_does_not_use_its_input_is_named(mixture):
    # The reward model's parameters require grad, so its output does too; but x was detached inside it:
    # autograd's own message ("appears to not have been used in the graph") did not say which input.
    net = _classifier()
    model = mixture.flow_model(SCH, "velocity")
    for detach in (True, False):
        g = RewardGuidance(lambda x: net(x.detach())[:, 0], 1.0, detach=detach)
        with pytest.raises(TypeError, match="RewardGuidance: the reward's output does not depend on its input"):
            gf.sample(model, torch.randn(4, 2), guidance=g)


# ------------------------------------------------------------------------------------------- potentials
@pytest.mark.parametrize("kind", ["diff", "max", "add", "immediate", "value"])
@pytest.mark.parametrize("final_correction", [True, False])
def test_non_finite_first_score_gives_zero_weight_for_every_potential(kind, final_correction):
    # "immediate" ignores s_0 in its potentials, so a particle whose score at t_0 was NaN kept its weight
    # while fk_steering warned that it had been given zero weight.
    from glass_fast.steering.potentials import PotentialState
    score0 = torch.tensor([[0.3, float("nan"), -0.2, float("inf")]], dtype=torch.float64)
    state = PotentialState(kind, score0, final_correction)
    log_w = state.step(torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64))
    log_w = log_w + state.final(torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64))
    assert torch.isneginf(log_w[0, 1:4:2]).all() and torch.isfinite(log_w[0, 0:4:2]).all()
    assert int(state.bad) == 2


# ------------------------------------------------------------------------------------------ value estimates
def test_non_finite_model_output_in_value_draws_is_named_as_such():
    # It was reported as "transition 0 (t=0.2000 -> 1.0000)", which in fk_steering is another transition.
    def net(x, t):
        return torch.where(t[:, None] > 0.5, torch.full_like(x, float("nan")), -x)

    m = gf.FlowModel(net, SCH, "velocity")
    msg = r"at the value estimate's posterior draws \(t=0.2000 -> 1\), stage \d+ \(model time 0.5"
    with pytest.raises(FloatingPointError, match=msg):
        gf.fk_steering(m, lambda z: z[:, 0], torch.randn(2, 2, 2), potential="value")
    with pytest.raises(FloatingPointError, match=msg.replace("0.2000", "0.3000")):
        gf.value_estimate(m, lambda z: z[:, 0], torch.randn(4, 2), 0.3)


@pytest.mark.parametrize("bad,got", [(lambda d: d[:, :1], r"shape \(4, 1\)"), (lambda d: d[:2], r"shape \(2, 2\)"),
                                     (lambda d: d.tolist(), "list")])
def test_value_estimate_names_a_wrong_denoised_by_the_callers_shapes(mixture, bad, got):
    # It was checked after the per-draw repeat: "x's shape (32, 2) ... got shape (32, 1)" for x [4, 2].
    m = mixture.flow_model(SCH, "velocity")
    x = torch.randn(4, 2)
    d = m.denoise(x, 0.3)
    with pytest.raises(ValueError, match=r"denoised must be None or D_t\(x\), a Tensor of x's shape \(4, 2\), got "
                                         + got):
        gf.value_estimate(m, lambda z: z[:, 0], x, 0.3, denoised=bad(d))


# ---------------------------------------------------------------------------------- velocity at sigma = 0
@pytest.mark.parametrize("prediction", ["x0", "epsilon"])
@pytest.mark.parametrize("t", [1.0, torch.tensor([0.5, 1.0, 0.2])], ids=["float", "tensor"])
@pytest.mark.parametrize("sch", [gf.LinearSchedule(), gf.CosineSchedule(), gf.VPSchedule()], ids=repr)
def test_velocity_where_it_is_singular_is_refused(mixture, sch, prediction, t):
    # u = (sigma'/sigma) x + ... at sigma = 0: it came back as Inf / NaN, as if the network had returned them.
    m = mixture.flow_model(sch, prediction)
    with pytest.raises(ValueError, match=rf"FlowModel.velocity: the velocity of a model with prediction='{prediction}' "
                                         r"is singular at t=1 \(alpha_t=1, sigma_t=0: .* evaluate it where sigma_t > 0"):
        m.velocity(torch.randn(3, 2), t)
    assert m.calls == 0
    u = m.velocity(torch.randn(3, 2), 1 - 1e-3)      # finite just inside
    assert bool(torch.isfinite(u).all())
    assert bool(torch.isfinite(mixture.flow_model(sch, "velocity").velocity(torch.randn(3, 2), t)).all())


# ------------------------------------------------------------------------------ reversed-time networks
@pytest.mark.parametrize("prediction", ["velocity", "x0", "epsilon"])
def test_reversed_time_recipe_of_the_docstring(mixture, prediction):
    # A network in the sigma = 1 - t convention (x = (1 - sigma) z + sigma eps), built from the closed form:
    # wrapped as FlowModel's docstring says, its denoiser is the mixture's; unwrapped it is not.
    def net(x, sigma):
        s = sigma.double()[:, None]
        z = mixture.denoise(x.double(), 1 - sigma.double(), SCH)
        eps = (x.double() - (1 - s) * z) / s
        return {"velocity": eps - z, "x0": z, "epsilon": eps}[prediction].to(x.dtype)   # d x / d sigma

    sign = -1.0 if prediction == "velocity" else 1.0
    wrapped = gf.FlowModel(lambda x, t: sign * net(x, 1 - t), SCH, prediction)
    naive = gf.FlowModel(net, SCH, prediction)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for t in (0.2, 0.5, 0.8):
        want = mixture.denoise(x, t, SCH)
        torch.testing.assert_close(wrapped.denoise(x, t), want, rtol=1e-5, atol=1e-5)
        if t != 0.5:   # where 1 - t = t the time does not tell the conventions apart
            assert float((naive.denoise(x, t) - want).abs().max()) > 0.1


# ----------------------------------------------------------------------------------------- network outputs
@pytest.mark.parametrize("max_batch", [None, 2])
@pytest.mark.parametrize("fn,got", [(lambda x, t: (-x,), "tuple"), (lambda x, t: {"sample": -x}, "dict"),
                                    (lambda x, t: None, "NoneType")])
def test_network_returning_a_container_is_named_with_or_without_chunks(fn, got, max_batch):
    # With max_batch, torch.cat raised "expected Tensor as element 0 in argument 0" first.
    m = gf.FlowModel(fn, SCH, max_batch=max_batch)
    with pytest.raises(TypeError, match=f"model output must be a Tensor, got {got}"):
        m(torch.randn(5, 2), torch.rand(5))


@pytest.mark.parametrize("detach", [True, False])
def test_guidance_under_inference_mode_names_it_not_the_reward(mixture, detach):
    # The reward was blamed: "the reward's output has no gradient with respect to its input".
    model = mixture.flow_model(SCH, "velocity")
    g = RewardGuidance(lambda z: z[:, 0], 1.0, detach=detach)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match=r"RewardGuidance differentiates the reward: run the sampler outside "
                                               r"torch.inference_mode \(torch.no_grad is fine\)"):
            gf.sample(model, torch.randn(4, 2), guidance=g)
        with pytest.raises(RuntimeError, match="outside torch.inference_mode"):
            gf.fk_steering(model, lambda z: z[:, 0], torch.randn(1, 4, 2), guidance=g)
    with torch.no_grad():
        assert bool(torch.isfinite(gf.sample(model, torch.randn(4, 2), guidance=g)).all())


def test_guidance_window_edges_hold_at_rounded_grid_times():
    """A window edge given as a grid time counts although the float64 grid rounds it (0.6000000000000001)."""
    g = gf.RewardGuidance(lambda x: x.sum(-1), scale=1.0, window=(0.2, 0.6))
    t = torch.tensor([3 * 0.2], dtype=torch.float64)   # 0.6000000000000001
    assert float(t) != 0.6 and g.active(t)
    assert not g.active(torch.tensor([0.61], dtype=torch.float64))
