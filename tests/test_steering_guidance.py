"""Reward guidance: the exact denoiser shift, the window, gradients through the network, use in FK steering."""
import math

import pytest
import torch

import glass_fast as gf
from glass_fast.model import denoiser_coefficients
from glass_fast.steering import RewardGuidance, fk_steering

SCH = gf.LinearSchedule()
B_VEC = torch.tensor([0.8, -0.6], dtype=torch.float64)
C = torch.tensor([1.0, 2.0], dtype=torch.float64)


def linear_reward(x):
    return x @ B_VEC.to(x.dtype)


def quadratic_reward(x):
    return -0.5 * ((x - C.to(x.dtype)) ** 2).sum(-1)


def _times(t):
    t_host = torch.as_tensor(t, dtype=torch.float64)
    return t_host.to(torch.float32), t_host


def _denoised(model, y, t_host, out):
    a_x, a_o = denoiser_coefficients(model.schedule, model.prediction, t_host)
    a_x, a_o = torch.as_tensor(a_x), torch.as_tensor(a_o)
    if a_x.dim():
        a_x, a_o = a_x[:, None], a_o[:, None]
    return a_x * y + a_o * out


@pytest.mark.parametrize("prediction", ["x0", "velocity", "epsilon"])
@pytest.mark.parametrize("reward,grad", [(linear_reward, lambda d: B_VEC.expand_as(d)),
                                         (quadratic_reward, lambda d: C - d)])
def test_hook_shifts_the_denoiser_exactly(mixture, prediction, reward, grad):
    model = mixture.flow_model(SCH, prediction)
    y = torch.randn(6, 2, dtype=torch.float64)
    t = 0.4
    t_dev, t_host = _times(t)
    out = model(y, t_dev)
    g = RewardGuidance(reward, scale=0.5, window=(0.2, 0.7))
    d, d_guided = _denoised(model, y, t_host, out), _denoised(model, y, t_host, g(model, y, t_dev, t_host, out))
    coef = 0.5 * SCH.sigma(t) ** 2 / SCH.alpha(t)
    torch.testing.assert_close(d_guided, d + coef * grad(d))
    torch.testing.assert_close(g.shift(model, y, t_dev, t_host, d), d + coef * grad(d))


def test_window_is_on_model_time(mixture):
    model = mixture.flow_model(SCH, "velocity")
    y = torch.randn(4, 2, dtype=torch.float64)
    g = RewardGuidance(linear_reward, scale=1.0, window=(0.2, 0.7))
    for t in (0.1, 0.75):
        t_dev, t_host = _times(t)
        out = model(y, t_dev)
        assert g(model, y, t_dev, t_host, out) is out
    # per-sample times straddling the window: only rows inside are shifted
    t_dev, t_host = _times([0.1, 0.3, 0.5, 0.9])
    out = model(y, t_dev)
    shifted = _denoised(model, y, t_host, g(model, y, t_dev, t_host, out)) - _denoised(model, y, t_host, out)
    coef = SCH.sigma(t_host) ** 2 / SCH.alpha(t_host) * torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(shifted, coef[:, None] * B_VEC.expand(4, 2))


def test_gradient_through_the_network():
    # D(y) = 0.5 y: grad_y r(D(y)) = 0.5 b through the network, b when detached.
    calls = []

    def net(x, t):
        calls.append(1)
        return 0.5 * x

    model = gf.FlowModel(net, SCH, "x0")
    y = torch.randn(3, 2, dtype=torch.float64)
    t_dev, t_host = _times(0.5)
    out = model(y, t_dev)
    coef = SCH.sigma(0.5) ** 2 / SCH.alpha(0.5)
    through = RewardGuidance(linear_reward, 1.0, detach=False)(model, y, t_dev, t_host, out)
    detached = RewardGuidance(linear_reward, 1.0, detach=True)(model, y, t_dev, t_host, out)
    torch.testing.assert_close(through - out, coef * 0.5 * B_VEC.expand(3, 2))
    torch.testing.assert_close(detached - out, coef * B_VEC.expand(3, 2))
    assert len(calls) == 1 + 1                   # only the non-detached form re-runs the network


def test_guidance_raises_the_reward_of_plain_sampling(mixture):
    model = mixture.flow_model(SCH, "velocity")
    noise = torch.randn(300, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plain = linear_reward(gf.sample(model, noise, method="ode"))
    guided = linear_reward(gf.sample(model, noise, method="ode", guidance=RewardGuidance(linear_reward, 1.0)))
    # ODE from the same noise: a particle-wise push along b. The mean gain is many standard errors.
    gain = guided - plain
    assert float(gain.mean()) > 5 * float(gain.std()) / math.sqrt(gain.numel())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("detach", [True, False])
def test_fk_applies_guidance_to_the_reused_call(mixture, detach, dtype):
    # lmbda = 0, no resampling: FK with guidance must equal guided sampling bit for bit, including the first
    # stage of every transition, whose model call FK makes ahead for its scores and hands on.
    model = mixture.flow_model(SCH, "velocity" if dtype == torch.bfloat16 else "x0")
    g = RewardGuidance(quadratic_reward, 0.3, window=(0.0, 0.7), detach=detach)
    noise = torch.randn(2, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(dtype)
    res = fk_steering(model, linear_reward, noise, lmbda=0.0, ess_threshold=0.0, guidance=g,
                      generator=torch.Generator().manual_seed(4))
    ref = gf.sample(model, noise.reshape(8, 2), guidance=g, generator=torch.Generator().manual_seed(4))
    assert torch.equal(res.samples.reshape(8, 2), ref)
    if detach:
        assert res.nfe == 50


def test_fk_with_a_generic_hook(mixture):
    model = mixture.flow_model(SCH, "velocity")

    def hook(model, y, t_dev, t_host, out):
        return out + 0.05

    noise = torch.randn(1, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    res = fk_steering(model, linear_reward, noise, lmbda=0.0, ess_threshold=0.0, guidance=hook,
                      generator=torch.Generator().manual_seed(4))
    ref = gf.sample(model, noise.reshape(4, 2), guidance=hook, generator=torch.Generator().manual_seed(4))
    assert torch.equal(res.samples.reshape(4, 2), ref)


def test_bad_guidance_arguments():
    with pytest.raises(ValueError, match="scale must be a finite number"):
        RewardGuidance(linear_reward, math.nan)
    with pytest.raises(ValueError, match="window must satisfy"):
        RewardGuidance(linear_reward, 1.0, window=(0.8, 0.2))
    with pytest.raises(TypeError, match="reward must be callable"):
        RewardGuidance(3.0, 1.0)


def test_non_differentiable_reward_is_named(mixture):
    model = mixture.flow_model(SCH, "velocity")
    for reward in (lambda x: (x[:, 0] > 0).to(x.dtype), lambda x: x[:, 0].detach()):
        g = RewardGuidance(reward, 1.0)
        with pytest.raises(TypeError, match="RewardGuidance: the reward's output has no gradient with respect to its input"):
            gf.sample(model, torch.randn(4, 2), guidance=g)
    with pytest.raises(ValueError, match="detach must be True or False, got 'no'"):
        RewardGuidance(linear_reward, 1.0, detach="no")
