"""Inpaint against its formula, x <- m x + (1 - m) (alpha_t z + sigma_t eps), on odd [N, C, H, W] states, every
schedule, both ends of [0, 1], masks of every kind (bool, soft, broadcast, per row), low-precision states,
non-contiguous tensors, resampled rows and seeded runs; and the arguments it must refuse by name."""
import pytest
import torch

import glass_fast as gf
from glass_fast.mixtures import GaussianMixture

SCHEDULES = {"linear": gf.LinearSchedule(), "cosine": gf.CosineSchedule(), "vp": gf.VPSchedule()}
SHAPE = (3, 2, 3, 5)     # [N, C, H, W], odd sizes


def tensors(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, generator=g, dtype=dtype)
    image = torch.randn((1,) + SHAPE[1:], generator=g, dtype=dtype)
    x = torch.randn(SHAPE, generator=g, dtype=dtype)
    return noise, image, x


def masks():
    """bool [1, 1, H, W]; soft float per channel [C, 1, 1]; per row [N, 1, 1, 1] with a 0/1 column pattern."""
    cols = torch.zeros(1, 1, 3, 5, dtype=torch.bool)
    cols[..., 2:] = True
    return {"bool": cols, "soft": torch.tensor([0.25, 0.0]).reshape(2, 1, 1),
            "rows": torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64).reshape(3, 1, 1, 1)}


def formula(schedule, t, image, noise, mask, x):
    """The blend in float64 from the schedule's float64 coefficients."""
    tt = torch.tensor(t, dtype=torch.float64)
    known = schedule.alpha(tt) * image.double() + schedule.sigma(tt) * noise.double()
    m = mask.double()
    return (1 - m) * known + m * x.double(), known


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("t", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("kind", ["bool", "soft", "rows"])
def test_blend_matches_the_formula_and_keeps_both_regions_exact(schedule, t, kind):
    sch, (noise, image, x), mask = SCHEDULES[schedule], tensors(), masks()[kind]
    out = gf.Inpaint(sch, image, mask, noise)(2, t, x)
    want, _ = formula(sch, t, image, noise, mask, x)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, want, rtol=0, atol=1e-14)
    m = mask.double().expand(SHAPE)
    assert torch.equal(out[m == 1], x[m == 1])                 # the generated region: untouched, bit for bit
    if t == 1.0:                                              # alpha_1 = 1, sigma_1 = 0: the image itself
        assert torch.equal(out[m == 0], image.expand(SHAPE)[m == 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_states_blend_in_their_own_dtype(dtype):
    sch, (noise, image, x), mask = gf.CosineSchedule(), tensors(torch.float32, seed=1), masks()["bool"]
    xd = x.to(dtype)
    out = gf.Inpaint(sch, image, mask, noise)(1, 0.6, xd)
    assert out.dtype == dtype
    want, _ = formula(sch, 0.6, image, noise, mask, xd)
    # Two roundings to the state's dtype (alpha z, then + sigma eps) of values below 4 in magnitude.
    torch.testing.assert_close(out.double(), want, rtol=0, atol=8 * torch.finfo(dtype).eps)
    m = mask.expand(SHAPE)
    assert torch.equal(out[m], xd[m])
    at_one = gf.Inpaint(sch, image, mask, noise)(2, 1.0, xd)
    assert torch.equal(at_one[~m], image.to(dtype).expand(SHAPE)[~m])


def test_non_contiguous_tensors_give_the_contiguous_result():
    sch, (noise, image, x), mask = gf.LinearSchedule(), tensors(seed=2), masks()["soft"]
    strided = [v.transpose(2, 3).contiguous().transpose(2, 3) for v in (noise, image, x)]
    assert not any(v.is_contiguous() for v in strided)
    got = gf.Inpaint(sch, strided[1], mask, strided[0])(1, 0.5, strided[2])
    torch.testing.assert_close(got, gf.Inpaint(sch, image, mask, noise)(1, 0.5, x), rtol=0, atol=0)


def test_a_bool_mask_refilled_in_place_is_read_anew():
    # The hook re-reads a noise, image or mask tensor written in place since its last call; a bool mask was
    # converted to a float copy once, so refilling it went unseen and the old region kept being blended.
    sch, (noise, image, x), _ = gf.LinearSchedule(), tensors(seed=3), None
    mask = masks()["bool"].clone()
    hook = gf.Inpaint(sch, image, mask, noise)
    hook(1, 0.5, x)
    mask.logical_not_()
    out = hook(2, 0.5, x)
    want, _ = formula(sch, 0.5, image, noise, mask, x)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("t", [1.5, -0.25, float("nan")])
def test_times_outside_the_path_are_refused(t):
    # Linear: alpha = 1.5 and sigma = -0.5 at t = 1.5, a blend that used to come back silently.
    sch, (noise, image, x), mask = gf.LinearSchedule(), tensors(seed=4), masks()["bool"]
    with pytest.raises(ValueError, match=r"Inpaint: t must be a time in \[0, 1\].*got " + str(t)):
        gf.Inpaint(sch, image, mask, noise)(1, t, x)


def test_resampled_rows_and_repeated_children_follow_their_noise_rows():
    sch, (noise, image, x), mask = gf.CosineSchedule(), tensors(seed=5), masks()["rows"]
    rows = torch.tensor([2, 2, 0])
    hook = gf.Inpaint(sch, image, mask, noise).gather(rows)
    children = torch.cat([x, x]).reshape(2, *SHAPE).transpose(0, 1).reshape(6, *SHAPE[1:])   # each row twice
    out = hook(3, 0.4, children)
    want, _ = formula(sch, 0.4, image, noise[rows].repeat_interleave(2, 0), mask[rows].repeat_interleave(2, 0),
                      children)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-14)


def test_seeded_runs_repeat_and_differ_only_in_the_generated_region():
    data = GaussianMixture([[0.5, -1.0, 0.3]], [0.7], [1.0])
    model = data.flow_model(gf.LinearSchedule(), "velocity")
    noise = torch.randn(16, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    image, mask = torch.tensor([[2.0, 0.0, -1.5]], dtype=torch.float64), torch.tensor([0.0, 1.0, 0.0])

    def run(seed):
        return gf.sample(model, noise, method="glass", transitions=4, inner_steps=3,
                         generator=torch.Generator().manual_seed(seed), project=gf.Inpaint(model.schedule, image,
                                                                                          mask, noise))
    first, again, other = run(7), run(7), run(8)
    assert torch.equal(first, again)
    assert torch.equal(first[:, [0, 2]], image[:, [0, 2]].expand(16, 2))
    assert torch.equal(other[:, [0, 2]], first[:, [0, 2]])
    assert bool((other[:, 1] != first[:, 1]).all())


def test_mismatched_shapes_and_types_are_refused_by_name():
    sch, (noise, image, x), mask = gf.LinearSchedule(), tensors(seed=9), masks()["bool"]
    with pytest.raises(ValueError, match=r"mask of shape \(4, 1, 1\) broadcasts neither to the noise \(3, 2, 3, 5\)"):
        gf.Inpaint(sch, image, torch.ones(4, 1, 1), noise)
    with pytest.raises(ValueError, match=r"image of shape \(1, 2, 3, 4\) broadcasts neither to the noise"):
        gf.Inpaint(sch, torch.zeros(1, 2, 3, 4), mask, noise)
    with pytest.raises(TypeError, match="mask must be a floating or bool Tensor, got torch.int64"):
        gf.Inpaint(sch, image, mask.long(), noise)
    with pytest.raises(ValueError, match=r"Inpaint: the state \(3, 2, 3, 4\) does not match the noise \(3, 2, 3, 5\)"):
        gf.Inpaint(sch, image, mask, noise)(1, 0.5, x[..., :4])
    with pytest.raises(ValueError, match=r"Inpaint: the state \(4, 2, 3, 5\) does not match the noise"):
        gf.Inpaint(sch, image, mask, noise)(1, 0.5, torch.zeros(4, 2, 3, 5, dtype=torch.float64))
