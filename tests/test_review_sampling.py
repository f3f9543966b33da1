"""The sampling loop's hooks and checks: what a callback may do, where a non-finite prediction is reported,
which state dtypes a Sampler accepts."""
import pytest
import torch

import glass_fast as gf
from glass_fast.transitions import FiniteGuard


def _exact(mixture):
    return mixture.flow_model(gf.LinearSchedule(), "x0")


def _noise(n=8):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["glass", "ode", "sde", "plugin"])
def test_callback_editing_the_state_in_place_is_refused_and_x0_is_its_own(mixture, method):
    # x is the state the transition starts from: editing it would change the sample silently. x0 is a
    # conversion of the first call's output, not the output handed on: a preview may rescale it in place.
    def edit_x(k, t, x, x0):
        if k == 2:
            x.mul_(0.5)

    def edit_x0(k, t, x, x0):
        x0.mul_(0.5).add_(0.5)

    model, kw = _exact(mixture), dict(method=method, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match=r"callback modified x in place at grid index 2 \(t=0\.4000\)"):
        gf.sample(model, _noise(), callback=edit_x, **kw)
    plain = gf.sample(model, _noise(), method=method, generator=torch.Generator().manual_seed(1))
    assert torch.equal(gf.sample(model, _noise(), callback=edit_x0, method=method,
                                 generator=torch.Generator().manual_seed(1)), plain)


def test_callback_reading_and_copying_keeps_the_run(mixture):
    m, noise = _exact(mixture), _noise()
    plain = gf.sample(m, noise, generator=torch.Generator().manual_seed(1))
    kept = []
    watched = gf.sample(m, noise, generator=torch.Generator().manual_seed(1),
                        callback=lambda k, t, x, x0: kept.append((x.clone(), (x0 * 0.5 + 0.5).clamp(0, 1))))
    assert torch.equal(watched, plain) and len(kept) == 5
    # Noise made under inference_mode has no version counter: watching it still runs, and equals the rest.
    with torch.inference_mode():
        frozen = noise.clone()
    assert torch.equal(gf.sample(m, frozen, generator=torch.Generator().manual_seed(1),
                                 callback=lambda *a: None), plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prediction", ["velocity", "epsilon", "score"])
@pytest.mark.parametrize("method,solver", [("glass", "midpoint"), ("ode", "heun"), ("sde", "euler"),
                                           ("plugin", "euler")])
def test_watching_leaves_the_samples_bit_for_bit(mixture, dtype, prediction, method, solver):
    # The callback's prediction is the transition's first model call, handed on as the raw output: the
    # transition runs as if it had made the call. Handed on as D_t(x) rounded to a bfloat16 state, 5% of
    # the velocity model's samples moved (up to 0.27).
    m = mixture.flow_model(gf.VPSchedule(), prediction)
    noise = torch.randn(512, 2, generator=torch.Generator().manual_seed(0)).to(dtype)
    kw = dict(method=method, solver=solver, transitions=4, inner_steps=4, grid=[0.02, 0.3, 0.6, 0.8, 0.97])
    plain = gf.sample(m, noise, generator=torch.Generator().manual_seed(1), **kw)
    calls = m.calls
    watched = gf.sample(m, noise, generator=torch.Generator().manual_seed(1), callback=lambda *a: None, **kw)
    assert torch.equal(watched, plain) and m.calls == 2 * calls


def test_watching_a_guided_run_leaves_it_bit_for_bit(mixture):
    m = mixture.flow_model(gf.LinearSchedule(), "velocity")
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    kw = dict(transitions=4, inner_steps=3, guidance=gf.RewardGuidance(lambda x: x[:, 0], scale=0.5,
                                                                       window=(0.0, 1.0)))
    plain = gf.sample(m, noise, generator=torch.Generator().manual_seed(1), **kw)
    watched = gf.sample(m, noise, generator=torch.Generator().manual_seed(1), callback=lambda *a: None, **kw)
    assert torch.equal(watched, plain)


@pytest.mark.parametrize("guided", [False, True])
def test_a_step_handed_its_predicted_first_call_equals_the_plain_step(mixture, guided):
    m = mixture.flow_model(gf.LinearSchedule(), "velocity")
    s = gf.Sampler(m, transitions=3, inner_steps=4, solver="midpoint", dtype=torch.bfloat16)
    g = gf.RewardGuidance(lambda x: x[:, 0], scale=0.5, window=(0.0, 1.0)) if guided else None
    x = _noise(64).to(torch.bfloat16)
    for k in range(s.transitions):
        plain = s.step(k, x, generator=torch.Generator().manual_seed(k), guidance=g)
        expected = m.denoise(x, float(s.grid[k]))
        calls = m.calls
        out, x0 = s.predict(k, x)
        assert out.dtype == torch.bfloat16 and torch.equal(x0, expected)
        handed = s.step(k, x, generator=torch.Generator().manual_seed(k), guidance=g, first_output=out)
        assert torch.equal(handed, plain) and m.calls - calls == 1 + 3   # predict + the 3 calls left
        x = plain


def test_a_handed_first_output_is_checked(mixture):
    m = mixture.flow_model(gf.LinearSchedule(), "velocity")
    s = gf.Sampler(m, transitions=2, inner_steps=2)
    x = _noise()
    out, x0 = s.predict(0, x)
    with pytest.raises(ValueError, match="give at most one of denoised and first_output"):
        s.step(0, x, denoised=x0, first_output=out)
    with pytest.raises(ValueError, match=r"k must be a transition index in \[0, 2\), got 2"):
        s.predict(2, x)
    with pytest.raises(ValueError, match=r"x is torch.float64 on cpu but this Sampler was planned for torch.float32"):
        s.predict(0, x.double())
    for bad in (out[:4], out.double(), out.tolist()):
        with pytest.raises(ValueError, match=r"first_output must be the network's output for x \(\(8, 2\) "
                                             r"torch.float32 on cpu; Sampler.predict gives it\), got"):
            s.step(0, x, first_output=bad)


def test_non_finite_callback_prediction_names_its_transition_and_stage(mixture):
    exact = _exact(mixture)

    def fn(x, t):   # NaN only at t = 0.47, the start of transition 1 of the grid below
        out = exact.fn(x, t)
        return torch.where(((t - 0.47).abs() < 1e-6)[:, None], torch.nan, out)

    m = gf.FlowModel(fn, gf.LinearSchedule(), "x0")
    with pytest.raises(FloatingPointError, match=r"x0-prediction for callback, the model's output at transition 1 "
                                                 r"\(t=0\.4700 -> 1\.0000\), stage 0 .* holds NaN or Inf"):
        gf.sample(m, _noise(), method="ode", grid=[0.0, 0.47, 1.0], callback=lambda *a: None)


def test_sampler_refuses_a_state_dtype_no_op_takes(mixture):
    with pytest.raises(ValueError, match=r"dtype must be a floating torch.dtype .*float32, float64, float16 or "
                                         r"bfloat16, got torch.float8_e4m3fn"):
        gf.Sampler(_exact(mixture), dtype=torch.float8_e4m3fn)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        assert gf.Sampler(_exact(mixture), dtype=dtype).dtype == dtype


def _huge(dtype=torch.float32):
    """A finite model whose predictions lie beyond float16's range (65504)."""
    return gf.FlowModel(lambda x, t: torch.full(x.shape, 1e5, dtype=dtype, device=x.device),
                        gf.LinearSchedule(), "x0", dtype=dtype)


@pytest.mark.parametrize("method", ["glass", "ode", "sde", "plugin"])
def test_a_half_state_overflowing_is_reported_not_returned(method):
    # The model's outputs are all finite; the float16 state, rounded back from float32, overflows. That
    # was returned as Inf / NaN samples without an error.
    noise = _noise().half()
    with pytest.raises(FloatingPointError, match=r"the state became NaN or Inf in transition \d \(t=.*float16's range"):
        gf.sample(_huge(), noise, method=method, generator=torch.Generator().manual_seed(1))
    sampler = gf.Sampler(_huge(), method=method, dtype=torch.float16)
    guard, x = FiniteGuard(noise.device), noise
    for k in range(sampler.transitions):
        x = sampler.step(k, x, guard=guard, generator=torch.Generator().manual_seed(1))
    assert not bool(torch.isfinite(x).all())
    with pytest.raises(FloatingPointError, match="the state became NaN or Inf"):
        guard.raise_if_bad()
    # In float32 the same run is finite and passes.
    assert bool(torch.isfinite(gf.sample(_huge(), noise.float(), method=method,
                                         generator=torch.Generator().manual_seed(1))).all())


def test_a_single_transition_overflowing_is_reported():
    x = _noise().half()
    for run in (lambda: gf.glass_transition(_huge(), x, 0.8, 1.0),
                lambda: gf.ode_transition(_huge(), x, 0.8, 1.0),
                lambda: gf.sde_transition(_huge(), x, 0.8, 1.0),
                lambda: gf.plugin_transition(_huge(), x, 0.8, 1.0)):
        with pytest.raises(FloatingPointError, match=r"the state became NaN or Inf in \w+ transition .*float16"):
            run()


def test_a_model_nan_is_still_named_before_the_state_it_spoils(mixture):
    exact = _exact(mixture)

    def fn(x, t):
        out = exact.fn(x, t)
        return torch.where((t > 0.45)[:, None], torch.nan, out)

    with pytest.raises(FloatingPointError, match=r"the model returned NaN or Inf at transition 2 .*stage"):
        gf.sample(gf.FlowModel(fn, gf.LinearSchedule(), "x0"), _noise(), method="ode")
