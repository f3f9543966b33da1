"""Image-to-image through the diffusers integration (``image=``, ``strength=``) on tiny random FLUX / SD3 parts,
against diffusers' own img2img pipelines."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from glass_fast.integrations import diffusers as gd  # noqa: E402
from diffusers_parts import ATOL, DIM, SIZE, pipeline, random_embeds  # noqa: E402


def _image(seed: int, count: int = 1):
    rng = np.random.default_rng(seed)
    images = [(rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8) for _ in range(count)]
    return images[0] if count == 1 else images


@pytest.mark.parametrize("strength", [0.6, 0.3])
def test_flux_img2img_reproduces_thepipeline(flux, strength):
    pipe = pipeline(flux, "FluxImg2ImgPipeline")
    emb, image = random_embeds(1, DIM, seed=1), _image(2)
    # guidance_scale named: FluxImg2ImgPipeline's default (7.0) is not FluxPipeline's (3.5).
    kw = dict(height=SIZE, width=SIZE, output_type="latent", image=image, strength=strength, guidance_scale=3.5,
              **emb)
    theirs = pipe(num_inference_steps=5, generator=torch.Generator().manual_seed(3), **kw).images
    ours = gd.sample(pipe, method="ode", transitions=5, inner_steps=1, generator=torch.Generator().manual_seed(3),
                     **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_sd3_img2img_with_cfg_reproduces_thepipeline(sd3):
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
    with pytest.raises(ValueError, match=r"image holds 3 images; pass one, or one per prompt \(2\)"):
        gd.sample(flux, image=_image(1, count=3), **kw)
    no_vae = types.SimpleNamespace(transformer=flux.transformer, scheduler=flux.scheduler, vae=None)
    with pytest.raises(ValueError, match="encoding an image needs a VAE"):
        gd.sample(no_vae, image=_image(1), **kw)
