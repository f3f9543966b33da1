"""FLUX.1 and SD3 ControlNets through the diffusers integration on tiny random parts, against diffusers'
FluxControlNetPipeline and StableDiffusion3ControlNetPipeline: residuals from the ControlNet in every
transformer call, gated by the guidance window in glass_fast times."""
from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("diffusers")
from glass_fast.integrations import diffusers as gd  # noqa: E402
from glass_fast.integrations.diffusers_adapter import SkipLayerGuidance  # noqa: E402
from glass_fast.integrations.diffusers_controlnet import _weight, step_window  # noqa: E402
from diffusers_parts import (ATOL, DIM, SIZE, pipeline, random_embeds, sharpen_posterior,  # noqa: E402
                             tiny_flux, tiny_flux_controlnet, tiny_flux_hint_parts, tiny_sd3, tiny_sd3_controlnet,
                             tiny_sd3_controlnet_transformer)
from diffusers_parts import random_image as _image  # noqa: E402

ODE = dict(method="ode", inner_steps=1, height=SIZE, width=SIZE, output_type="latent")
# Three of five steps on (steps 1 to 3), at a scale other than 1.
WINDOW = dict(controlnet_conditioning_scale=0.7, control_guidance_start=0.2, control_guidance_end=0.8)


def _gen(seed: int):
    return torch.Generator().manual_seed(seed)


def _per_row(embeds: dict, n: int) -> dict:
    """The prompts' embeddings once per generated image: the pipelines do not repeat given embeddings for
    num_images_per_prompt."""
    return {k: v.repeat_interleave(n, dim=0) for k, v in embeds.items()}


def _sd3_embeds(prompts: int, seed: int, negative: bool = True) -> dict:
    return random_embeds(prompts, 16, seed=seed, negative=negative)


@pytest.fixture(scope="module")
def flux_parts():
    """FLUX.1 parts whose VAE posterior is its mean: the pipeline draws the control latents once per generated
    image, glass_fast once per prompt."""
    return sharpen_posterior_parts(tiny_flux())


@pytest.fixture(scope="module")
def sd3_parts():
    return sharpen_posterior_parts(tiny_sd3(tiny_sd3_controlnet_transformer()))


def sharpen_posterior_parts(parts):
    sharpen_posterior(parts.vae)
    return parts


def _flux_pipe(parts, net):
    return pipeline(parts, "FluxControlNetPipeline", controlnet=net)


def _sd3_pipe(parts, net):
    return pipeline(parts, "StableDiffusion3ControlNetPipeline", controlnet=net)


# --------------------------------------------------------------------------------------------------- FLUX.1
@pytest.mark.parametrize("images, cfg", [("one", False), ("per_prompt", True)])
def test_flux_controlnet_reproduces_the_pipeline(flux_parts, images, cfg):
    """Two prompts, two images each; one control image for all or one per prompt; with true CFG the ControlNet's
    residuals (from the conditional rows) serve both branches. A ControlNet switched off on the whole grid, or a
    different window, changes the result."""
    pipe = _flux_pipe(flux_parts, tiny_flux_controlnet())
    emb = random_embeds(2, DIM, seed=1, negative=cfg)
    control = _image(2) if images == "one" else _image(3, 2)
    theirs_control = control if images == "one" else [control[0]] * 2 + [control[1]] * 2
    lat = gd.as_flow(pipe).noise(4, SIZE, SIZE, _gen(4))
    kw = dict(height=SIZE, width=SIZE, output_type="latent", guidance_scale=5.0,
              true_cfg_scale=2.0 if cfg else 1.0, **WINDOW)
    theirs = pipe(num_inference_steps=5, latents=lat.clone(), control_image=theirs_control, **kw,
                  **_per_row(emb, 2)).images
    ours = gd.sample(pipe, method="ode", transitions=5, inner_steps=1, latents=lat, control_image=control,
                     num_images_per_prompt=2, **kw, **emb)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    for change in (dict(controlnet_conditioning_scale=0.0), dict(control_guidance_end=1.0)):
        other = gd.sample(pipe, method="ode", transitions=5, inner_steps=1, latents=lat, control_image=control,
                          num_images_per_prompt=2, **{**kw, **change}, **emb)
        assert (other - ours).abs().max() > 100 * ATOL


def test_flux_controlnet_generator_order(flux_parts):
    """The control image is encoded before the starting noise is drawn, with the same generator (guidance_scale:
    FluxControlNetPipeline's default, 7.0)."""
    pipe = _flux_pipe(flux_parts, tiny_flux_controlnet(seed=9))
    kw = dict(height=SIZE, width=SIZE, output_type="latent", control_image=_image(5), guidance_scale=7.0,
              **random_embeds(1, DIM, seed=6))
    theirs = pipe(num_inference_steps=3, generator=_gen(7), **kw).images
    ours = gd.sample(pipe, method="ode", transitions=3, inner_steps=1, generator=_gen(7), **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_flux_union_and_multi_controlnet_reproduce_the_pipeline(flux_parts):
    """A union ControlNet reads control_mode; two ControlNets with their own images, scales and windows add
    their residuals."""
    union = tiny_flux_controlnet(seed=10, num_mode=3)
    emb = random_embeds(2, DIM, seed=11)
    kw = dict(height=SIZE, width=SIZE, output_type="latent", guidance_scale=7.0, **emb)
    pipe = _flux_pipe(flux_parts, union)
    theirs = pipe(num_inference_steps=4, generator=_gen(12), control_image=_image(13), control_mode=2, **kw,
                  **WINDOW).images
    ours = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, generator=_gen(12), control_image=_image(13),
                     control_mode=2, **kw, **WINDOW)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    other = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, generator=_gen(12), control_image=_image(13),
                      control_mode=0, **kw, **WINDOW)
    assert (other - ours).abs().max() > 100 * ATOL

    # A multi-ControlNet of one union ControlNet reads every image with its own mode, scale and window.
    one = _flux_pipe(flux_parts, [union])
    args = dict(control_image=[_image(13), _image(42, 2)], control_mode=[2, 0],
                controlnet_conditioning_scale=[0.8, 1.2], control_guidance_start=[0.0, 0.5],
                control_guidance_end=[0.75, 1.0])
    theirs = one(num_inference_steps=4, generator=_gen(12), **args, **kw).images
    ours = gd.sample(one, method="ode", transitions=4, inner_steps=1, generator=_gen(12), **args, **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)

    multi = _flux_pipe(flux_parts, [tiny_flux_controlnet(seed=14), tiny_flux_controlnet(seed=15)])
    args = dict(control_image=[_image(16), _image(17, 2)], controlnet_conditioning_scale=[0.6, 1.3],
                control_guidance_start=[0.0, 0.25], control_guidance_end=[0.5, 1.0])
    theirs = multi(num_inference_steps=4, generator=_gen(18), **args, **kw).images
    ours = gd.sample(multi, method="ode", transitions=4, inner_steps=1, generator=_gen(18), **args, **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    args["controlnet_conditioning_scale"] = [0.6, 0.0]
    assert (gd.sample(multi, method="ode", transitions=4, inner_steps=1, generator=_gen(18), **args, **kw)
            - ours).abs().max() > 100 * ATOL


def test_flux_hint_controlnet_reproduces_the_pipeline():
    """A ControlNet with an input hint block reads the control image's pixels (no VAE draw) and its residuals
    repeat over the transformer's blocks."""
    parts = tiny_flux_hint_parts()
    pipe = _flux_pipe(parts, tiny_flux_controlnet(seed=38, num_layers=2, conditioning_embedding_channels=16))
    kw = dict(height=SIZE, width=SIZE, output_type="latent", control_image=_image(39, 2), guidance_scale=5.0,
              **random_embeds(2, DIM, seed=40), **WINDOW)
    theirs = pipe(num_inference_steps=5, generator=_gen(41), **kw).images
    ours = gd.sample(pipe, method="ode", transitions=5, inner_steps=1, generator=_gen(41), **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------------ SD3
@pytest.mark.parametrize("zeros, text", [(True, True), (False, True), (True, False)])
def test_sd3_controlnet_reproduces_the_pipeline(sd3_parts, zeros, text):
    """Classifier-free guidance (the ControlNet runs on both branches' rows), two prompts with two images each,
    one control image per prompt; with force_zeros_for_pooled_projection the latents are not shifted and the
    ControlNet's pooled input is zero; a ControlNet without joint_attention_dim reads no prompt tokens."""
    config = dict(force_zeros_for_pooled_projection=zeros, **({} if text else dict(joint_attention_dim=None)))
    pipe = _sd3_pipe(sd3_parts, tiny_sd3_controlnet(**config))
    emb, control = _sd3_embeds(2, seed=20), _image(21, 2)
    lat = gd.as_flow(pipe).noise(4, SIZE, SIZE, _gen(22))
    kw = dict(height=SIZE, width=SIZE, output_type="latent", guidance_scale=3.0, **WINDOW)
    theirs = pipe(num_inference_steps=5, latents=lat.clone(), control_image=[control[0]] * 2 + [control[1]] * 2,
                  **kw, **_per_row(emb, 2)).images
    ours = gd.sample(pipe, method="ode", transitions=5, inner_steps=1, latents=lat, control_image=control,
                     num_images_per_prompt=2, **kw, **emb)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    for change in (dict(controlnet_conditioning_scale=1.0), dict(control_guidance_start=0.0)):
        other = gd.sample(pipe, method="ode", transitions=5, inner_steps=1, latents=lat, control_image=control,
                          num_images_per_prompt=2, **{**kw, **change}, **emb)
        assert (other - ours).abs().max() > 100 * ATOL


def test_sd3_multi_controlnet_reproduces_the_pipeline(sd3_parts):
    nets = [tiny_sd3_controlnet(seed=23), tiny_sd3_controlnet(seed=24)]
    pipe = _sd3_pipe(sd3_parts, nets)
    kw = dict(height=SIZE, width=SIZE, output_type="latent", guidance_scale=1.0, **_sd3_embeds(1, 25, False),
              control_image=[_image(26), _image(27)], controlnet_conditioning_scale=[0.5, 1.5],
              control_guidance_start=[0.0, 0.5], control_guidance_end=[0.5, 1.0])
    theirs = pipe(num_inference_steps=4, generator=_gen(28), **kw).images
    ours = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, generator=_gen(28), **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------- windows, GLASS, steering
def test_window_in_glass_fast_times():
    grid = torch.tensor([0.0, 0.1, 0.3, 0.6, 0.8, 1.0], dtype=torch.float64)
    assert step_window(0.2, 0.8, grid) == (0.1, 0.8)       # steps 1, 2, 3 on
    assert step_window(0.0, 1.0, grid) == (0.0, 1.0)
    assert step_window(0.9, 0.95, grid) is None            # no whole step inside: never on
    t = torch.tensor([0.0, 0.1, 0.45, 0.7999, 0.8, 0.95])
    torch.testing.assert_close(_weight(t, (0.1, 0.8), 0.5), torch.tensor([0.0, 0.5, 0.5, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(_weight(t, None, 0.5), torch.zeros(6))
    # Skip-layer guidance's rule (step i of N on when N start < i < N stop) keeps the steps' own times, closed.
    slg = SkipLayerGuidance.from_steps([0], 1.0, 0.2, 0.8, grid)                 # steps 2, 3 on
    assert slg.window == (0.3, 0.6)
    assert slg.active(torch.tensor([0.1, 0.3, 0.6, 0.7])).tolist() == [False, True, True, False]
    assert SkipLayerGuidance.from_steps([0], 1.0, 0.9, 0.95, grid).active(t) is None


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_glass_chunks_and_steering_run(flux_parts, sd3_parts, kind):
    """GLASS inner steps read the window by their own times: a window holding no step equals scale 0 and
    differs from the full window; max_batch chunks (CFG rows included) equal one call; steering runs."""
    if kind == "flux":
        pipe, emb = _flux_pipe(flux_parts, tiny_flux_controlnet(seed=29)), random_embeds(2, DIM, seed=30)
        cfg = dict(true_cfg_scale=2.0, **random_embeds(2, DIM, seed=30, negative=True))
    else:
        pipe, emb = _sd3_pipe(sd3_parts, tiny_sd3_controlnet(seed=31)), _sd3_embeds(2, 32)
        cfg = dict(guidance_scale=2.0, **emb)
        emb = dict(guidance_scale=2.0, **emb)
    kw = dict(method="glass", transitions=3, inner_steps=3, num_images_per_prompt=2, height=SIZE, width=SIZE,
              output_type="latent", control_image=_image(33, 2), **emb)
    glass = gd.sample(pipe, generator=_gen(34), **kw)
    assert torch.isfinite(glass).all()
    off = gd.sample(pipe, generator=_gen(34), control_guidance_start=0.9, control_guidance_end=0.95, **kw)
    torch.testing.assert_close(gd.sample(pipe, generator=_gen(34), controlnet_conditioning_scale=0.0, **kw), off,
                               atol=1e-6, rtol=0)
    assert (off - glass).abs().max() > 1e-3
    lat = gd.as_flow(pipe).noise(4, SIZE, SIZE, _gen(35))
    chunked = dict(ODE, transitions=3, latents=lat, num_images_per_prompt=2, control_image=_image(33, 2), **cfg)
    whole = gd.sample(pipe, **chunked)
    torch.testing.assert_close(gd.sample(pipe, max_batch=3, **chunked), whole, atol=1e-5, rtol=0)
    reward = lambda images, prompts: images[:, 0].mean((1, 2))  # noqa: E731
    best, result = gd.steer(pipe, reward=reward, particles=3, transitions=2, inner_steps=2, height=SIZE, width=SIZE,
                            generator=_gen(36), max_batch=4, control_image=_image(37), **WINDOW, **emb)
    assert best.shape == (2, 3, SIZE, SIZE) and torch.isfinite(result.samples).all() and result.nfe == 4


def test_compiled_transitions_read_the_controlnet(flux_parts):
    """compile= traces the ControlNet call and its window with every transition."""
    pipe = _flux_pipe(flux_parts, tiny_flux_controlnet(seed=43))
    kw = dict(method="glass", transitions=3, inner_steps=2, height=SIZE, width=SIZE, output_type="latent",
              control_image=_image(44), **random_embeds(1, DIM, seed=45), **WINDOW)
    eager = gd.sample(pipe, generator=_gen(46), **kw)
    compiled = gd.sample(pipe, generator=_gen(46), compile={"backend": "eager"}, **kw)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------- errors
def test_controlnet_argument_errors(flux, flux_parts, sd3_parts):
    kw = dict(transitions=2, **ODE, **random_embeds(2, DIM))
    with pytest.raises(ValueError, match="controlnet_conditioning_scale, control_mode: this pipeline has no "
                                         "ControlNet"):
        gd.sample(flux, controlnet_conditioning_scale=0.5, control_mode=1, **kw)
    pipe = _flux_pipe(flux_parts, tiny_flux_controlnet())
    with pytest.raises(ValueError, match=r"has a ControlNet \(FluxControlNetModel\): pass control_image="):
        gd.sample(pipe, **kw)
    img = dict(control_image=_image(1))
    with pytest.raises(ValueError, match=r"control_guidance_start \(0.5\) must be below control_guidance_end "
                                         r"\(0.5\)"):
        gd.sample(pipe, control_guidance_start=0.5, control_guidance_end=0.5, **img, **kw)
    with pytest.raises(ValueError, match=r"control_guidance_end must be a number in \[0.0, 1.0\].*got 1.5"):
        gd.sample(pipe, control_guidance_end=1.5, **img, **kw)
    with pytest.raises(ValueError, match="controlnet_conditioning_scale must be a number .*got 'x'"):
        gd.sample(pipe, controlnet_conditioning_scale="x", **img, **kw)
    with pytest.raises(ValueError, match="controlnet_conditioning_scale has 2 entries but there are 1 control"):
        gd.sample(pipe, controlnet_conditioning_scale=[0.5, 0.5], **img, **kw)
    with pytest.raises(ValueError, match="control_mode=1 selects a union ControlNet's control type; this "
                                         "ControlNet \\(FluxControlNetModel\\) is not a union one"):
        gd.sample(pipe, control_mode=1, **img, **kw)
    with pytest.raises(ValueError, match="holds lists of images \\(one per ControlNet\\), but the pipeline has one"):
        gd.sample(pipe, control_image=[[_image(1)], [_image(2)]], **kw)
    with pytest.raises(ValueError, match=r"control_image holds 3 images; pass one, or one per prompt \(2\)"):
        gd.sample(pipe, control_image=_image(1, 3), **kw)
    union = _flux_pipe(flux_parts, tiny_flux_controlnet(num_mode=3))
    with pytest.raises(ValueError, match="this is a union ControlNet .*: pass control_mode="):
        gd.sample(union, **img, **kw)
    with pytest.raises(ValueError, match="control_mode must be an int .*got 1.5"):
        gd.sample(union, control_mode=1.5, **img, **kw)
    multi = _flux_pipe(flux_parts, [tiny_flux_controlnet(), tiny_flux_controlnet(seed=2)])
    with pytest.raises(ValueError, match="control_image gives 1 image\\(s\\) for 2 ControlNet\\(s\\)"):
        gd.sample(multi, **img, **kw)
    sd3 = _sd3_pipe(sd3_parts, [tiny_sd3_controlnet()])   # SD3's multi-ControlNet reads one image per net
    with pytest.raises(ValueError, match="control_image gives 2 image\\(s\\) for 1 ControlNet\\(s\\)"):
        gd.sample(sd3, control_image=[_image(1), _image(2)], guidance_scale=1.0, **{**kw, **_sd3_embeds(2, 3, False)})
    with pytest.raises(ValueError, match=r"control_image\[1\] holds 3 images"):
        gd.sample(multi, control_image=[_image(1), _image(2, 3)], **kw)


def test_controlnet_combination_errors(flux_parts, sd3_parts):
    kw = dict(transitions=2, **ODE, **random_embeds(2, DIM))
    pipe = _flux_pipe(flux_parts, tiny_flux_controlnet())
    img = dict(control_image=_image(1))
    with pytest.raises(ValueError, match=r"image= \(image-to-image\) cannot be combined with a ControlNet"):
        gd.sample(pipe, image=_image(2), **img, **kw)
    with pytest.raises(ValueError, match=r"context_image \(FLUX.1 Kontext\) cannot be combined with a ControlNet"):
        gd.sample(pipe, context_image=_image(2), **img, **kw)
    with pytest.raises(ValueError, match="IP-Adapter image prompts cannot be combined with a ControlNet"):
        gd.sample(pipe, ip_adapter_image_embeds=torch.zeros(1, 1, 8), **img, **kw)
    sd3 = _sd3_pipe(sd3_parts, tiny_sd3_controlnet())
    with pytest.raises(ValueError, match="skip-layer guidance cannot be combined with a ControlNet"):
        gd.sample(sd3, skip_guidance_layers=[0], guidance_scale=2.0, **img,
                  **{**kw, **_sd3_embeds(2, 3)})
    with pytest.raises(TypeError, match="FluxControlNetModel cannot drive this transformer"):
        gd.sample(types.SimpleNamespace(transformer=sd3_parts.transformer, scheduler=sd3_parts.scheduler,
                                        vae=sd3_parts.vae, controlnet=tiny_flux_controlnet()),
                  guidance_scale=1.0, **img, **{**kw, **_sd3_embeds(2, 3, False)})

    class OtherControlNetPipeline:   # a ControlNet pipeline whose loop is not one of those reproduced
        transformer, scheduler, vae, controlnet = (sd3_parts.transformer, sd3_parts.scheduler, sd3_parts.vae,
                                                   tiny_sd3_controlnet())
    with pytest.raises(TypeError, match="OtherControlNetPipeline is not supported: glass_fast reproduces the "
                                        "ControlNet pipelines FluxControlNetPipeline, "
                                        "StableDiffusion3ControlNetPipeline, FluxControlNetImg2ImgPipeline, "
                                        "FluxControlNetInpaintPipeline and "
                                        "StableDiffusion3ControlNetInpaintingPipeline"):
        gd.sample(OtherControlNetPipeline(), guidance_scale=1.0, **img, **{**kw, **_sd3_embeds(2, 3, False)})
