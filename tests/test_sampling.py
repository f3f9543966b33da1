"""Full generation from noise, call accounting, bad input and non-finite model outputs."""
import pytest
import torch

import glass_fast as gf
from glass_fast.mixtures import ks_critical, ks_statistic, mixture_cdf

U = torch.tensor([0.6, 0.8], dtype=torch.float64)


class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


@pytest.mark.parametrize("method,solver,rho", [("glass", "euler", 0.4), ("glass", "midpoint", "ddpm"),
                                               ("glass", "heun", 0.9), ("ode", "euler", None), ("sde", "euler", None)])
def test_generation_reaches_the_data(mixture, method, solver, rho):
    n = 4000
    m = mixture.flow_model(gf.LinearSchedule(), "velocity")
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    x = gf.sample(m, noise, method=method, transitions=5, inner_steps=20, rho=rho, solver=solver,
                  generator=torch.Generator().manual_seed(2))
    W, M, V = mixture.marginal_law(gf.LinearSchedule(), 1.0)
    assert ks_statistic(x.double() @ U, lambda y: mixture_cdf(y, W, M, V, U)) < ks_critical(n, 0.001)


def test_plugin_sampler_with_ddpm_rho_reaches_the_data(mixture):
    """The one-step plug-in kernel with rho_DDPM is DDPM ancestral sampling: consistent as the grid refines
    (a constant rho is not: the kernel re-noises a fixed fraction at every step whatever its size)."""
    n = 4000
    m = mixture.flow_model(gf.LinearSchedule(), "velocity")
    W, M, V = mixture.marginal_law(gf.LinearSchedule(), 1.0)
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    directions = [U, torch.tensor([1.0, 0.0], dtype=torch.float64)]

    def ks(transitions):
        x = gf.sample(m, noise, method="plugin", transitions=transitions, rho="ddpm",
                      generator=torch.Generator().manual_seed(2)).double()
        return max(ks_statistic(x @ u, lambda y, u=u: mixture_cdf(y, W, M, V, u)) for u in directions)
    assert ks(100) < ks_critical(n, 0.001 / len(directions))
    assert ks(5) > ks_critical(n, 0.001)            # the statistic sees a coarse grid's error at this size


@pytest.mark.parametrize("method", ["glass", "ode", "sde"])
def test_a_grid_may_start_from_a_partly_noised_state_and_stop_early(mixture, method):
    """From exact draws of x_0.4 (t z + (1 - t) eps), grid [0.4, 0.7] gives the exact marginal at 0.7 and
    grid [0.4, 0.7, 1.0] the data (the image-to-image and partial-run cases)."""
    n = 4000
    sch = gf.LinearSchedule()
    m = mixture.flow_model(sch, "velocity")
    x_start = mixture.marginal_sample(sch, 0.4, n, generator=torch.Generator().manual_seed(3)).float()
    for times, end in (([0.4, 0.7], 0.7), ([0.4, 0.7, 1.0], 1.0)):
        sampler = gf.Sampler(m, method=method, inner_steps=20, grid=times)
        x = sampler.run(x_start, generator=torch.Generator().manual_seed(4))
        W, M, V = mixture.marginal_law(sch, end)
        assert ks_statistic(x.double() @ U, lambda y: mixture_cdf(y, W, M, V, U)) < ks_critical(n, 0.001)


@pytest.mark.parametrize("grid,match", [([0.5], "at least two times"), ([[0.0, 1.0]], "1-D"),
                                        ([0.0, float("nan"), 1.0], "finite, strictly increasing"),
                                        ([0.0, 0.6, 0.5, 1.0], "finite, strictly increasing"),
                                        ([-0.1, 0.5, 1.0], r"in \[0, 1\]"), ([0.0, 0.5, 1.2], r"in \[0, 1\]"),
                                        ("0 0.5 1", "sequence or Tensor of times")])
def test_bad_grids_are_named(model, grid, match):
    with pytest.raises(ValueError, match=match):
        gf.Sampler(model, grid=grid)


def test_transitions_and_grid_must_agree(model):
    """A grid sets the number of transitions: the same count is accepted, a different one refused everywhere
    (it used to be ignored), and transitions alone defaults to 5."""
    grid = [0.0, 0.3, 0.7, 1.0]
    assert gf.Sampler(model, transitions=3, grid=grid).transitions == 3
    assert gf.Sampler(model).transitions == 5
    noise = torch.randn(2, 4, 2, generator=torch.Generator().manual_seed(0))
    reward = lambda x: x[:, 0]  # noqa: E731
    calls = {"Sampler": lambda: gf.Sampler(model, transitions=5, grid=grid),
             "sample": lambda: gf.sample(model, noise[0], transitions=5, grid=grid),
             "fk_steering": lambda: gf.fk_steering(model, reward, noise, transitions=5, grid=grid),
             "FKSteering": lambda: gf.FKSteering(model, reward, transitions=5, grid=grid),
             "best_of_n": lambda: gf.best_of_n(model, reward, noise, transitions=5, grid=grid),
             "beam_search": lambda: gf.beam_search(model, reward, noise, transitions=5, grid=grid)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match="transitions=5 disagrees with grid, which has 3 transitions"):
            call()
            pytest.fail(f"{name} accepted transitions=5 with a 3-transition grid")


def test_a_grid_may_be_a_list(model):
    kw = dict(generator=torch.Generator().manual_seed(0))
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    from_list = gf.Sampler(model, grid=[0.0, 0.3, 1.0]).run(noise, **kw)
    kw = dict(generator=torch.Generator().manual_seed(0))
    from_tensor = gf.Sampler(model, grid=torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)).run(noise, **kw)
    torch.testing.assert_close(from_list, from_tensor, rtol=0, atol=0)
    through_sample = gf.sample(model, noise, grid=[0.0, 0.3, 1.0], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(through_sample, from_list, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("sch", [gf.LinearSchedule(), gf.CosineSchedule(), gf.VPSchedule()], ids=repr)
@pytest.mark.parametrize("method", ["glass", "ode", "sde"])
def test_generation_reaches_the_data_large(mixture, sch, method):
    n = 20000
    m = mixture.flow_model(sch, "velocity")
    # VP starts at alpha_0 > 0: draw the start from the exact p_0 instead of N(0, I).
    noise = mixture.marginal_sample(sch, 0.0, n, torch.Generator().manual_seed(1)).float()
    x = gf.sample(m, noise, method=method, transitions=5, inner_steps=40, solver="midpoint" if method != "sde" else "euler",
                  generator=torch.Generator().manual_seed(2))
    W, M, V = mixture.marginal_law(sch, 1.0)
    for u in (U, torch.tensor([1.0, 0.0], dtype=torch.float64)):
        assert ks_statistic(x.double() @ u, lambda y: mixture_cdf(y, W, M, V, u)) < ks_critical(n, 0.0005)


@pytest.mark.parametrize("method,solver,calls", [("glass", "euler", 30), ("glass", "midpoint", 30), ("ode", "heun", 30),
                                                 ("sde", "euler", 30), ("plugin", "euler", 3)])
def test_every_method_spends_transitions_times_inner_steps_calls(mixture, method, solver, calls):
    exact = mixture.flow_model(gf.LinearSchedule(), "velocity")
    fn = Counting(exact.fn)
    m = gf.FlowModel(fn, gf.LinearSchedule(), "velocity")
    gf.sample(m, torch.randn(8, 2), method=method, transitions=3, inner_steps=10, solver=solver)
    assert fn.calls == calls == m.calls


@pytest.mark.parametrize("method", ["glass", "sde", "ode"])
def test_image_shaped_states(method):
    # Any trailing shape: a [B, C, H, W] state through a per-pixel model gives, element by element, what the
    # same state flattened to [B, C*H*W] gives (the noise is drawn in the same order).
    def per_pixel(x, t):
        return -x * t.view((-1,) + (1,) * (x.dim() - 1))
    m = gf.FlowModel(per_pixel, gf.LinearSchedule(), "x0")
    noise = torch.randn(3, 2, 5, 7, generator=torch.Generator().manual_seed(1))
    kw = dict(method=method, transitions=2, inner_steps=3)
    x = gf.sample(m, noise, generator=torch.Generator().manual_seed(0), **kw)
    flat = gf.sample(m, noise.reshape(3, -1), generator=torch.Generator().manual_seed(0), **kw)
    assert x.shape == (3, 2, 5, 7)
    torch.testing.assert_close(x.reshape(3, -1), flat, rtol=0, atol=0)
    assert not torch.allclose(x, noise)                  # the state moved
    # Per-sample times: each row's coefficients must broadcast over all of its trailing dims.
    t, tn = torch.tensor([0.1, 0.3, 0.5], dtype=torch.float64), torch.tensor([0.4, 0.6, 1.0], dtype=torch.float64)
    y = gf.glass_transition(m, noise, t, tn, inner_steps=4, solver="heun", generator=torch.Generator().manual_seed(2))
    y_flat = gf.glass_transition(m, noise.reshape(3, -1), t, tn, inner_steps=4, solver="heun",
                                 generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(y.reshape(3, -1), y_flat, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def model(mixture):
    return mixture.flow_model(gf.LinearSchedule(), "velocity")


@pytest.mark.parametrize("kwargs,match", [
    (dict(t=0.5, t_next=0.5), "t_next must be greater than t"),
    (dict(t=0.6, t_next=0.2), "t_next must be greater than t"),
    (dict(t=-0.1, t_next=0.2), r"t must lie in \[0, 1\]"),
    (dict(t=0.1, t_next=1.2), r"t_next must lie in \[0, 1\]"),
    (dict(rho=1.5), r"rho must lie in \[-1, 1\]"),
    (dict(rho="cosine"), "rho must be a float"),
    (dict(inner_steps=0), "inner_steps must be an integer >= 1"),
    (dict(solver="rk4"), "solver must be one of"),
    (dict(solver="midpoint", inner_steps=5), "multiple of 2"),
])
def test_glass_bad_arguments(model, kwargs, match):
    args = dict(t=0.2, t_next=0.5) | kwargs
    t, tn = args.pop("t"), args.pop("t_next")
    with pytest.raises(ValueError, match=match):
        gf.glass_transition(model, torch.zeros(4, 2), t, tn, **args)


def test_unknown_method_and_prediction(model):
    with pytest.raises(ValueError, match="method must be one of"):
        gf.sample(model, torch.zeros(4, 2), method="ddim")
    with pytest.raises(ValueError, match="prediction must be one of"):
        gf.FlowModel(lambda x, t: x, gf.LinearSchedule(), prediction="v")


def test_bad_model_state_or_generator_types_are_named(model):
    with pytest.raises(TypeError, match="model must be a glass_fast.FlowModel, got function"):
        gf.sample(lambda x, t: x, torch.zeros(4, 2))
    with pytest.raises(TypeError, match="noise must be a floating Tensor\\[B, ...\\], got list"):
        gf.sample(model, [[0.0, 0.0]])
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        gf.sample(model, torch.zeros(4, 2), generator=0)


def test_wrong_model_output_shape_or_dtype():
    bad_shape = gf.FlowModel(lambda x, t: x[:, :1], gf.LinearSchedule())
    with pytest.raises(ValueError, match=r"model output has shape \(4, 1\), expected .*\(4, 2\)"):
        gf.sample(bad_shape, torch.zeros(4, 2))
    bad_dtype = gf.FlowModel(lambda x, t: x.double(), gf.LinearSchedule())
    with pytest.raises(TypeError, match="model output has dtype torch.float64"):
        gf.sample(bad_dtype, torch.zeros(4, 2))


def in_place_network(x, t):
    return x.mul_(0.5)   # returns a tensor of the right shape: without the check the run would go on, corrupted


@pytest.mark.parametrize("max_batch", [None, 3])
@pytest.mark.parametrize("run", ["sample", "fk_steering", "denoise"])
def test_a_network_that_edits_its_input_in_place_is_refused(run, max_batch):
    m = gf.FlowModel(in_place_network, gf.LinearSchedule(), max_batch=max_batch)
    with pytest.raises(RuntimeError, match="the network modified its input x in place"):
        if run == "sample":
            gf.sample(m, torch.randn(8, 2), transitions=2, inner_steps=2)
        elif run == "fk_steering":
            gf.fk_steering(m, lambda z: z[:, 0], torch.randn(2, 4, 2), transitions=2, inner_steps=2)
        else:
            m.denoise(torch.randn(8, 2), 0.5)


def test_a_network_that_edits_a_copy_of_its_input_is_fine():
    m = gf.FlowModel(lambda x, t: in_place_network(x.clone(), t), gf.LinearSchedule())
    x = torch.randn(8, 2)
    assert torch.equal(m(x, torch.tensor(0.5)), x * 0.5)
    with torch.inference_mode():   # inference tensors have no version counter: nothing to check, no error
        assert torch.equal(m(x, torch.tensor(0.5)), x * 0.5)
    # A network running in another dtype gets a converted copy of the state: its own to edit.
    converted = gf.FlowModel(in_place_network, gf.LinearSchedule(), dtype=torch.float64)
    assert torch.equal(converted(x, torch.tensor(0.5)), (x * 0.5).double())


@pytest.mark.parametrize("shape", [(0, 2), (3, 0)])
def test_empty_states_are_named_before_any_model_call(model, shape):
    with pytest.raises(ValueError, match=rf"noise must hold at least one state .* got shape \({shape[0]}, {shape[1]}\)"):
        gf.sample(model, torch.zeros(shape))
    with pytest.raises(ValueError, match="noise must hold (at least one state|B >= 1 groups of K >= 1)"):
        gf.fk_steering(model, lambda z: z[:, 0], torch.zeros((1,) + shape))
    with pytest.raises(ValueError, match="x must hold at least one state"):
        gf.glass_transition(model, torch.zeros(shape), 0.1, 0.2)


def test_sampler_steps_are_checked_against_the_plan(model):
    sampler = gf.Sampler(model, transitions=3, inner_steps=2)          # planned for float32 on the CPU
    x = torch.zeros(4, 2)
    for k in (-1, 3, 1.0, True):
        with pytest.raises(ValueError, match=r"k must be a transition index in \[0, 3\)"):
            sampler.step(k, x)
    with pytest.raises(ValueError, match="x is torch.float64 on cpu but this Sampler was planned for torch.float32"):
        sampler.run(x.double())
    with pytest.raises(ValueError, match="x is torch.float32 on meta but this Sampler was planned for"):
        sampler.step(0, torch.zeros(4, 2, device="meta"))
    # Reduced precision shares float32 coefficients: allowed.
    assert sampler.step(0, x.bfloat16()).dtype == torch.bfloat16


def test_generator_on_another_device(model):
    # Only CPU generators exist on this machine: put the state on another device instead.
    with pytest.raises(ValueError, match="generator is on cpu but x is on meta"):
        gf.glass_transition(model, torch.zeros(4, 2, device="meta"), 0.1, 0.2, generator=torch.Generator())


def test_nan_is_reported_with_transition_and_stage(mixture):
    exact = mixture.flow_model(gf.LinearSchedule(), "velocity")
    def poisoned(x, t):
        out = exact.fn(x, t)
        return out.masked_fill(t.view(-1, 1) > 0.52, float("nan"))
    m = gf.FlowModel(poisoned, gf.LinearSchedule(), "velocity")
    with pytest.raises(FloatingPointError, match=r"transition 2 \(t=0\.4000 -> 0\.6000\), stage 3 \(model time 0\.5500"):
        gf.sample(m, torch.randn(4, 2), method="ode", transitions=5, inner_steps=4)
    with pytest.raises(FloatingPointError, match="glass transition"):
        gf.glass_transition(m, torch.randn(4, 2), 0.5, 0.9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_all_finite_sees_every_nan_and_inf(dtype):
    from glass_fast.transitions import all_finite
    x = torch.randn(3, 7, 5).to(dtype)
    assert bool(all_finite(x)) and all_finite(x).dim() == 0
    for bad in (float("nan"), float("inf"), -float("inf")):
        for pos in ((0, 0, 0), (1, 3, 2), (2, 6, 4)):
            y = x.clone()
            y[pos] = bad
            assert not bool(all_finite(y)), (bad, pos)
    assert bool(all_finite(torch.full((4,), torch.finfo(dtype).max, dtype=dtype)))   # large but finite


@pytest.mark.parametrize("method,solver", [("glass", "euler"), ("glass", "midpoint"), ("ode", "heun"), ("sde", "euler"),
                                           ("plugin", "euler")])
def test_callback_sees_every_x0_prediction_at_no_model_calls(mixture, method, solver):
    exact = mixture.flow_model(gf.LinearSchedule(), "velocity")
    fn = Counting(exact.fn)
    m = gf.FlowModel(fn, gf.LinearSchedule(), "velocity")
    noise = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kw = dict(method=method, solver=solver, transitions=4, inner_steps=4)
    plain = gf.sample(m, noise, generator=torch.Generator().manual_seed(1), **kw)
    calls = fn.calls
    seen = []
    watched = gf.sample(m, noise, generator=torch.Generator().manual_seed(1),
                        callback=lambda k, t, x, x0: seen.append((k, t, x.clone(), x0.clone())), **kw)
    assert fn.calls - calls == calls                     # the predictions are the transitions' first calls
    assert torch.equal(watched, plain)
    assert [(k, t) for k, t, _, _ in seen] == [(k, k / 4) for k in range(4)]
    assert torch.equal(seen[0][2], noise)
    for k, t, x, x0 in seen:                             # x0 is D_t(x), the exact posterior mean here
        torch.testing.assert_close(x0, exact.denoise(x, t), rtol=1e-12, atol=1e-12)


def test_callback_with_guidance_equals_guided_sampling(mixture):
    m = mixture.flow_model(gf.LinearSchedule(), "velocity")
    noise = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g = gf.RewardGuidance(lambda x: x[:, 0], scale=0.5, window=(0.0, 1.0))
    kw = dict(transitions=4, inner_steps=4, guidance=g)
    plain = gf.sample(m, noise, generator=torch.Generator().manual_seed(1), **kw)
    watched = gf.sample(m, noise, generator=torch.Generator().manual_seed(1), callback=lambda *a: None, **kw)
    assert torch.equal(watched, plain)


# ------------------------------------------------------------------------- more bad input, named clearly
def test_non_finite_inputs_are_named_not_blamed_on_the_model(model):
    nan_noise = torch.randn(4, 2)
    nan_noise[1, 0] = float("nan")
    grouped = nan_noise.reshape(2, 2, 2)
    for run in (lambda: gf.sample(model, nan_noise), lambda: gf.Sampler(model).run(nan_noise)):
        with pytest.raises(FloatingPointError, match=r"the initial state \(noise\) holds NaN or Inf"):
            run()
    for run in (lambda: gf.fk_steering(model, lambda z: z[:, 0], grouped),
                lambda: gf.best_of_n(model, lambda z: z[:, 0], grouped),
                lambda: gf.beam_search(model, lambda z: z[:, 0], grouped, transitions=2, inner_steps=2)):
        with pytest.raises(FloatingPointError, match="noise holds NaN or Inf"):
            run()
    with pytest.raises(FloatingPointError, match="^x holds NaN or Inf"):
        gf.glass_transition(model, nan_noise, 0.1, 0.3)
    with pytest.raises(FloatingPointError, match="^denoised holds NaN or Inf"):
        gf.ode_transition(model, torch.zeros(4, 2), 0.1, 0.3, denoised=nan_noise)


def test_non_finite_guided_output_points_at_the_guidance(model):
    # The reward's gradient is NaN everywhere (sqrt of a negative number): the model is fine, the guided output
    # is not.
    g = gf.RewardGuidance(lambda z: (z[:, 0] - 1e3).sqrt(), scale=1.0, window=(0.2, 0.7))
    with pytest.raises(FloatingPointError, match="after guidance: the guidance's reward gradient may be the cause"):
        gf.sample(model, torch.randn(8, 2, generator=torch.Generator().manual_seed(0)), guidance=g)


def test_numpy_numbers_are_accepted_like_python_numbers(model):
    np = pytest.importorskip("numpy")
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    plain = gf.sample(model, noise, transitions=3, inner_steps=2, rho=0.5, sigmabar0=2.0,
                      generator=torch.Generator().manual_seed(1))
    numpy = gf.sample(model, noise, transitions=np.int64(3), inner_steps=np.int32(2), rho=np.float32(0.5),
                      sigmabar0=np.float32(2.0), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(numpy, plain, rtol=0, atol=0)
    a = gf.glass_transition(model, noise, np.float32(0.25), np.float64(0.5), generator=torch.Generator().manual_seed(1))
    b = gf.glass_transition(model, noise, 0.25, 0.5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(guidance=3), TypeError, "guidance must be None or callable"),
    (dict(callback="print"), TypeError, "callback must be None or callable"),
    (dict(cuda_graph="yes"), ValueError, "cuda_graph must be True or False"),
    (dict(solver="heun", inner_steps=3), ValueError, r"\(inner_steps\) must be a multiple of 2, got 3"),
])
def test_bad_sampling_options_are_named(model, kwargs, err, match):
    with pytest.raises(err, match=match):
        gf.sample(model, torch.zeros(4, 2), **kwargs)


def test_sampler_run_and_step_check_their_state(model):
    sampler = gf.Sampler(model, transitions=2, inner_steps=2)
    with pytest.raises(TypeError, match=r"x must be a floating Tensor\[B, ...\], got list"):
        sampler.run([[0.0, 0.0]])
    with pytest.raises(TypeError, match=r"x must be a floating Tensor\[B, ...\], got torch.int64"):
        sampler.run(torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"x must be a floating Tensor\[B, ...\], got torch.float8_e4m3fn .*allowed"):
        sampler.run(torch.zeros(4, 2).to(torch.float8_e4m3fn))   # floating, but no op takes it
    with pytest.raises(ValueError, match=r"x must hold at least one state .* got shape \(0, 2\)"):
        sampler.run(torch.zeros(0, 2))
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        sampler.step(0, torch.zeros(4, 2), generator=3)
    with pytest.raises(ValueError, match=r"denoised must have x's shape \(4, 2\) on cpu, got shape \(3, 2\)"):
        sampler.step(0, torch.zeros(4, 2), denoised=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        gf.Sampler(model, dtype=torch.int64)
    with pytest.raises(TypeError, match="model must be a glass_fast.FlowModel, got function"):
        gf.Sampler(lambda x, t: x)


def test_bad_model_definitions_and_outputs_are_named(model):
    with pytest.raises(ValueError, match=r"dtype must be None or a floating torch.dtype .*, got 'bf16'"):
        gf.FlowModel(lambda x, t: x, gf.LinearSchedule(), dtype="bf16")
    with pytest.raises(ValueError, match=r"dtype must be None or a floating torch.dtype .*, got torch.float8_e4m3fn"):
        gf.FlowModel(lambda x, t: x, gf.LinearSchedule(), dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"time_range must be None or a pair \(lo, hi\) of times, got \(0.5,\)"):
        gf.FlowModel(lambda x, t: x, gf.LinearSchedule(), time_range=(0.5,))
    wrong_device = gf.FlowModel(lambda x, t: torch.zeros(x.shape, device="meta"), gf.LinearSchedule())
    with pytest.raises(ValueError, match="model output is on meta, expected the input's device cpu"):
        gf.sample(wrong_device, torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"denoised must have x's shape \(4, 2\) on cpu, got shape \(3, 2\)"):
        gf.glass_transition(model, torch.zeros(4, 2), 0.1, 0.2, denoised=torch.zeros(3, 2))
    with pytest.raises(TypeError, match="denoised must be None or a floating Tensor shaped like x, got list"):
        gf.sde_transition(model, torch.zeros(4, 2), 0.1, 0.2, denoised=[[0.0, 0.0]])
    # A float time outside [0, 1] used to be clamped (t = 2 read as 1), NaN reached the network.
    for t in (2.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"t must be a time in \[0, 1\]"):
            model.denoise(torch.zeros(4, 2), t)


@pytest.mark.parametrize("method", ["glass", "ode", "sde", "plugin"])
def test_max_batch_counts_on_the_users_model(method):
    # The chunked copy counts on the model the caller holds, exactly as an unchunked run does.
    fn = Counting(lambda x, t: -x)
    m = gf.FlowModel(fn, gf.LinearSchedule())
    kwargs = dict(method=method, transitions=5, inner_steps=4, generator=torch.Generator().manual_seed(0))
    gf.sample(m, torch.randn(10, 2), **kwargs)
    plain = m.calls
    assert plain == fn.calls > 0
    m.calls = 0                                          # the setter resets the shared count
    gf.sample(m, torch.randn(10, 2), max_batch=4, **kwargs)
    assert m.calls == plain                              # batched calls: three chunks are one call
    assert fn.calls == plain + 3 * plain                 # the network saw 3 chunks per call
    sampler = gf.Sampler(m, max_batch=4, **{k: v for k, v in kwargs.items() if k != "generator"})
    m.calls = 0
    sampler.run(torch.randn(10, 2), generator=torch.Generator().manual_seed(0))
    assert m.calls == sampler.model.calls == sampler.calls == plain


def test_runs_keep_no_graph_of_a_trainable_network():
    """A network with trainable parameters, called outside torch.no_grad: the samples and steering results carry
    no autograd graph (which would hold every call's activations until the run ends), on every runner; reward
    guidance still takes its gradients."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 2))
    model = gf.FlowModel(lambda x, t: net(torch.cat([x, t[:, None].to(x.dtype)], 1)), gf.LinearSchedule())
    reward = lambda x: -x.pow(2).sum(-1)   # noqa: E731
    kw = dict(transitions=2, inner_steps=2)
    noise = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(0))
    assert not gf.sample(model, noise[0], **kw).requires_grad
    for run in (gf.fk_steering, gf.best_of_n, gf.beam_search):
        res = run(model, reward, noise, **kw)
        assert not res.samples.requires_grad and not res.rewards.requires_grad, run.__name__
    guided = gf.sample(model, noise[0], guidance=gf.RewardGuidance(reward, scale=2.0, window=(0.2, 0.7)), **kw)
    plain = gf.sample(model, noise[0], **kw)
    assert not guided.requires_grad and reward(guided).mean() > reward(plain).mean()
