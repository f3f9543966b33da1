"""Images as inputs through the diffusers integration on tiny random FLUX / SD3 parts, against diffusers' own
pipelines: image-to-image (``image=``, ``strength=``) and FLUX.1 Kontext's reference image (``context_image=``)."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from glass_fast.integrations import diffusers as gd  # noqa: E402
from diffusers_parts import ATOL, DIM, SIZE, pipeline, random_embeds  # noqa: E402
from diffusers_parts import random_image as _image  # noqa: E402


@pytest.mark.parametrize("strength", [0.6, 0.3])
def test_flux_img2img_reproduces_the_pipeline(flux, strength):
    pipe = pipeline(flux, "FluxImg2ImgPipeline")
    emb, image = random_embeds(1, DIM, seed=1), _image(2)
    # guidance_scale named: FluxImg2ImgPipeline's default (7.0) is not FluxPipeline's (3.5).
    kw = dict(height=SIZE, width=SIZE, output_type="latent", image=image, strength=strength, guidance_scale=3.5,
              **emb)
    theirs = pipe(num_inference_steps=5, generator=torch.Generator().manual_seed(3), **kw).images
    ours = gd.sample(pipe, method="ode", transitions=5, inner_steps=1, generator=torch.Generator().manual_seed(3),
                     **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_sd3_img2img_with_cfg_reproduces_the_pipeline(sd3):
    pipe = pipeline(sd3, "StableDiffusion3Img2ImgPipeline")
    emb = random_embeds(2, 16, seed=4, negative=True)    # two prompts sharing one image
    kw = dict(height=SIZE, width=SIZE, output_type="latent", image=_image(5), strength=0.5, guidance_scale=4.0,
              **emb)
    theirs = pipe(num_inference_steps=4, generator=torch.Generator().manual_seed(6), **kw).images
    ours = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, generator=torch.Generator().manual_seed(6),
                     **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_start_states_mix_each_prompts_image_with_the_noise(flux):
    """Two prompts with an image each: every row starts at t0 z + (1 - t0) eps with its own prompt's z."""
    from diffusers.image_processor import VaeImageProcessor
    flow = gd.as_flow(flux)
    emb, images = random_embeds(2, DIM, seed=7), _image(8, count=2)
    seen = {}

    def first_state(k, t, x, x0):
        if k == 0:
            seen.update(t=t, x=x.clone())

    out = gd.sample(flux, image=images, strength=0.5, transitions=4, inner_steps=2, num_images_per_prompt=3,
                    height=SIZE, width=SIZE, output_type="latent", callback=first_state,
                    generator=torch.Generator().manual_seed(9), **emb)
    g = torch.Generator().manual_seed(9)
    z = flow.encode_images(VaeImageProcessor(vae_scale_factor=flow.vae_scale_factor).preprocess(images), g)
    noise = flow.noise(6, SIZE, SIZE, g)
    grid = flow.time_grid(4, SIZE, SIZE)
    assert seen["t"] == pytest.approx(float(grid[2]))        # int(4 * (1 - 0.5)) = 2 transitions skipped
    t0 = seen["t"]
    torch.testing.assert_close(seen["x"], t0 * z.repeat_interleave(3, dim=0) + (1 - t0) * noise, atol=1e-6, rtol=0)
    assert out.shape == noise.shape and torch.isfinite(out).all()


def test_strength_one_starts_from_pure_noise(flux):
    emb = random_embeds(1, DIM, seed=10)
    lat = gd.as_flow(flux).noise(2, SIZE, SIZE, torch.Generator().manual_seed(11))
    kw = dict(method="ode", transitions=3, inner_steps=1, num_images_per_prompt=2, height=SIZE, width=SIZE,
              output_type="latent", latents=lat, **emb)
    torch.testing.assert_close(gd.sample(flux, image=_image(12), strength=1.0, **kw), gd.sample(flux, **kw),
                               atol=1e-6, rtol=0)


def test_steering_an_image_edit(flux):
    emb = random_embeds(1, DIM, seed=13)
    reward = lambda images, prompts: images[:, 0].mean((1, 2))  # noqa: E731
    images, result = gd.steer(flux, reward=reward, particles=3, transitions=4, inner_steps=2, image=_image(14),
                              strength=0.5, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(15),
                              **emb)
    assert images.shape == (1, 3, SIZE, SIZE) and torch.isfinite(result.samples).all()
    assert result.nfe == 2 * 2        # two transitions run (half the schedule), two calls each


def test_img2img_errors_are_named(flux):
    kw = dict(height=SIZE, width=SIZE, transitions=2, inner_steps=1, output_type="latent", **random_embeds(2, DIM))
    for bad in (0, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="strength must be a number in \\(0, 1\\]"):
            gd.sample(flux, image=_image(1), strength=bad, **kw)
    with pytest.raises(ValueError, match=r"strength=0.5 applies to image-to-image: pass image= too"):
        gd.sample(flux, strength=0.5, **kw)
    kontext = pipeline(flux, "FluxKontextPipeline")
    with pytest.raises(ValueError, match=r"strength=0.5 applies to image-to-image, but image= is FLUX.1 Kontext"):
        gd.sample(kontext, image=_pil(1), strength=0.5, **kw)
    with pytest.raises(ValueError, match=r"image holds 3 images; pass one, or one per prompt \(2\)"):
        gd.sample(flux, image=_image(1, count=3), **kw)
    no_vae = types.SimpleNamespace(transformer=flux.transformer, scheduler=flux.scheduler, vae=None)
    with pytest.raises(ValueError, match="encoding an image needs a VAE"):
        gd.sample(no_vae, image=_image(1), **kw)


# ------------------------------------------------------------------------------- FLUX.1 Kontext reference images
def _pil(seed: int, count: int = 1):
    from PIL import Image
    images = _image(seed, count)
    return Image.fromarray(images) if count == 1 else [Image.fromarray(a) for a in images]


@pytest.mark.parametrize("true_cfg", [1.0, 2.0])
def test_kontext_reference_image_reproduces_the_pipeline(flux, true_cfg):
    """FluxKontextPipeline's image: VAE-mean tokens appended to every transformer call, read on the image's
    own tokens. The pipeline rescales height/width to max_area (here the same size) and may resize the image
    to Kontext's preferred resolutions (off here: a tiny model)."""
    pipe = pipeline(flux, "FluxKontextPipeline")
    emb = random_embeds(1, DIM, seed=50, negative=true_cfg > 1)
    lat = gd.as_flow(pipe).noise(2, SIZE, SIZE, torch.Generator().manual_seed(51))
    kw = dict(height=SIZE, width=SIZE, output_type="latent", guidance_scale=2.5, num_images_per_prompt=2,
              true_cfg_scale=true_cfg, **emb)
    image = _pil(52)
    theirs = pipe(image=image, num_inference_steps=3, latents=lat.clone(), max_area=SIZE * SIZE, _auto_resize=False,
                  **kw).images
    ours = gd.sample(pipe, image=image, context_auto_resize=False, method="ode", transitions=3, inner_steps=1,
                     latents=lat, **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    through_adapter = gd.sample(gd.as_flow(pipe), image=image, context_auto_resize=False, method="ode",
                                transitions=3, inner_steps=1, latents=lat, **kw)
    torch.testing.assert_close(through_adapter, ours, atol=0, rtol=0)
    # The same through context_image= on any FLUX pipeline; without the reference the field differs.
    plain = pipeline(flux, "FluxPipeline")
    again = gd.sample(plain, context_image=image, context_auto_resize=False, method="ode", transitions=3,
                      inner_steps=1, latents=lat, **kw)
    torch.testing.assert_close(again, ours, atol=0, rtol=0)
    without = gd.sample(plain, method="ode", transitions=3, inner_steps=1, latents=lat, **kw)
    assert (without - ours).abs().max() > 100 * ATOL


def test_kontext_reference_images_per_prompt_and_errors(flux, sd3, monkeypatch):
    from PIL import Image

    from glass_fast.integrations.diffusers_conditioning import context_tokens
    flow = gd.as_flow(flux)
    images = _pil(53, count=2)
    tokens, ids = context_tokens(flow, images, 2, auto_resize=False)
    assert tokens.shape == (2, (SIZE // 4) ** 2, 16) and ids.shape == ((SIZE // 4) ** 2, 3)
    assert torch.all(ids[:, 0] == 1) and not torch.equal(tokens[0], tokens[1])
    # Auto-resize picks the preferred (width, height) closest in aspect ratio (small ones here: the real list
    # starts at 672 px, too slow for a tiny CPU VAE): a 40 x 16 image (2.5) goes to 48 x 16 (3).
    import diffusers.pipelines.flux.pipeline_flux_kontext as kontext
    monkeypatch.setattr(kontext, "PREFERRED_KONTEXT_RESOLUTIONS", [(16, 48), (32, 32), (48, 16)])
    wide = Image.fromarray((np.random.default_rng(54).random((16, 40, 3)) * 255).astype(np.uint8))
    resized, resized_ids = context_tokens(flow, wide, 1)
    assert resized.shape == (1, (16 // 4) * (48 // 4), 16)
    assert int(resized_ids[:, 1].max()) == 16 // 4 - 1 and int(resized_ids[:, 2].max()) == 48 // 4 - 1
    with pytest.raises(ValueError, match=r"context_image holds 3 images; pass one, or one per prompt \(2\)"):
        context_tokens(flow, _pil(1, count=3), 2, auto_resize=False)
    bad = torch.full((1, 3, SIZE, SIZE), 0.5)
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="context_image holds NaN or Inf values"):
        context_tokens(flow, bad, 1, auto_resize=False)
    with pytest.raises(ValueError, match="needs a FLUX transformer"):
        context_tokens(gd.as_flow(sd3), _pil(1), 1)
    # Steering an edit: every particle of a prompt sees that prompt's reference image.
    reward = lambda im, p: im[:, 0].mean((1, 2))  # noqa: E731
    best, res = gd.steer(pipeline(flux, "FluxKontextPipeline"), reward=reward, image=images, context_auto_resize=False,
                         particles=2, transitions=2, inner_steps=2, height=SIZE, width=SIZE,
                         generator=torch.Generator().manual_seed(55), **random_embeds(2, DIM))
    assert best.shape == (2, 3, SIZE, SIZE) and torch.isfinite(res.samples).all() and res.nfe == 4
    with pytest.raises(ValueError, match="pass FLUX.1 Kontext's reference image once"):
        gd.sample(pipeline(flux, "FluxKontextPipeline"), image=_pil(1), context_image=_pil(2), height=SIZE,
                  width=SIZE, **random_embeds(1, DIM))


@pytest.mark.parametrize("cls", ["FluxImg2ImgPipeline", "FluxInpaintPipeline"])
def test_unset_guidance_and_strength_are_the_pipelines_defaults(flux, cls):
    """guidance_scale unset: the pipeline's own default (7.0 here, not FluxPipeline's 3.5), as diffusers runs it."""
    pipe = pipeline(flux, cls)
    kw = dict(height=SIZE, width=SIZE, output_type="latent", image=_image(30), **random_embeds(1, DIM, seed=31))
    if cls == "FluxInpaintPipeline":
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        mask[:, 8:] = 255
        kw["mask_image"] = mask
    theirs = pipe(num_inference_steps=4, generator=torch.Generator().manual_seed(32), **kw).images
    ours = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, generator=torch.Generator().manual_seed(32),
                     **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    at_35 = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, guidance_scale=3.5,
                      generator=torch.Generator().manual_seed(32), **kw)
    assert not torch.allclose(at_35, theirs, atol=ATOL, rtol=0)
