"""Latent-blending inpainting through the diffusers integration (FluxInpaintPipeline,
StableDiffusion3InpaintPipeline) on tiny random parts, against diffusers' own pipelines."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from glass_fast.integrations import diffusers as gd  # noqa: E402
from diffusers_parts import ATOL, DIM, SIZE, pipeline, random_embeds, tiny_sd3, tiny_sd3_transformer  # noqa: E402
from diffusers_parts import random_image as _image  # noqa: E402
from diffusers_parts import column_mask as _mask  # noqa: E402


def _sd3_16(in_channels: int = 16):
    """Tiny SD3 parts with 16 latent channels: StableDiffusion3InpaintPipeline accepts no other width (33 is an
    inpainting transformer that also reads the mask and the masked image)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    parts = tiny_sd3()
    parts.vae = AutoencoderKL(**{**{k: v for k, v in parts.vae.config.items() if not k.startswith("_")},
                                 "latent_channels": 16}).eval()
    cfg = {k: v for k, v in tiny_sd3_transformer().config.items() if not k.startswith("_")}
    torch.manual_seed(17)
    parts.transformer = SD3Transformer2DModel.from_config({**cfg, "in_channels": in_channels, "out_channels": 16}).eval()
    return parts


def _latent_mask(flow, mask):
    """1 where repainted, in the state layout (the test's own nearest-neighbour downsampling)."""
    f = flow.vae_scale_factor
    m = torch.as_tensor(np.asarray(mask) >= 128, dtype=torch.float32)[None, None, ::f, ::f]
    return flow.pack(m.repeat(1, flow.latent_channels(), 1, 1))[0]


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_flux_inpaint_reproduces_the_pipeline(flux, strength):
    pipe = pipeline(flux, "FluxInpaintPipeline")
    kw = dict(height=SIZE, width=SIZE, output_type="latent", image=_image(1), mask_image=_mask(slice(8, 24)),
              strength=strength, guidance_scale=3.5, **random_embeds(2, DIM, seed=2))
    theirs = pipe(num_inference_steps=5, generator=torch.Generator().manual_seed(3), **kw).images
    ours = gd.sample(pipe, method="ode", transitions=5, inner_steps=1, generator=torch.Generator().manual_seed(3),
                     **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_sd3_inpaint_with_cfg_and_a_mask_per_prompt_reproduces_the_pipeline():
    pipe = pipeline(_sd3_16(), "StableDiffusion3InpaintPipeline")
    kw = dict(height=SIZE, width=SIZE, output_type="latent", image=_image(4), mask_image=_mask(slice(0, 16), 2),
              strength=0.7, guidance_scale=4.0, **random_embeds(2, 16, seed=5, negative=True))
    theirs = pipe(num_inference_steps=4, generator=torch.Generator().manual_seed(6), **kw).images
    ours = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, generator=torch.Generator().manual_seed(6),
                     **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_glass_inpainting_keeps_the_image_where_the_mask_is_black(flux):
    """Every output equals the image's latents (one posterior draw) in the kept region, and differs from it in the
    repainted one; rows of a prompt differ from each other only there."""
    pipe = pipeline(flux, "FluxInpaintPipeline")
    flow = gd.as_flow(pipe)
    mask = _mask(slice(16, 32))
    out = gd.sample(pipe, image=_image(7), mask_image=mask, strength=0.8, num_images_per_prompt=3, height=SIZE,
                    width=SIZE, output_type="latent", transitions=3, inner_steps=3,
                    generator=torch.Generator().manual_seed(8), **random_embeds(1, DIM, seed=9))
    keep = _latent_mask(flow, mask) == 0
    assert keep.any() and (~keep).any()
    for row in out[1:]:
        torch.testing.assert_close(row[keep], out[0][keep], atol=1e-6, rtol=0)
        assert not torch.allclose(row[~keep], out[0][~keep])


@pytest.mark.parametrize("algorithm", ["fk", "beam"])
def test_steering_an_inpainting_keeps_the_image_in_every_particle(flux, algorithm):
    import diffusers

    class MyInpaint(diffusers.FluxInpaintPipeline):   # a subclass is read as the pipeline it extends
        pass
    pipe = MyInpaint(transformer=flux.transformer, scheduler=flux.scheduler, vae=flux.vae, text_encoder=None,
                     tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    flow = gd.as_flow(pipe)
    mask = _mask(slice(0, 8))
    _, res = gd.steer(pipe, reward=lambda images, prompts: images.mean(dim=(1, 2, 3)), particles=4, image=_image(10),
                   algorithm=algorithm,
                   mask_image=mask, height=SIZE, width=SIZE, output_type="latent", transitions=3, inner_steps=2,
                   generator=torch.Generator().manual_seed(11), **random_embeds(1, DIM, seed=12))
    keep = _latent_mask(flow, mask) == 0
    samples = res.samples[0]
    for particle in samples[1:]:
        torch.testing.assert_close(particle[keep], samples[0][keep], atol=1e-6, rtol=0)


def test_inpainting_inputs_are_named(flux):
    pipe = pipeline(flux, "FluxInpaintPipeline")
    kw = dict(height=SIZE, width=SIZE, output_type="latent", transitions=2, inner_steps=1,
              **random_embeds(2, DIM, seed=13))
    with pytest.raises(ValueError, match="inpainting needs image=.*missing: mask_image"):
        gd.sample(pipe, image=_image(14), **kw)
    with pytest.raises(ValueError, match="masked_image_latents= is not used by latent-blending inpainting"):
        gd.sample(pipe, image=_image(14), mask_image=_mask(slice(0, 8)),
                  masked_image_latents=torch.zeros(1, 16, 64), **kw)
    with pytest.raises(ValueError, match=r"mask_image holds 3 images; pass one, or one per prompt \(2\)"):
        gd.sample(pipe, image=_image(14), mask_image=_mask(slice(0, 8), 3), **kw)


def test_sd3_inpainting_transformers_reading_the_mask_are_refused():
    pipe = pipeline(_sd3_16(in_channels=33), "StableDiffusion3InpaintPipeline")
    with pytest.raises(ValueError, match="reads 17 input channels beyond the state's"):
        gd.sample(pipe, image=_image(15), mask_image=_mask(slice(0, 8)), height=SIZE, width=SIZE,
                  output_type="latent", transitions=2, inner_steps=1, **random_embeds(1, 16, seed=16))


# --------------------------------------------------------------------------------- FLUX.1 Control inpainting
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_flux_control_inpaint_reproduces_the_pipeline(flux_control, strength):
    """Two prompts, a control image each, one image and mask for both: the generator's draws in the pipeline's
    order (the masked image, which the transformer never reads, then the control images, the image, the noise)."""
    pipe = pipeline(flux_control, "FluxControlInpaintPipeline")
    kw = dict(height=SIZE, width=SIZE, output_type="latent", image=_image(20), mask_image=_mask(slice(4, 20)),
              control_image=_image(21, 2), strength=strength, guidance_scale=7.0, **random_embeds(2, DIM, seed=22))
    theirs = pipe(num_inference_steps=4, generator=torch.Generator().manual_seed(23), **kw).images
    ours = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, generator=torch.Generator().manual_seed(23),
                     **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_steering_a_control_inpainting_keeps_the_image_in_every_particle(flux_control):
    pipe = pipeline(flux_control, "FluxControlInpaintPipeline")
    flow = gd.as_flow(pipe)
    mask = _mask(slice(20, 32))
    _, res = gd.steer(pipe, reward=lambda images, prompts: images.mean(dim=(1, 2, 3)), particles=3, image=_image(24),
                      mask_image=mask, control_image=_image(25), strength=0.9, height=SIZE, width=SIZE,
                      output_type="latent", transitions=3, inner_steps=2, generator=torch.Generator().manual_seed(26),
                      **random_embeds(1, DIM, seed=27))
    keep = _latent_mask(flow, mask) == 0
    samples = res.samples[0]
    assert keep.any() and (~keep).any()
    for particle in samples[1:]:
        torch.testing.assert_close(particle[keep], samples[0][keep], atol=1e-6, rtol=0)


def test_control_inpainting_inputs_are_named(flux, flux_control):
    kw = dict(height=SIZE, width=SIZE, output_type="latent", transitions=2, inner_steps=1, image=_image(28),
              **random_embeds(1, DIM, seed=29))
    pipe = pipeline(flux_control, "FluxControlInpaintPipeline")
    with pytest.raises(ValueError, match="reads 16 input features per token beyond the state's and none were given: "
                                         "a FLUX.1 Canny / Depth \\(Control\\) model: pass control_image="):
        gd.sample(pipe, mask_image=_mask(slice(0, 8)), **kw)
    with pytest.raises(ValueError, match="inpainting needs image=.*missing: mask_image"):
        gd.sample(pipe, control_image=_image(30), **kw)
    with pytest.raises(ValueError, match="masked_image_latents= is not used by latent-blending inpainting"):
        gd.sample(pipe, control_image=_image(30), mask_image=_mask(slice(0, 8)),
                  masked_image_latents=torch.zeros(1, 64, 32), **kw)
    with pytest.raises(ValueError, match="control_image needs a FLUX.1 Control transformer reading 16 input features"):
        gd.sample(pipeline(flux, "FluxControlInpaintPipeline"), control_image=_image(30), mask_image=_mask(slice(0, 8)),
                  **kw)


# ---------------------------------------------------------------------------------------- FLUX.2 Klein inpainting
def _klein_inpaint(parts, **config):
    from diffusers_parts import flux2_pipeline
    return flux2_pipeline(parts, "Flux2KleinInpaintPipeline", **config)


@pytest.mark.parametrize("strength,guidance_scale,per_prompt", [(0.7, 3.0, False), (1.0, 1.0, True)])
def test_flux2_klein_inpaint_reproduces_the_pipeline(klein, strength, guidance_scale, per_prompt):
    """Two prompts: one PIL image and mask for both, two images each, with classifier-free guidance (the mask's
    edges inside a token are blended softly, as the pipeline's bilinear mask is); or an image and a uint8 mask
    array per prompt without guidance (the pipeline's bilinear mask is then rounded in uint8)."""
    from PIL import Image

    from diffusers_parts import flux2_embeds
    pipe = _klein_inpaint(klein)
    if per_prompt:
        images, masks, n = _image(40, 2), _mask(slice(6, 22), 2), 1
    else:
        images, masks, n = Image.fromarray(_image(40)), Image.fromarray(_mask(slice(6, 22))), 2
    kw = dict(output_type="latent", image=images, mask_image=masks, strength=strength, guidance_scale=guidance_scale,
              num_images_per_prompt=n, **flux2_embeds(2, seed=41, negative=guidance_scale > 1))
    theirs = pipe(num_inference_steps=4, generator=torch.Generator().manual_seed(42), **kw).images
    ours = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, generator=torch.Generator().manual_seed(42),
                     **kw)
    assert ours.shape[0] == 2 * n
    torch.testing.assert_close(gd.as_flow(pipe).to_vae(ours, SIZE, SIZE), theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("references", [1, 2])
def test_flux2_klein_inpaint_with_reference_images_reproduces_the_pipeline(klein, references):
    """image_reference: one image, or two read as a sequence (after the edited image's own tokens); the
    references change the result."""
    from PIL import Image

    from diffusers_parts import flux2_embeds
    pipe = _klein_inpaint(klein)
    rng = np.random.default_rng(43)
    refs = [Image.fromarray((rng.random((40, 24, 3)) * 255).astype(np.uint8)) for _ in range(references)]
    kw = dict(output_type="latent", image=_image(44), mask_image=_mask(slice(0, 12)), strength=0.8,
              guidance_scale=2.5, **flux2_embeds(1, seed=45, negative=True))
    theirs = pipe(num_inference_steps=3, generator=torch.Generator().manual_seed(46),
                  image_reference=refs if references > 1 else refs[0], **kw).images
    run = dict(method="ode", transitions=3, inner_steps=1, **kw)
    ours = gd.sample(pipe, generator=torch.Generator().manual_seed(46), image_reference=refs, **run)
    torch.testing.assert_close(gd.as_flow(pipe).to_vae(ours, SIZE, SIZE), theirs, atol=ATOL, rtol=0)
    plain = gd.sample(pipe, generator=torch.Generator().manual_seed(46), **run)
    assert (plain - ours).abs().max() > 100 * ATOL


def test_steering_a_klein_inpainting_keeps_the_image_in_every_particle(klein):
    """The kept tokens (mask black over their whole patch) of every particle are the image's latents, the
    posterior's mean, normalised; the repainted ones are generated."""
    from diffusers_parts import flux2_embeds
    pipe = _klein_inpaint(klein)
    flow = gd.as_flow(pipe)
    mask = _mask(slice(0, 12))
    _, res = gd.steer(pipe, reward=lambda images, prompts: images.mean(dim=(1, 2, 3)), particles=3, image=_image(47),
                      mask_image=mask, strength=0.9, output_type="latent", transitions=3, inner_steps=2,
                      generator=torch.Generator().manual_seed(48), **flux2_embeds(1, seed=49, negative=True))
    f = flow.patch_pixels
    keep = torch.as_tensor(mask[::f, ::f] == 0).reshape(-1)
    pixels = gd.image_processor(flow).preprocess(_image(47), height=SIZE, width=SIZE)
    z = flow.encode_images(pixels, mean=True)[0]
    assert keep.any() and (~keep).any()
    for particle in res.samples[0]:
        torch.testing.assert_close(particle[keep], z[keep], atol=1e-5, rtol=0)
        assert (particle[~keep] - z[~keep]).abs().max() > 0.1


def test_klein_inpainting_inputs_are_named(klein, flux):
    from PIL import Image

    from diffusers_parts import flux2_embeds
    pipe = _klein_inpaint(klein)
    kw = dict(output_type="latent", transitions=2, inner_steps=1, image=_image(50), mask_image=_mask(slice(0, 8)),
              **flux2_embeds(2, seed=51, negative=True))
    with pytest.raises(ValueError, match=r"height=64: Flux2KleinInpaintPipeline generates at its image's size, "
                                         r"32 x 32 pixels here"):
        gd.sample(pipe, height=64, **kw)
    with pytest.raises(ValueError, match="context_image: Flux2KleinInpaintPipeline's reference images are "
                                         "image_reference="):
        gd.sample(pipe, context_image=Image.fromarray(_image(52)), **kw)
    with pytest.raises(ValueError, match="image_reference holds 2 images, as many as the rows generated"):
        gd.sample(pipe, image_reference=[Image.fromarray(_image(52))] * 2, **kw)
    with pytest.raises(ValueError, match=r"image must be images .*got a Tensor of shape \(1, 16, 8, 8\)"):
        gd.sample(pipe, **{**kw, "image": torch.zeros(1, 16, 8, 8)})
    with pytest.raises(ValueError, match="inpainting needs image=.*missing: mask_image"):
        gd.sample(pipe, **{**kw, "mask_image": None})
    with pytest.raises(ValueError, match="padding_mask_crop needs image as one PIL image, as "
                                         "Flux2KleinInpaintPipeline does; got ndarray"):
        gd.sample(pipe, padding_mask_crop=4, **kw)
    distilled = _klein_inpaint(klein, is_distilled=True)
    with pytest.raises(ValueError, match="step-wise distilled"):
        gd.sample(distilled, guidance_scale=4.0, **kw)
    with pytest.raises(ValueError, match="image_reference is the reference image of Flux2KleinInpaintPipeline"):
        gd.sample(pipeline(flux, "FluxInpaintPipeline"), image_reference=_image(52), height=SIZE, width=SIZE,
                  output_type="latent", transitions=2, inner_steps=1, image=_image(50), mask_image=_mask(slice(0, 8)),
                  **random_embeds(1, DIM))


# ----------------------------------------------------------------------------------------- FLUX.1 Kontext inpainting
def _pil(seed: int, count: int = 1, size: tuple = (SIZE, SIZE)):
    from PIL import Image
    rng = np.random.default_rng(seed)
    images = [Image.fromarray((rng.random(size + (3,)) * 255).astype(np.uint8)) for _ in range(count)]
    return images[0] if count == 1 else images


@pytest.mark.parametrize("strength,reference", [(0.6, False), (1.0, False), (0.75, True)])
def test_flux_kontext_inpaint_reproduces_the_pipeline(flux, strength, reference):
    """Two prompts, an image and a mask each, true classifier-free guidance; the transformer's Kontext tokens
    are the image's own, or image_reference's (of another size), which change the result."""
    pipe = pipeline(flux, "FluxKontextInpaintPipeline")
    kw = dict(output_type="latent", image=_pil(60, 2), mask_image=_mask(slice(8, 20), 2), strength=strength,
              true_cfg_scale=2.0, guidance_scale=3.0, **random_embeds(2, DIM, seed=61, negative=True))
    if reference:
        kw["image_reference"] = _pil(62, size=(24, 40))
    theirs = pipe(num_inference_steps=4, generator=torch.Generator().manual_seed(63), _auto_resize=False, **kw).images
    run = dict(method="ode", transitions=4, inner_steps=1, context_auto_resize=False, **kw)
    ours = gd.sample(pipe, generator=torch.Generator().manual_seed(63), **run)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    if reference:
        plain = gd.sample(pipe, generator=torch.Generator().manual_seed(63), **{**run, "image_reference": None})
        assert (plain - ours).abs().max() > 100 * ATOL


def test_steering_a_kontext_inpainting_keeps_the_image_in_every_particle(flux):
    """The kept region of every particle is the image's latents (the posterior's mean); beam search too."""
    pipe = pipeline(flux, "FluxKontextInpaintPipeline")
    flow = gd.as_flow(pipe)
    mask = _mask(slice(0, 16))
    pixels = gd.image_processor(flow).preprocess(_pil(64), height=SIZE, width=SIZE)
    z = flow.encode_images(pixels, mean=True)[0]
    keep = _latent_mask(flow, mask) == 0
    assert keep.any() and (~keep).any()
    for algorithm in ("fk", "beam"):
        _, res = gd.steer(pipe, reward=lambda images, prompts: images.mean(dim=(1, 2, 3)), particles=3,
                          image=_pil(64), mask_image=mask, strength=0.9, context_auto_resize=False, algorithm=algorithm,
                          output_type="latent", transitions=3, inner_steps=2,
                          generator=torch.Generator().manual_seed(65), **random_embeds(1, DIM, seed=66))
        for particle in res.samples[0]:
            torch.testing.assert_close(particle[keep], z[keep], atol=1e-5, rtol=0)
            assert (particle[~keep] - z[~keep]).abs().max() > 0.1


def test_kontext_inpainting_inputs_are_named(flux):
    pipe = pipeline(flux, "FluxKontextInpaintPipeline")
    kw = dict(output_type="latent", transitions=2, inner_steps=1, image=_pil(67), mask_image=_mask(slice(0, 8)),
              **random_embeds(1, DIM, seed=68))
    with pytest.raises(ValueError, match=r"height=32: FluxKontextInpaintPipeline generates at its image's size, "
                                         r"1024 x 1024 pixels here \(Kontext's preferred resolution"):
        gd.sample(pipe, height=SIZE, width=SIZE, **kw)
    with pytest.raises(ValueError, match=r"width=64: .* 32 x 32 pixels here \(rounded down to multiples of 4\)"):
        gd.sample(pipe, width=64, context_auto_resize=False, **kw)
    with pytest.raises(ValueError, match="context_image: FluxKontextInpaintPipeline's reference images are "
                                         "image_reference="):
        gd.sample(pipe, context_image=_pil(69), context_auto_resize=False, **kw)
    with pytest.raises(ValueError, match=r"image_reference must be images .*got a Tensor of shape \(1, 4, 16, 16\)"):
        gd.sample(pipe, image_reference=torch.zeros(1, 4, 16, 16), context_auto_resize=False, **kw)
    with pytest.raises(ValueError, match=r"image_reference holds 3 images; pass one, or one per prompt \(1\)"):
        gd.sample(pipe, image_reference=_pil(69, 3), context_auto_resize=False, **kw)
    with pytest.raises(ValueError, match="masked_image_latents= is not used by latent-blending inpainting"):
        gd.sample(pipe, masked_image_latents=torch.zeros(1, 64, 16), context_auto_resize=False, **kw)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_area'"):
        gd.sample(pipe, max_area=SIZE * SIZE, context_auto_resize=False, **kw)


def test_inpainting_defaults_are_the_pipelines(flux_control, klein, flux):
    """strength and guidance_scale left unset: FluxControlInpaintPipeline's 0.6 and 7.0, Flux2KleinInpaintPipeline's
    0.8 and 8.0, FluxKontextInpaintPipeline's 1.0 (and 3.5)."""
    from diffusers_parts import flux2_embeds
    cases = [(pipeline(flux_control, "FluxControlInpaintPipeline"), dict(control_image=_image(70)),
              random_embeds(1, DIM, seed=71)),
             (_klein_inpaint(klein), {}, flux2_embeds(1, seed=72, negative=True)),
             (pipeline(flux, "FluxKontextInpaintPipeline"), {}, random_embeds(1, DIM, seed=73))]
    for pipe, extra, emb in cases:
        kw = dict(output_type="latent", image=_pil(74), mask_image=_mask(slice(4, 28)), **extra, **emb)
        ours_kw = dict(kw, context_auto_resize=False) if "Kontext" in type(pipe).__name__ else kw
        theirs_kw = dict(kw, _auto_resize=False) if "Kontext" in type(pipe).__name__ else dict(kw)
        if "Klein" not in type(pipe).__name__:
            theirs_kw.update(height=SIZE, width=SIZE)
            ours_kw = dict(ours_kw, height=SIZE, width=SIZE)
        theirs = pipe(num_inference_steps=5, generator=torch.Generator().manual_seed(75), **theirs_kw).images
        ours = gd.sample(pipe, method="ode", transitions=5, inner_steps=1, generator=torch.Generator().manual_seed(75),
                         **ours_kw)
        if "Klein" in type(pipe).__name__:
            ours = gd.as_flow(pipe).to_vae(ours, SIZE, SIZE)
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0, msg=type(pipe).__name__)


def test_a_callers_project_hook_runs_after_the_inpainting_blend(flux):
    """sample / steer take project=: after every transition, on the blended state (prompt-major rows)."""
    pipe = pipeline(flux, "FluxInpaintPipeline")
    flow = gd.as_flow(pipe)
    mask = _mask(slice(8, 24))
    keep = _latent_mask(flow, mask) == 0
    seen = []

    def clamp(k, t, x):
        seen.append((k, x.shape[0], bool(torch.equal(x[0][keep], x[1][keep]))))   # blended at t = 1: rows agree
        return x.clamp(-0.5, 0.5)
    kw = dict(image=_image(20), mask_image=mask, strength=1.0, num_images_per_prompt=2, height=SIZE, width=SIZE,
              output_type="latent", transitions=3, inner_steps=2, **random_embeds(1, DIM, seed=21))
    out = gd.sample(pipe, project=clamp, generator=torch.Generator().manual_seed(22), **kw)
    assert [(k, n) for k, n, _ in seen] == [(1, 2), (2, 2), (3, 2)] and seen[-1][2]
    assert out.abs().max() <= 0.5
    _, res = gd.steer(pipe, reward=lambda images, prompts: images.mean(dim=(1, 2, 3)), particles=2, project=clamp,
                      generator=torch.Generator().manual_seed(22), **{k: v for k, v in kw.items()
                                                                      if k != "num_images_per_prompt"})
    assert res.samples.abs().max() <= 0.5
    with pytest.raises(TypeError, match="project must be None or callable"):
        gd.sample(pipe, project="clamp", **kw)


def test_project_reaches_plain_text_to_image_sampling(flux):
    out = gd.sample(flux, project=lambda k, t, x: torch.zeros_like(x), height=SIZE, width=SIZE,
                    output_type="latent", transitions=2, inner_steps=1, **random_embeds(1, DIM, seed=23))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("algorithm,extra", [("beam", {"expansions": 2}), ("fk", {"potential": "value",
                                                                                  "value_samples": 2})])
def test_per_prompt_images_and_masks_with_beam_search_and_value_estimates(flux, algorithm, extra):
    """Beam children and value draws repeat the rows; each prompt's image and mask follow them."""
    pipe = pipeline(flux, "FluxInpaintPipeline")
    flow = gd.as_flow(pipe)
    masks = _mask(slice(0, 8), 2)
    _, res = gd.steer(pipe, reward=lambda images, prompts: images.mean(dim=(1, 2, 3)), particles=2,
                      image=_image(40, 2), mask_image=masks, algorithm=algorithm, height=SIZE, width=SIZE,
                      output_type="latent", transitions=3, inner_steps=2, generator=torch.Generator().manual_seed(41),
                      **random_embeds(2, DIM, seed=42), **extra)
    for p in range(2):
        keep = _latent_mask(flow, masks[p]) == 0
        torch.testing.assert_close(res.samples[p, 1][keep], res.samples[p, 0][keep], atol=1e-6, rtol=0)
    assert not torch.allclose(res.samples[0, 0][keep], res.samples[1, 0][keep])   # each prompt kept its own image
