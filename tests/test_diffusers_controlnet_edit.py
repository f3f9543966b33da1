"""FLUX.1 ControlNets editing an image through the diffusers integration on tiny random parts, against diffusers'
FluxControlNetImg2ImgPipeline and FluxControlNetInpaintPipeline: image-to-image (and the inpainting blend) with
ControlNet residuals whose window is read on the steps that run after ``strength``."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from glass_fast.integrations import diffusers as gd  # noqa: E402
from diffusers_parts import (ATOL, DIM, SIZE, pipeline, random_embeds, tiny_flux,  # noqa: E402
                             tiny_flux_controlnet)
from diffusers_parts import random_image as _image  # noqa: E402
from diffusers_parts import column_mask as _mask  # noqa: E402

ODE = dict(method="ode", inner_steps=1, height=SIZE, width=SIZE, output_type="latent")
# Eight steps at strength 0.5 run four; of those, steps 1 and 2 have the ControlNet on, at a scale other than 1.
EDIT = dict(strength=0.5, controlnet_conditioning_scale=0.7, control_guidance_start=0.25, control_guidance_end=0.75)


def _gen(seed: int):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def parts():
    return tiny_flux()


def _img2img(parts, net):
    return pipeline(parts, "FluxControlNetImg2ImgPipeline", controlnet=net)


def _inpaint(parts, net):
    return pipeline(parts, "FluxControlNetInpaintPipeline", controlnet=net)


def _differs(a, b, factor: float = 100):
    """Far beyond the equality tests' tolerance."""
    return (a - b).abs().max() > factor * ATOL


# ------------------------------------------------------------------------------------------------ image-to-image
@pytest.mark.parametrize("images", ["one", "per_prompt"])
def test_controlnet_img2img_reproduces_the_pipeline(parts, images):
    """Two prompts, an image and a control image for both or one per prompt; the generator draws the control
    latents, then the image's, then the noise, as the pipeline. Its default guidance_scale (7.0) is used. Without
    the ControlNet, with the window read on the whole grid, or without the image, the result differs."""
    pipe = _img2img(parts, tiny_flux_controlnet(seed=1))
    count = 1 if images == "one" else 2
    kw = dict(height=SIZE, width=SIZE, output_type="latent", image=_image(2, count),
              control_image=_image(3, count), **random_embeds(2, DIM, seed=4), **EDIT)
    theirs = pipe(num_inference_steps=8, generator=_gen(5), **kw).images
    ours = gd.sample(pipe, method="ode", transitions=8, inner_steps=1, generator=_gen(5), **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    run = dict(method="ode", transitions=8, inner_steps=1)
    assert _differs(gd.sample(pipe, generator=_gen(5), **run, **{**kw, "controlnet_conditioning_scale": 0.0}), ours)
    assert _differs(gd.sample(pipe, generator=_gen(5), **run, **{**kw, "control_guidance_start": 0.0}), ours)
    assert _differs(gd.sample(pipe, generator=_gen(5), **run, **{**kw, "strength": 1.0}), ours)
    assert _differs(gd.sample(pipe, generator=_gen(5), guidance_scale=3.5, **run, **kw), ours)


def test_controlnet_img2img_union_reproduces_the_pipeline(parts):
    """A union ControlNet reads control_mode (one prompt: the pipeline gives a single union ControlNet one mode
    row, which a batch of several rows cannot read; glass_fast gives every row the mode)."""
    pipe = _img2img(parts, tiny_flux_controlnet(seed=6, num_mode=3))
    kw = dict(height=SIZE, width=SIZE, output_type="latent", image=_image(7), control_image=_image(8),
              control_mode=1, guidance_scale=4.0, **random_embeds(1, DIM, seed=9), **EDIT)
    theirs = pipe(num_inference_steps=8, generator=_gen(10), **kw).images
    ours = gd.sample(pipe, method="ode", transitions=8, inner_steps=1, generator=_gen(10), **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert _differs(gd.sample(pipe, method="ode", transitions=8, inner_steps=1, generator=_gen(10),
                              **{**kw, "control_mode": 0}), ours, factor=20)   # the mode moves it by ~1e-3


# ---------------------------------------------------------------------------------------------------- inpainting
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_controlnet_inpaint_reproduces_the_pipeline(parts, strength):
    """Two prompts, one image, a mask and a control image per prompt: the kept region is blended back after every
    step. Without the blend (FluxControlNetImg2ImgPipeline) or without the ControlNet the result differs."""
    net = tiny_flux_controlnet(seed=11)
    pipe = _inpaint(parts, net)
    kw = dict(height=SIZE, width=SIZE, output_type="latent", image=_image(12), mask_image=_mask(slice(8, 24), 2),
              control_image=_image(13, 2), **random_embeds(2, DIM, seed=14), **{**EDIT, "strength": strength})
    theirs = pipe(num_inference_steps=8, generator=_gen(15), **kw).images
    ours = gd.sample(pipe, method="ode", transitions=8, inner_steps=1, generator=_gen(15), **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    run = dict(method="ode", transitions=8, inner_steps=1, generator=_gen(15))
    assert _differs(gd.sample(pipe, **run, **{**kw, "controlnet_conditioning_scale": 0.0}), ours)
    no_blend = {k: v for k, v in kw.items() if k != "mask_image"}
    assert _differs(gd.sample(_img2img(parts, net), **run, **no_blend), ours)


# ------------------------------------------------------------------------------------------------------ steering
@pytest.mark.parametrize("cls", ["FluxControlNetImg2ImgPipeline", "FluxControlNetInpaintPipeline"])
def test_steering_a_controlnet_edit(parts, cls):
    """FK steering with GLASS transitions runs the shortened grid; inpainting keeps the image's latents in the kept
    region of every particle."""
    pipe = pipeline(parts, cls, controlnet=tiny_flux_controlnet(seed=16))
    mask = _mask(slice(0, 16))
    extra = dict(mask_image=mask) if "Inpaint" in cls else {}
    reward = lambda images, prompts: images[:, 0].mean((1, 2))  # noqa: E731
    best, result = gd.steer(pipe, reward=reward, particles=3, transitions=4, inner_steps=2, height=SIZE, width=SIZE,
                            image=_image(17), control_image=_image(18), generator=_gen(19), output_type="latent",
                            **random_embeds(2, DIM, seed=20), **EDIT, **extra)
    assert best.shape == (2, (SIZE // 4) ** 2, 16) and torch.isfinite(result.samples).all()
    assert result.nfe == 2 * 2        # two transitions run (half the schedule), two calls each
    if extra:
        flow = gd.as_flow(pipe)
        m = torch.as_tensor(mask >= 128, dtype=torch.float32)[None, None, ::2, ::2]
        keep = flow.pack(m.repeat(1, flow.latent_channels(), 1, 1))[0] == 0
        samples = result.samples[0]
        for particle in samples[1:]:
            torch.testing.assert_close(particle[keep], samples[0][keep], atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------------------------- errors
def test_controlnet_edit_errors_are_named(parts):
    kw = dict(transitions=2, **ODE, **random_embeds(2, DIM))
    img2img, inpaint = _img2img(parts, tiny_flux_controlnet()), _inpaint(parts, tiny_flux_controlnet())
    with pytest.raises(ValueError, match="FluxControlNetImg2ImgPipeline edits an image: pass image="):
        gd.sample(img2img, control_image=_image(1), **kw)
    with pytest.raises(ValueError, match="inpainting needs image=.*missing: mask_image"):
        gd.sample(inpaint, image=_image(1), control_image=_image(2), **kw)
    with pytest.raises(ValueError, match="masked_image_latents= is not used by latent-blending inpainting"):
        gd.sample(inpaint, image=_image(1), mask_image=_mask(slice(0, 8)), control_image=_image(2),
                  masked_image_latents=torch.zeros(1, 64, 16), **kw)
    with pytest.raises(ValueError, match=r"FLUX.1 Fill / Control conditions cannot be combined with a ControlNet"):
        gd.sample(img2img, image=_image(1), mask_image=_mask(slice(0, 8)), control_image=_image(2), **kw)
    with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\], got 0"):
        gd.sample(img2img, image=_image(1), control_image=_image(2), strength=0, **kw)
    with pytest.raises(ValueError, match=r"has a ControlNet \(FluxControlNetModel\): pass control_image="):
        gd.sample(img2img, image=_image(1), **kw)
    with pytest.raises(ValueError, match=r"context_image \(FLUX.1 Kontext\) cannot be combined with a ControlNet"):
        gd.sample(img2img, image=_image(1), control_image=_image(2), context_image=_image(3), **kw)
    with pytest.raises(ValueError, match="padding_mask_crop needs image as one PIL image, as "
                                         "FluxControlNetInpaintPipeline does; got ndarray"):
        gd.sample(inpaint, image=_image(1), mask_image=_mask(slice(0, 8)), control_image=_image(2),
                  padding_mask_crop=4, **kw)
    # The text-to-image ControlNet pipeline still takes no image.
    plain = pipeline(parts, "FluxControlNetPipeline", controlnet=tiny_flux_controlnet())
    with pytest.raises(ValueError, match=r"image= \(image-to-image\) cannot be combined with a ControlNet .*"
                                         r"FluxControlNetImg2ImgPipeline or FluxControlNetInpaintPipeline"):
        gd.sample(plain, image=_image(1), control_image=_image(2), **kw)
