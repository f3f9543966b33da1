"""FLUX.1 Fill (inpainting) and FLUX.1 Control (Canny / Depth) through the diffusers integration on tiny random
parts, against diffusers' FluxFillPipeline, FluxControlPipeline and FluxControlImg2ImgPipeline: a condition
concatenated to the state along features in every transformer call."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from glass_fast.integrations import diffusers as gd  # noqa: E402
from glass_fast.integrations.diffusers_channels import control_latents, fill_latents  # noqa: E402
from diffusers_parts import (ATOL, DIM, SIZE, pipeline, random_embeds, sharpen_posterior,  # noqa: E402
                             tiny_flux, tiny_flux_channels_transformer)
from diffusers_parts import random_image as _image  # noqa: E402

ODE = dict(method="ode", inner_steps=1, height=SIZE, width=SIZE, output_type="latent")


def _mask(seed: int, count: int = 1):
    from PIL import Image
    rng = np.random.default_rng(seed)
    masks = [Image.fromarray(((rng.random((SIZE, SIZE)) > 0.5) * 255).astype(np.uint8)) for _ in range(count)]
    return masks[0] if count == 1 else masks


def _per_row(embeds: dict, n: int) -> dict:
    """The prompts' embeddings once per generated image: diffusers' FLUX pipelines do not repeat given
    prompt_embeds for num_images_per_prompt, so the pipelines get one prompt row per image."""
    return {k: v.repeat_interleave(n, dim=0) for k, v in embeds.items()}


def _gen(seed: int):
    return torch.Generator().manual_seed(seed)


def _sharp(extra: int, seed: int):
    """Parts whose VAE posterior is (numerically) its mean: the pipelines draw the condition once per
    generated image, glass_fast once per prompt."""
    parts = tiny_flux(tiny_flux_channels_transformer(extra, seed=seed))
    sharpen_posterior(parts.vae)
    return parts


# ------------------------------------------------------------------------------------------------ FLUX.1 Fill
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_fill_reproduces_the_pipeline(flux_fill, strength):
    """Two prompts, two images each, one image and mask for all; the generator's draws in the pipeline's
    order (start image, noise, masked image). A different mask changes the result."""
    pipe = pipeline(flux_fill, "FluxFillPipeline")
    emb = random_embeds(2, DIM, seed=1)
    kw = dict(height=SIZE, width=SIZE, output_type="latent", image=_image(2), strength=strength)
    theirs = pipe(num_inference_steps=4, generator=_gen(3), mask_image=_mask(3), **kw, **_per_row(emb, 2)).images
    ours = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, generator=_gen(3), mask_image=_mask(3),
                     num_images_per_prompt=2, **kw, **emb)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    other = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, generator=_gen(3), mask_image=_mask(4),
                      num_images_per_prompt=2, **kw, **emb)
    assert (other - ours).abs().max() > 100 * ATOL


def test_fill_per_prompt_images_reproduce_the_pipeline(flux_fill):
    pipe = pipeline(flux_fill, "FluxFillPipeline")
    emb = random_embeds(2, DIM, seed=5)
    kw = dict(height=SIZE, width=SIZE, output_type="latent", image=_image(6, 2), mask_image=_mask(7, 2),
              guidance_scale=12.0, **emb)
    theirs = pipe(num_inference_steps=3, generator=_gen(8), **kw).images
    ours = gd.sample(pipe, method="ode", transitions=3, inner_steps=1, generator=_gen(8), **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    # FluxFillPipeline's default guidance_scale (30) is the default here too.
    kw.pop("guidance_scale")
    theirs = pipe(num_inference_steps=3, generator=_gen(8), **kw).images
    ours = gd.sample(pipe, method="ode", transitions=3, inner_steps=1, generator=_gen(8), **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_fill_per_prompt_images_with_images_per_prompt():
    """Each row gets its own prompt's image and mask. (diffusers' FluxFillPipeline tiles per-prompt images
    over num_images_per_prompt rows, giving row r image r % P, so it is given one image per row here.)"""
    parts = _sharp(32, seed=4)
    pipe = pipeline(parts, "FluxFillPipeline")
    emb, images, masks = random_embeds(2, DIM, seed=9), _image(10, 2), _mask(11, 2)
    lat = gd.as_flow(pipe).noise(4, SIZE, SIZE, _gen(12))
    kw = dict(height=SIZE, width=SIZE, output_type="latent")
    theirs = pipe(num_inference_steps=3, generator=_gen(13), latents=lat.clone(), mask_image=[masks[0]] * 2 +
                  [masks[1]] * 2, image=[images[0]] * 2 + [images[1]] * 2, **kw, **_per_row(emb, 2)).images
    ours = gd.sample(pipe, transitions=3, generator=_gen(13), latents=lat, image=images, mask_image=masks,
                     num_images_per_prompt=2, **ODE, **emb)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_masked_image_latents_are_the_condition(flux_fill):
    """masked_image_latents= (the packed masked-image latents and mask) gives what image= and mask_image= give;
    with given latents at strength 1 the masked image is the generator's first draw."""
    pipe = pipeline(flux_fill, "FluxFillPipeline")
    flow, emb = gd.as_flow(pipe), random_embeds(1, DIM, seed=14)
    lat = flow.noise(2, SIZE, SIZE, _gen(15))
    kw = dict(transitions=2, latents=lat, num_images_per_prompt=2, **ODE, **emb)
    cond = fill_latents(flow, _image(16), _mask(17), 1, SIZE, SIZE, _gen(18))
    assert cond.shape == (1, (SIZE // 4) ** 2, 32)
    with_images = gd.sample(pipe, image=_image(16), mask_image=_mask(17), generator=_gen(18), **kw)
    torch.testing.assert_close(gd.sample(pipe, masked_image_latents=cond, **kw), with_images, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------- FLUX.1 Control
@pytest.mark.parametrize("control", ["one", "per_prompt", "tensor"])
def test_control_reproduces_the_pipeline(flux_control, control):
    """Two prompts; one control image for both, one each, or a pixel Tensor in [-1, 1] (taken as given)."""
    pipe = pipeline(flux_control, "FluxControlPipeline")
    emb = random_embeds(2, DIM, seed=19)
    image = {"one": _image(20), "per_prompt": _image(21, 2),
             "tensor": torch.rand(2, 3, SIZE, SIZE, generator=_gen(22)) * 2 - 1}[control]
    kw = dict(height=SIZE, width=SIZE, output_type="latent", control_image=image, guidance_scale=10.0, **emb)
    theirs = pipe(num_inference_steps=4, generator=_gen(23), **kw).images
    ours = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, generator=_gen(23), **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    kw["control_image"] = _image(24)
    assert (gd.sample(pipe, method="ode", transitions=4, inner_steps=1, generator=_gen(23), **kw)
            - ours).abs().max() > 100 * ATOL


def test_control_with_images_per_prompt_and_packed_latents():
    parts = _sharp(16, seed=5)
    pipe = pipeline(parts, "FluxControlPipeline")
    flow, emb, images = gd.as_flow(pipe), random_embeds(2, DIM, seed=25), _image(26, 2)
    lat = flow.noise(4, SIZE, SIZE, _gen(27))
    theirs = pipe(num_inference_steps=3, latents=lat.clone(), control_image=[images[0]] * 2 + [images[1]] * 2,
                  height=SIZE, width=SIZE, output_type="latent", **_per_row(emb, 2)).images
    kw = dict(transitions=3, latents=lat, num_images_per_prompt=2, **ODE, **emb)
    ours = gd.sample(pipe, control_image=images, **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    packed = control_latents(flow, images, 2, SIZE, SIZE, _gen(39))   # packed latents [P, L, 4C]: used as given
    assert packed.shape == (2, (SIZE // 4) ** 2, 16)
    again = gd.sample(pipe, control_image=images, generator=_gen(39), **kw)
    torch.testing.assert_close(gd.sample(pipe, control_image=packed, **kw), again, atol=1e-6, rtol=0)


def test_control_img2img_reproduces_the_pipeline(flux_control):
    """FluxControlImg2ImgPipeline: image= and strength= as image-to-image, control_image= as Control."""
    pipe = pipeline(flux_control, "FluxControlImg2ImgPipeline")
    kw = dict(height=SIZE, width=SIZE, output_type="latent", image=_image(28), control_image=_image(29),
              strength=0.6, guidance_scale=7.0, **random_embeds(1, DIM, seed=30))
    theirs = pipe(num_inference_steps=5, generator=_gen(31), **kw).images
    ours = gd.sample(pipe, method="ode", transitions=5, inner_steps=1, generator=_gen(31), **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------- transitions, batches, steering
@pytest.mark.parametrize("kind", ["fill", "control"])
def test_glass_chunks_guidance_and_steering_run(flux_fill, flux_control, kind):
    parts = flux_fill if kind == "fill" else flux_control
    cond = dict(image=_image(32), mask_image=_mask(33)) if kind == "fill" else dict(control_image=_image(32))
    emb = random_embeds(2, DIM, seed=34, negative=True)
    lat = gd.as_flow(parts).noise(4, SIZE, SIZE, _gen(35))
    # Every max_batch chunk and both rows of true classifier-free guidance read their prompt's condition.
    kw = dict(transitions=3, latents=lat, num_images_per_prompt=2, true_cfg_scale=2.0, **ODE, **emb, **cond)
    whole = gd.sample(parts, generator=_gen(36), **kw)
    torch.testing.assert_close(gd.sample(parts, generator=_gen(36), max_batch=3, **kw), whole, atol=1e-5, rtol=0)
    glass = gd.sample(parts, method="glass", transitions=3, inner_steps=3, num_images_per_prompt=2, height=SIZE,
                      width=SIZE, output_type="latent", generator=_gen(37), **random_embeds(2, DIM), **cond)
    assert glass.shape == lat.shape and torch.isfinite(glass).all()
    reward = lambda images, prompts: images[:, 0].mean((1, 2))  # noqa: E731
    best, result = gd.steer(parts, reward=reward, particles=3, transitions=2, inner_steps=2, height=SIZE,
                            width=SIZE, generator=_gen(38), max_batch=4, **random_embeds(2, DIM), **cond)
    assert best.shape == (2, 3, SIZE, SIZE) and torch.isfinite(result.samples).all() and result.nfe == 4


# ---------------------------------------------------------------------------------------------------- errors
def test_missing_and_mismatched_conditions_are_named(flux, flux_fill, flux_control, sd3):
    kw = dict(transitions=2, **ODE, **random_embeds(2, DIM))
    with pytest.raises(ValueError, match=r"beyond the state's and none were given: a FLUX.1 Fill model: pass "
                                         r"image= and mask_image="):
        gd.sample(flux_fill, **kw)
    with pytest.raises(ValueError, match="a FLUX.1 Canny / Depth \\(Control\\) model: pass control_image="):
        gd.sample(pipeline(flux_control, "FluxControlPipeline"), **kw)
    fill = pipeline(flux_fill, "FluxFillPipeline")
    with pytest.raises(ValueError, match="FLUX.1 Fill needs image= and mask_image=.*; missing: mask_image"):
        gd.sample(fill, image=_image(1), **kw)
    with pytest.raises(ValueError, match="missing: image, mask_image"):
        gd.sample(fill, **kw)
    with pytest.raises(ValueError, match="image= / mask_image= needs a FLUX.1 Fill transformer reading 32 input "
                                         "features beyond the state's; this one reads 0"):
        gd.sample(flux, image=_image(1), mask_image=_mask(1), **kw)
    with pytest.raises(ValueError, match="control_image needs a FLUX.1 Control transformer reading 16 .* this one "
                                         "reads 32 \\(a FLUX.1 Fill model"):
        gd.sample(flux_fill, control_image=_image(1), **kw)
    with pytest.raises(ValueError, match="not a FLUX.1 model"):
        gd.sample(sd3, control_image=_image(1), guidance_scale=1.0, **{**kw, **random_embeds(2, 16)})
    with pytest.raises(ValueError, match="one model takes one of them, not both"):
        gd.sample(flux_fill, image=_image(1), mask_image=_mask(1), control_image=_image(2), **kw)
    with pytest.raises(ValueError, match="context_image .* cannot be combined"):
        gd.sample(flux_control, control_image=_image(1), context_image=_image(2), **kw)
    # The transformer itself refuses a call without the features it reads (the adapter used directly).
    flow = gd.as_flow(flux_fill)
    x = flow.noise(1, SIZE, SIZE)
    with pytest.raises(ValueError, match="reads 48 input features per token, 16 of them the state's: it needs a "
                                         "condition of 32 features .*got 0 \\(a FLUX.1 Fill model"):
        flow.predict(x, torch.ones(1), torch.zeros(1, 7, DIM), torch.zeros(1, DIM), SIZE, SIZE)


def test_bad_fill_and_control_arguments_are_named(flux_fill, flux_control):
    kw = dict(transitions=2, **ODE, **random_embeds(2, DIM))
    good = torch.zeros(1, (SIZE // 4) ** 2, 32)
    with pytest.raises(ValueError, match="pass image= and mask_image=, or masked_image_latents="):
        gd.sample(flux_fill, image=_image(1), masked_image_latents=good, **kw)
    with pytest.raises(ValueError, match="strength=0.5 applies to image-to-image from image="):
        gd.sample(flux_fill, masked_image_latents=good, strength=0.5, **kw)
    with pytest.raises(ValueError, match=r"masked_image_latents must be a Tensor \[1 or 2, 64, 32\].*got \(1, 64, 16"):
        gd.sample(flux_fill, masked_image_latents=good[..., :16], **kw)
    with pytest.raises(ValueError, match=r"masked_image_latents holds 3 images; pass one, or one per prompt \(2\)"):
        gd.sample(flux_fill, masked_image_latents=good.expand(3, -1, -1), **kw)
    with pytest.raises(ValueError, match=r"mask_image holds 3 images; pass one, or one per prompt \(2\)"):
        gd.sample(flux_fill, image=_image(1), mask_image=_mask(1, 3), **kw)
    with pytest.raises(ValueError, match=r"image holds 3 images; pass one, or one per prompt \(2\)"):
        gd.sample(flux_fill, image=_image(1, 3), mask_image=_mask(1), **kw)
    with pytest.raises(ValueError, match="strength must be a number in \\(0, 1\\]"):
        gd.sample(flux_fill, image=_image(1), mask_image=_mask(1), strength=0.0, **kw)
    with pytest.raises(ValueError, match=r"control_image holds 3 images; pass one, or one per prompt \(2\)"):
        gd.sample(flux_control, control_image=_image(1, 3), **kw)
    with pytest.raises(ValueError, match=r"control_image has \(16, 16\) pixels; a Tensor of pixels must have the "
                                         r"output's \(32, 32\)"):
        gd.sample(flux_control, control_image=torch.zeros(1, 3, 16, 16), **kw)
    no_vae = types.SimpleNamespace(transformer=flux_control.transformer, scheduler=flux_control.scheduler, vae=None)
    with pytest.raises(ValueError, match="encoding an image needs a VAE"):
        gd.sample(no_vae, control_image=_image(1), **kw)
