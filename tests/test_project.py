"""The ``project`` hook: a map applied to the state after every transition (e.g. inpainting's blending of
known content into the state, ``Inpaint``), in sample, Sampler.run / step, FK steering, best-of-N and beam search."""
import math

import pytest
import torch

import glass_fast as gf
from glass_fast.mixtures import GaussianMixture, ks_critical, ks_statistic

# One isotropic Gaussian: the coordinates are independent, and so are their denoisers, so fixing coordinate 0
# leaves the law of coordinate 1 (and, given the same noise draws, its values) unchanged.
MU, S = (0.5, -1.0), 0.7
DATA = GaussianMixture([MU], [S], [1.0])
KNOWN = 2.0


def pin_first(noise):
    """Coordinate 0 kept at the known value, noised to t with the run's own start noise (inpainting)."""
    return gf.Inpaint(gf.LinearSchedule(), torch.tensor([[KNOWN, 0.0]]), torch.tensor([[0.0, 1.0]]), noise)


def model():
    return DATA.flow_model(gf.LinearSchedule(), "velocity")


def draws(n, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["glass", "ode", "sde", "plugin"])
def test_sample_with_project_pins_the_known_part_and_leaves_the_rest(method):
    noise = draws(64)
    kw = dict(method=method, transitions=4, inner_steps=4)
    free = gf.sample(model(), noise, generator=torch.Generator().manual_seed(1), **kw)
    pinned = gf.sample(model(), noise, generator=torch.Generator().manual_seed(1), project=pin_first(noise), **kw)
    assert torch.all(pinned[:, 0] == KNOWN)
    torch.testing.assert_close(pinned[:, 1], free[:, 1], rtol=0, atol=1e-5)
    assert not torch.allclose(free[:, 0], pinned[:, 0])


def test_project_is_called_after_every_transition_with_the_grid_index_and_time():
    seen = []

    def project(k, t, x):
        seen.append((k, t, x.shape[0]))
        return x
    grid = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    gf.sample(model(), draws(8), transitions=4, inner_steps=2, grid=grid, project=project)
    assert seen == [(k, float(grid[k]), 8) for k in range(1, 5)]


def test_sampler_step_with_project_equals_the_step_then_the_map():
    noise = draws(16)
    sampler = gf.Sampler(model(), transitions=3, inner_steps=3)
    x = noise
    for k in range(3):
        x = sampler.step(k, x, generator=torch.Generator().manual_seed(k))
        x = pin_first(noise)(k + 1, float(sampler.grid[k + 1]), x)
    y = noise
    for k in range(3):
        y = sampler.step(k, y, generator=torch.Generator().manual_seed(k), project=pin_first(noise))
    torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_the_unpinned_coordinate_keeps_its_exact_law():
    """Ground truth: with independent coordinates, coordinate 1 of the projected run is N(mu_1, s^2)."""
    n = 4000
    noise = draws(n, seed=3)
    x = gf.sample(model(), noise, transitions=5, inner_steps=10, generator=torch.Generator().manual_seed(4),
                  project=pin_first(noise))
    assert torch.all(x[:, 0] == KNOWN)
    cdf = lambda y: 0.5 * (1 + torch.erf((y - MU[1]) / (S * math.sqrt(2))))
    assert ks_statistic(x[:, 1].double(), cdf) < ks_critical(n, 0.001)


def steered(run, noise, project):
    return run(model(), lambda z: z[:, 1], noise, generator=torch.Generator().manual_seed(5), transitions=3,
               inner_steps=3, project=project)


@pytest.mark.parametrize("run", [gf.fk_steering, gf.best_of_n, gf.beam_search], ids=["fk", "best_of_n", "beam"])
def test_steering_with_project_pins_every_particle_and_leaves_the_rest(run):
    noise = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(6))
    free, pinned = steered(run, noise, None), steered(run, noise, pin_first(noise))
    assert torch.all(pinned.samples[..., 0] == KNOWN)
    torch.testing.assert_close(pinned.samples[..., 1], free.samples[..., 1], rtol=0, atol=1e-5)
    torch.testing.assert_close(pinned.rewards, free.rewards, rtol=0, atol=1e-5)


def test_beam_search_projects_every_child():
    rows = []

    def project(k, t, x):
        rows.append(x.shape[0])
        return x
    gf.beam_search(model(), lambda z: z[:, 1], torch.randn(2, 3, 2), expansions=4, transitions=3, inner_steps=2,
                   project=project)
    assert rows == [2 * 3 * 4] * 3


def test_fk_steering_projects_before_weighting():
    """The weights see the projected particles: a reward on the pinned coordinate is the same for all."""
    noise = torch.randn(2, 8, 2, generator=torch.Generator().manual_seed(7))
    res = gf.fk_steering(model(), lambda z: z[:, 0], noise, transitions=3, inner_steps=3, project=pin_first(noise))
    torch.testing.assert_close(res.log_weights, torch.full((2, 8), -math.log(8), dtype=torch.float64))


def test_project_runs_between_compiled_transitions():
    noise = draws(8)
    kw = dict(transitions=2, inner_steps=2, generator=torch.Generator().manual_seed(1), project=pin_first(noise))
    eager = gf.sample(model(), noise, **kw)
    kw["generator"] = torch.Generator().manual_seed(1)
    compiled = gf.sample(model(), noise, compile=True, **kw)
    assert torch.all(compiled[:, 0] == KNOWN)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_bad_project_hooks_are_named():
    noise = draws(4)
    with pytest.raises(TypeError, match="project must be None or callable"):
        gf.sample(model(), noise, transitions=2, inner_steps=2, project=3)
    with pytest.raises(TypeError, match="project must be None or callable"):
        gf.fk_steering(model(), lambda z: z[:, 0], noise.reshape(2, 2, 2), transitions=2, project="blend")
    with pytest.raises(ValueError, match=r"project must return the state's shape.*\(4, 2\).*got \(4, 1\)"):
        gf.sample(model(), noise, transitions=2, inner_steps=2, project=lambda k, t, x: x[:, :1])
    with pytest.raises(ValueError, match=r"project must return.*got \(4, 2\) torch.float64"):
        gf.sample(model(), noise, transitions=2, inner_steps=2, project=lambda k, t, x: x.double())
    with pytest.raises(ValueError, match="project must return.*got list"):
        gf.sample(model(), noise, transitions=2, inner_steps=2, project=lambda k, t, x: [x])


def test_nan_from_the_project_hook_is_reported_as_the_hooks():
    def project(k, t, x):
        return x.masked_fill(torch.ones_like(x, dtype=torch.bool), float("nan")) if k == 2 else x
    with pytest.raises(FloatingPointError, match=r"project returned NaN or Inf at grid index 2 \(t=0.6667\)"):
        gf.sample(model(), draws(4), transitions=3, inner_steps=2, project=project)


def test_inpaint_blends_the_known_data_noised_along_the_schedule():
    """Closed form at one step: (1 - m) (alpha_t z + sigma_t eps) + m x, on any schedule, soft masks included."""
    sched = gf.CosineSchedule()
    noise, x = torch.randn(4, 3, generator=torch.Generator().manual_seed(8)), torch.randn(4, 3)
    z, m = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.0, 0.25, 1.0])
    out = gf.Inpaint(sched, z, m, noise)(2, 0.3, x)
    known = sched.alpha(0.3) * z + sched.sigma(0.3) * noise
    torch.testing.assert_close(out, (1 - m) * known + m * x)
    assert torch.equal(gf.Inpaint(sched, z, m, noise)(5, 1.0, x)[:, 0], torch.full((4,), 1.0))
    as_bool = gf.Inpaint(sched, z, torch.tensor([False, True, True]), noise)(2, 0.3, x)
    torch.testing.assert_close(as_bool[:, 1:], x[:, 1:], rtol=0, atol=0)


def test_inpaint_with_steering_noise_and_beam_children():
    noise = torch.randn(2, 3, 2)                       # [B, K, ...] as the steering functions take it
    hook = gf.Inpaint(gf.LinearSchedule(), torch.tensor([KNOWN, 0.0]), torch.tensor([0.0, 1.0]), noise)
    children = torch.randn(2 * 3 * 4, 2)               # four children per row, rows repeated in place
    out = hook(1, 0.5, children)
    expected = 0.5 * KNOWN + 0.5 * noise.reshape(6, 2)[:, 0].repeat_interleave(4)
    torch.testing.assert_close(out[:, 0], expected)
    torch.testing.assert_close(out[:, 1], children[:, 1], rtol=0, atol=0)


def test_bad_inpaint_arguments_are_named():
    s, noise = gf.LinearSchedule(), torch.randn(4, 2)
    z, m = torch.zeros(2), torch.ones(2)
    with pytest.raises(TypeError, match="schedule must be a glass_fast Schedule"):
        gf.Inpaint("linear", z, m, noise)
    with pytest.raises(TypeError, match="image must be a floating Tensor, got list"):
        gf.Inpaint(s, [0.0, 0.0], m, noise)
    with pytest.raises(ValueError, match="mask holds NaN or Inf"):
        gf.Inpaint(s, z, torch.tensor([float("nan"), 1.0]), noise)
    with pytest.raises(ValueError, match=r"mask must hold values in \[0, 1\].*got values in \[0, 2\]"):
        gf.Inpaint(s, z, torch.tensor([0.0, 2.0]), noise)
    with pytest.raises(ValueError, match=r"image of shape \(3,\) broadcasts neither to the noise \(4, 2\)$"):
        gf.Inpaint(s, torch.zeros(3), m, noise)
    with pytest.raises(ValueError, match=r"noise must be the run's start noise \[N, ...\]"):
        gf.Inpaint(s, z, m, torch.randn(2))
    with pytest.raises(ValueError, match=r"the state \(6, 2\) does not match the noise \(4, 2\)"):
        gf.Inpaint(s, z, m, noise)(1, 0.5, torch.randn(6, 2))


def test_fk_steering_with_inpainting_reaches_the_tilted_law_of_the_free_coordinate():
    """Ground truth: reward r(z) = z_1 and coordinate 0 pinned; the coordinates are independent, so coordinate 1
    of the weighted particles follows the tilted law N(mu_1 + s^2, s^2) and coordinate 0 is the known value."""
    from test_steering_stat import weighted_ks
    k = 3000
    noise = torch.randn(1, k, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(41))
    res = gf.fk_steering(DATA.flow_model(gf.LinearSchedule(), "x0"), lambda z: z[:, 1], noise, solver="midpoint",
                         generator=torch.Generator().manual_seed(42), project=pin_first(noise))
    assert torch.all(res.samples[..., 0] == KNOWN)
    n_eff = int(float(gf.ess(res.log_weights)[0]))
    u = torch.tensor([0.0, 1.0], dtype=torch.float64)
    tilted = DATA.tilted(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert weighted_ks(res.samples[0], res.log_weights[0], tilted, u) < ks_critical(n_eff, 0.001)
    # The same statistic rejects the untilted law: the check has power at this size.
    assert weighted_ks(res.samples[0], res.log_weights[0], DATA, u) > ks_critical(n_eff, 0.001)


@pytest.mark.parametrize("search", [False, True], ids=["fk_value", "beam_value"])
def test_value_estimates_score_posterior_draws_projected_at_t1(search):
    """With potential="value" (or beam search's value_samples) the posterior draws are projected at t = 1, as the
    final states are: told the final grid index and t = 1, on value_samples copies of every row."""
    seen = set()

    def project(k, t, x):
        seen.add((k, t, x.shape[0]))
        return x
    noise = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(9))
    if search:
        gf.beam_search(model(), lambda z: z[:, 1], noise, expansions=2, transitions=3, inner_steps=2, value_samples=4,
                       project=project)
        rows = 2 * 3 * 2
    else:
        gf.fk_steering(model(), lambda z: z[:, 1], noise, potential="value", value_samples=4, transitions=3,
                       inner_steps=2, project=project)
        rows = 2 * 3
    assert (3, 1.0, rows * 4) in seen                       # the value draws, at the final grid index
    assert {(k, rows) for k, t, n in seen if n == rows} == {(1, rows), (2, rows), (3, rows)}


def test_inpaint_gather_follows_the_ancestors_noise_image_and_mask():
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(10))
    image = torch.randn(4, 2, generator=torch.Generator().manual_seed(11))     # one image per row
    mask = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    hook, x = gf.Inpaint(gf.LinearSchedule(), image, mask, noise), torch.randn(4, 2)
    rows = torch.tensor([2, 2, 0, 3])
    got = hook.gather(rows)(1, 0.4, x)
    want = gf.Inpaint(gf.LinearSchedule(), image[rows], mask[rows], noise[rows])(1, 0.4, x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    twice = hook.gather(rows).gather(torch.tensor([3, 0, 0, 1]))(1, 0.4, x)   # composes along the lineage
    again = torch.tensor([3, 2, 2, 2])
    torch.testing.assert_close(twice, gf.Inpaint(gf.LinearSchedule(), image[again], mask[again], noise[again])(1, 0.4, x))
    torch.testing.assert_close(hook(1, 0.4, x), gf.Inpaint(gf.LinearSchedule(), image, mask, noise)(1, 0.4, x))


def test_resampling_with_equal_weights_keeps_each_inpainted_trajectory():
    """lambda = 0 and resampling at every step: with an ODE proposal every particle continues its ancestor's
    trajectory exactly (the kept part follows the ancestor's noise), so each output is one of the plain run's
    outputs of its group. With the noise left behind, the resampled copies would drift off them."""
    two = GaussianMixture([[2.0, 2.0], [-2.0, -2.0]], [0.3, 0.3], [0.5, 0.5])
    m = two.flow_model(gf.LinearSchedule(), "velocity")
    noise = torch.randn(6, 8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    hook = gf.Inpaint(gf.LinearSchedule(), torch.tensor([[2.0, 0.0]], dtype=torch.float64),
                      torch.tensor([[0.0, 1.0]], dtype=torch.float64), noise)
    plain = gf.sample(m, noise.reshape(-1, 2), method="ode", project=hook).reshape(6, 8, 2)
    res = gf.fk_steering(m, lambda z: z[:, 0] * 0, noise, method="ode", lmbda=0.0, ess_threshold=1.0,
                         resample="multinomial", project=hook, generator=torch.Generator().manual_seed(13))
    nearest = torch.cdist(res.samples, plain).min(dim=-1).values
    assert float(nearest.max()) < 1e-9
    assert not torch.allclose(res.samples, plain)    # resampling did happen


class Tag:
    """A hook writing each row's lineage tag into coordinate 0 (children share their parent's tag)."""

    def __init__(self, tags):
        self.tags = tags

    def __call__(self, k, t, x):
        tags = self.tags.repeat_interleave(x.shape[0] // self.tags.shape[0]).to(x.dtype)
        return torch.cat([tags[:, None], x[:, 1:]], dim=1)

    def gather(self, rows):
        return Tag(self.tags[rows])


def test_beam_search_rebinds_per_row_hooks_to_each_kept_childs_parent():
    noise = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(14))
    res = gf.beam_search(model(), lambda z: z[:, 1], noise, expansions=3, transitions=3, inner_steps=2,
                         project=Tag(torch.arange(6)), generator=torch.Generator().manual_seed(15))
    tags = res.samples[..., 0]
    groups = torch.arange(2)[:, None].expand(2, 3)
    assert torch.equal(torch.div(tags, 3, rounding_mode="floor"), groups.float())   # lineages stay in their group
    assert not torch.equal(tags, torch.arange(6.0).reshape(2, 3))                  # and follow the selections


def test_hooks_in_turn_apply_in_order_and_follow_together():
    from glass_fast.sampling import follow, in_turn
    assert in_turn(None, None) is None
    double = lambda k, t, x: 2 * x   # noqa: E731
    assert in_turn(None, double) is double
    tag = Tag(torch.arange(4))
    both = in_turn(tag, double)
    x = torch.ones(4, 2)
    torch.testing.assert_close(both(1, 0.5, x), torch.stack([2 * torch.arange(4.0), torch.full((4,), 2.0)], 1))
    moved = follow(both, torch.tensor([3, 3, 0, 1]))
    torch.testing.assert_close(moved(1, 0.5, x)[:, 0], torch.tensor([6.0, 6.0, 0.0, 2.0]))
    assert follow(double, torch.tensor([0])) is double


@pytest.mark.parametrize("run", ["beam", "fk_value"])
def test_per_row_and_per_group_images_follow_children_and_value_draws(run):
    """Images / masks given per particle [B * K, ...] or per group [B, 1, ...] of steering's [B, K, ...] noise:
    repeated for beam children and value draws like the noise (they used to be refused after a transition)."""
    noise = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(16))
    per_group = torch.tensor([[[KNOWN, 0.0]], [[-KNOWN, 0.0]]])            # [B, 1, 2]: one known value per group
    hook = gf.Inpaint(gf.LinearSchedule(), per_group, torch.tensor([0.0, 1.0]), noise)
    kw = dict(transitions=3, inner_steps=2, project=hook, generator=torch.Generator().manual_seed(17))
    if run == "beam":
        res = gf.beam_search(model(), lambda z: z[:, 1], noise, expansions=2, value_samples=2, **kw)
    else:
        res = gf.fk_steering(model(), lambda z: z[:, 1], noise, potential="value", value_samples=2, **kw)
    assert torch.equal(res.samples[..., 0], torch.tensor([[KNOWN] * 3, [-KNOWN] * 3]))


@pytest.mark.parametrize("inference", [False, True], ids=["grad-mode", "inference-mode"])
def test_inpaint_reads_a_noise_buffer_refilled_in_place(inference):
    """A serving loop refilling one noise buffer and reusing the hook blends the current noise, not the first
    (inference tensors keep no write count, so there the hook cannot tell a refill and reads them every call)."""
    with torch.inference_mode(inference):
        noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(18))
        hook, x = gf.Inpaint(gf.LinearSchedule(), torch.zeros(2), torch.tensor([0.0, 1.0]), noise), torch.zeros(4, 2)
        first = hook(1, 0.5, x)[:, 0].clone()
        noise.normal_(generator=torch.Generator().manual_seed(19))
        torch.testing.assert_close(hook(1, 0.5, x)[:, 0], 0.5 * noise[:, 0])
        assert not torch.allclose(first, 0.5 * noise[:, 0])


def test_inpaint_rejects_a_state_whose_rows_are_not_the_noises_rows():
    hook = gf.Inpaint(gf.LinearSchedule(), torch.zeros(2), torch.tensor([0.0, 1.0]), torch.randn(6, 2))
    with pytest.raises(ValueError, match=r"Inpaint: the state \(3, 4\) does not match the noise \(6, 2\)"):
        hook(1, 0.5, torch.zeros(3, 4))   # as many numbers, but each state row would mix two noise rows
    assert hook(1, 0.5, torch.zeros(12, 2)).shape == (12, 2)   # children: each noise row twice
    assert hook(1, 0.5, torch.zeros(0, 2)).shape == (0, 2)
    with pytest.raises(ValueError, match=r"noise must be .* non-empty, got shape \(4, 0\)"):
        gf.Inpaint(gf.LinearSchedule(), torch.zeros(1), torch.zeros(1), torch.zeros(4, 0))
    image_noise = torch.randn(3, 2, 4, 4)   # an image-shaped noise also serves a flat state of its rows
    flat = gf.Inpaint(gf.LinearSchedule(), torch.ones(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), image_noise)
    torch.testing.assert_close(flat(1, 0.5, torch.zeros(3, 32)), (0.5 + 0.5 * image_noise).reshape(3, 32))
