"""``padding_mask_crop`` through the diffusers integration on tiny random parts, against diffusers' inpainting
pipelines: the box around an off-centre mask is inpainted at the output size and, for FLUX.1, SD3 and FLUX.2
Klein inpainting, pasted back into the larger original image."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from glass_fast.integrations import diffusers as gd  # noqa: E402
from diffusers_parts import ATOL, DIM, SIZE, pipeline, random_embeds  # noqa: E402

# The original image is larger than the output (SIZE x SIZE) and not square; the mask's white block sits in its
# upper right, so the box (with padding, widened to a square) is a small off-centre part of it.
H, W = 56, 72


def _image(seed: int, size: tuple = (H, W)):
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random(size + (3,)) * 255).astype(np.uint8))


def _mask(size: tuple = (H, W)):
    from PIL import Image
    m = np.zeros(size, dtype=np.uint8)
    m[6:20, 44:60] = 255
    return Image.fromarray(m)


def _final_latents(pipe, **kw):
    """(the pipeline's PIL images, its state after the last step: read by a step-end callback, as the pipelines
    refuse output_type="latent" with padding_mask_crop)."""
    seen = {}

    def keep(p, i, t, tensors):
        seen["latents"] = tensors["latents"].clone()
        return {}
    images = pipe(output_type="pil", callback_on_step_end=keep, **kw).images
    return images, seen["latents"]


def _assert_same_images(ours, theirs, size: tuple):
    """PIL images of ``size`` (height, width) equal up to 8-bit rounding: the states agree to ATOL, which can
    move a decoded value across a rounding boundary at a few pixels (and the overlay's resampling spreads it)."""
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
        assert a.shape == b.shape == size + (3,)
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01


def _assert_reproduces(pipe, kw: dict, steps: int, seed: int, size: tuple, pipeline_only=None, sample_only=None):
    """The ODE through ``sample`` (one call per step) equals the pipeline run with the same arguments ``kw``
    (plus each side's own spelling of an option): final latents to ATOL, images up to 8-bit rounding at
    ``size``. Returns (run arguments, our PIL images)."""
    gen = torch.Generator().manual_seed(seed)
    theirs, their_latents = _final_latents(pipe, num_inference_steps=steps, generator=gen,
                                           **(pipeline_only or {}), **kw)
    run = dict(method="ode", transitions=steps, inner_steps=1, **(sample_only or {}), **kw)
    ours = gd.sample(pipe, output_type="latent", generator=torch.Generator().manual_seed(seed), **run)
    torch.testing.assert_close(ours, their_latents, atol=ATOL, rtol=0)
    images = gd.sample(pipe, output_type="pil", generator=torch.Generator().manual_seed(seed), **run)
    _assert_same_images(images, theirs, size)
    return run, images


def _sd3_16_unshifted():
    """Tiny SD3 inpainting parts whose VAE has no shift_factor: StableDiffusion3InpaintPipeline subtracts the
    shift when encoding but does not add it back when decoding (glass_fast decodes with it, as SD3's other
    pipelines do), so with a shift their images differ by the decoded shift."""
    from diffusers import AutoencoderKL

    from test_diffusers_inpaint import _sd3_16
    parts = _sd3_16()
    config = {k: v for k, v in parts.vae.config.items() if not k.startswith("_")}
    vae = AutoencoderKL(**{**config, "shift_factor": 0.0}).eval()
    vae.load_state_dict(parts.vae.state_dict())
    parts.vae = vae
    return parts


def _crop(pipe, pad: int, height: int = SIZE, width: int = SIZE):
    return pipe.mask_processor.get_crop_region(_mask(), width, height, pad=pad)


@pytest.mark.parametrize("pad", [3, 12])
def test_flux_inpaint_with_padding_mask_crop_reproduces_the_pipeline(flux, pad):
    """Two prompts: the states are the box's, the images the box pasted into the image."""
    pipe = pipeline(flux, "FluxInpaintPipeline")
    box = _crop(pipe, pad)
    assert box[0] > 0 and box[1] >= 0 and (box[2] - box[0]) * (box[3] - box[1]) < H * W / 2
    kw = dict(height=SIZE, width=SIZE, image=_image(1), mask_image=_mask(), strength=0.8, guidance_scale=3.5,
              padding_mask_crop=pad, **random_embeds(2, DIM, seed=2))
    run, images = _assert_reproduces(pipe, kw, 5, 3, (H, W))
    # "pt" and "np" are the same pasted images.
    pt = gd.sample(pipe, output_type="pt", generator=torch.Generator().manual_seed(3), **run)
    assert pt.shape == (2, 3, H, W)
    np.testing.assert_array_equal((pt.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8),
                                  np.stack([np.asarray(i) for i in images]))


def test_sd3_inpaint_with_padding_mask_crop_reproduces_the_pipeline():
    """Two prompts with classifier-free guidance."""
    pipe = pipeline(_sd3_16_unshifted(), "StableDiffusion3InpaintPipeline")
    kw = dict(height=SIZE, width=SIZE, image=_image(4), mask_image=_mask(), strength=0.7, guidance_scale=4.0,
              padding_mask_crop=5, **random_embeds(2, 16, seed=5, negative=True))
    _assert_reproduces(pipe, kw, 4, 6, (H, W))


def test_flux2_klein_inpaint_with_padding_mask_crop_reproduces_the_pipeline(klein):
    """Klein generates at its image's size (72 x 56 here): the box takes that aspect ratio, and the pasted
    images have the image's size too."""
    from diffusers_parts import flux2_embeds, flux2_pipeline
    pipe = flux2_pipeline(klein, "Flux2KleinInpaintPipeline")
    kw = dict(image=_image(40), mask_image=_mask(), strength=0.9, guidance_scale=3.0, padding_mask_crop=2,
              **flux2_embeds(1, seed=41, negative=True))
    _assert_reproduces(pipe, kw, 3, 42, (H, W))


@pytest.mark.parametrize("reference", [False, True])
def test_flux_kontext_inpaint_with_padding_mask_crop_reproduces_the_pipeline(flux, reference):
    """Kontext returns the box's images (no overlay); its reference image, when given, is cut with the same box
    in its own pixels."""
    pipe = pipeline(flux, "FluxKontextInpaintPipeline")
    kw = dict(image=_image(60), mask_image=_mask(), strength=0.9, guidance_scale=3.0, padding_mask_crop=4,
              **random_embeds(1, DIM, seed=61))
    if reference:
        kw["image_reference"] = _image(62, size=(48, 64))
    _assert_reproduces(pipe, kw, 4, 63, (H // 4 * 4, W // 4 * 4), pipeline_only={"_auto_resize": False},
                       sample_only={"context_auto_resize": False})


def test_flux_controlnet_inpaint_with_padding_mask_crop_reproduces_the_pipeline(flux):
    """The ControlNet inpainting pipeline returns the box's images; its control image is not cut."""
    from diffusers_parts import random_image, tiny_flux_controlnet
    pipe = pipeline(flux, "FluxControlNetInpaintPipeline", controlnet=tiny_flux_controlnet(seed=11))
    kw = dict(height=SIZE, width=SIZE, image=_image(12), mask_image=_mask(), control_image=random_image(13),
              strength=0.8, padding_mask_crop=3, **random_embeds(1, DIM, seed=14))
    _assert_reproduces(pipe, kw, 4, 15, (SIZE, SIZE))


def test_the_crop_and_the_overlay_change_the_result(flux):
    """Without the crop the state is the whole image's; the overlay keeps the image exactly where the mask is
    black and shows the generated box where it is white."""
    pipe = pipeline(flux, "FluxInpaintPipeline")
    kw = dict(height=SIZE, width=SIZE, image=_image(20), mask_image=_mask(), strength=1.0, method="ode",
              transitions=3, inner_steps=1, **random_embeds(1, DIM, seed=21))
    cropped = gd.sample(pipe, output_type="latent", padding_mask_crop=3, generator=torch.Generator().manual_seed(22),
                        **kw)
    whole = gd.sample(pipe, output_type="latent", generator=torch.Generator().manual_seed(22), **kw)
    assert (cropped - whole).abs().max() > 0.1
    pasted = np.asarray(gd.sample(pipe, output_type="pil", padding_mask_crop=3,
                                  generator=torch.Generator().manual_seed(22), **kw)[0])
    original, white = np.asarray(_image(20)), np.asarray(_mask()) == 255
    np.testing.assert_array_equal(pasted[~white], original[~white])
    assert np.abs(pasted[white].astype(int) - original[white]).mean() > 10


@pytest.mark.parametrize("algorithm", ["fk", "beam"])
def test_steering_with_padding_mask_crop(flux, algorithm):
    """Particles are the box's states, all with the image's latents where the cropped mask is black; the best
    are pasted into the image, which they keep where the mask is black."""
    pipe = pipeline(flux, "FluxInpaintPipeline")
    flow = gd.as_flow(pipe)
    best, res = gd.steer(pipe, reward=lambda images, prompts: images.mean(dim=(1, 2, 3)), particles=3,
                         image=_image(30), mask_image=_mask(), padding_mask_crop=3, algorithm=algorithm,
                         height=SIZE, width=SIZE, output_type="np", transitions=3, inner_steps=2,
                         generator=torch.Generator().manual_seed(31), **random_embeds(1, DIM, seed=32))
    assert res.samples.shape == (1, 3) + flow.state_shape(SIZE, SIZE)
    # The cropped mask, downsampled to latents as the blend does (nearest neighbour).
    box = _crop(pipe, 3)
    m = pipe.mask_processor.preprocess(_mask(), height=SIZE, width=SIZE, crops_coords=box, resize_mode="fill")
    m = torch.nn.functional.interpolate(m, size=flow.latent_hw(SIZE, SIZE))
    keep = flow.pack(m.repeat(1, flow.latent_channels(), 1, 1))[0] == 0
    assert keep.any() and (~keep).any()
    for particle in res.samples[0, 1:]:
        torch.testing.assert_close(particle[keep], res.samples[0, 0][keep], atol=1e-6, rtol=0)
    assert best.shape == (1, H, W, 3)
    original, white = np.asarray(_image(30)) / 255.0, np.asarray(_mask()) == 255
    np.testing.assert_allclose(best[0][~white], original[~white], atol=1e-6, rtol=0)


def test_padding_mask_crop_inputs_are_named(flux, flux_control):
    kw = dict(height=SIZE, width=SIZE, transitions=2, inner_steps=1, **random_embeds(1, DIM, seed=40))
    pipe = pipeline(flux, "FluxInpaintPipeline")
    with pytest.raises(ValueError, match=r"padding_mask_crop=4: only FluxInpaintPipeline, .* take it; this pipeline "
                                         r"\(FluxControlInpaintPipeline\) has no such argument"):
        gd.sample(pipeline(flux_control, "FluxControlInpaintPipeline"), image=_image(41), mask_image=_mask(),
                  control_image=_image(42), padding_mask_crop=4, **kw)
    with pytest.raises(ValueError, match=r"this pipeline \(FluxPipeline\) has no such argument"):
        gd.sample(pipeline(flux, "FluxPipeline"), padding_mask_crop=4, **kw)
    with pytest.raises(ValueError, match="padding_mask_crop must be an integer >= 0 .*got -1"):
        gd.sample(pipe, image=_image(41), mask_image=_mask(), padding_mask_crop=-1, **kw)
    with pytest.raises(ValueError, match="padding_mask_crop needs image as one PIL image, as FluxInpaintPipeline "
                                         "does; got ndarray"):
        gd.sample(pipe, image=np.asarray(_image(41)), mask_image=_mask(), padding_mask_crop=4, **kw)
    with pytest.raises(ValueError, match="padding_mask_crop needs mask_image as one PIL image.*got list"):
        gd.sample(pipe, image=_image(41), mask_image=[_mask()], padding_mask_crop=4, **kw)
    with pytest.raises(ValueError, match=r"mask_image has no pixel to repaint \(all black\)"):
        gd.sample(pipe, image=_image(41), mask_image=_mask().point(lambda v: 0), padding_mask_crop=4, **kw)
    with pytest.raises(ValueError, match=r"they must have the same size, got image \(40, 40\) and mask_image "
                                         r"\(72, 56\)"):
        gd.sample(pipe, image=_image(41, size=(40, 40)), mask_image=_mask(), padding_mask_crop=4, **kw)
