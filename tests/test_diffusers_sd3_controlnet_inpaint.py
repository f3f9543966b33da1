"""SD3's inpainting ControlNet through the diffusers integration on tiny random parts, against diffusers'
StableDiffusion3ControlNetInpaintingPipeline: text-to-image from noise whose ControlNet reads the masked control
image's latents and the mask (``control_mask``), gated by the guidance window in glass_fast times."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from glass_fast.integrations import diffusers as gd  # noqa: E402
from diffusers_parts import (ATOL, SIZE, pipeline, random_embeds, sharpen_posterior, tiny_sd3,  # noqa: E402
                             tiny_sd3_controlnet, tiny_sd3_controlnet_transformer)
from diffusers_parts import column_mask as _mask  # noqa: E402
from diffusers_parts import random_image as _image  # noqa: E402

CLS = "StableDiffusion3ControlNetInpaintingPipeline"
# Three of five steps on (steps 1 to 3), at a scale other than 1.
WINDOW = dict(controlnet_conditioning_scale=0.7, control_guidance_start=0.2, control_guidance_end=0.8)
RUN = dict(method="ode", transitions=5, inner_steps=1)


def _gen(seed: int):
    return torch.Generator().manual_seed(seed)


def _net(seed: int = 1, **config):
    """An SD3 ControlNet reading one conditioning channel beyond the latents' (the mask), as the inpainting
    pipeline's."""
    return tiny_sd3_controlnet(seed=seed, extra_conditioning_channels=1, **config)


def _differs(a, b, factor: float = 100):
    """Far beyond the equality tests' tolerance."""
    return (a - b).abs().max() > factor * ATOL


@pytest.fixture(scope="module")
def parts():
    """SD3 parts whose VAE posterior is its mean: the pipeline draws the control latents once per generated
    image from the global random state, glass_fast once per prompt."""
    parts = tiny_sd3(tiny_sd3_controlnet_transformer())
    sharpen_posterior(parts.vae)
    return parts


def _rows(value: list, n: int) -> list:
    """Per-prompt images or masks once per generated image, as the pipeline takes them with given embeddings."""
    return [v for v in value for _ in range(n)]


@pytest.mark.parametrize("per_prompt, cfg", [(False, True), (True, False), (True, True)])
def test_reproduces_the_pipeline(parts, per_prompt, cfg):
    """Two prompts with two images each; one control image and mask for all, or one per prompt; with and without
    classifier-free guidance (the ControlNet runs on both branches' rows), at a scale other than 1, with the
    ControlNet off in the first and last steps. A different mask, the ControlNet off, or its window on the whole
    grid change the result."""
    pipe = pipeline(parts, CLS, controlnet=_net())
    emb = random_embeds(2, 16, seed=2, negative=cfg)
    count = 2 if per_prompt else 1
    images, masks = _image(3, count), _mask(slice(8, 24), count)
    images, masks = (images, masks) if per_prompt else ([images], [masks])
    lat = gd.as_flow(pipe).noise(4, SIZE, SIZE, _gen(4))
    kw = dict(height=SIZE, width=SIZE, output_type="latent", guidance_scale=3.0 if cfg else 1.0, **WINDOW)
    theirs = pipe(num_inference_steps=5, latents=lat.clone(), control_image=_rows(images, 2) if per_prompt else images,
                  control_mask=_rows(masks, 2) if per_prompt else masks, **kw,
                  **{k: v.repeat_interleave(2, dim=0) for k, v in emb.items()}).images
    args = dict(latents=lat, control_image=images, control_mask=masks, num_images_per_prompt=2, **kw, **emb)
    ours = gd.sample(pipe, **RUN, **args)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    for change in (dict(control_mask=[_mask(slice(0, 8))] * count), dict(controlnet_conditioning_scale=0.0),
                   dict(control_guidance_start=0.0, control_guidance_end=1.0)):
        assert _differs(gd.sample(pipe, **RUN, **{**args, **change}), ours)


def test_generator_and_tensor_inputs(parts):
    """With a generator the noise is the pipeline's (its control latents come from the global random state). A
    4-D Tensor control image is pixels in [-1, 1] and a 4-D Tensor mask is taken as given, soft values
    included: pixels above 0.5 are masked, and the mask channel is 1 - mask, unbinarised."""
    pipe = pipeline(parts, CLS, controlnet=_net(seed=5))
    g = torch.Generator().manual_seed(6)
    image = torch.rand(1, 3, SIZE, SIZE, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 4:20] = torch.linspace(0.3, 1.0, 16)   # soft: some pixels below 0.5 kept, the mask channel graded
    kw = dict(height=SIZE, width=SIZE, output_type="latent", guidance_scale=2.0, control_image=image,
              control_mask=mask, **random_embeds(1, 16, seed=7, negative=True))
    theirs = pipe(num_inference_steps=4, generator=_gen(8), **kw).images
    ours = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, generator=_gen(8), **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    binary = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, generator=_gen(8),
                       **{**kw, "control_mask": (mask > 0.5).float()})
    assert _differs(binary, ours, factor=10)


def test_multi_controlnet_reproduces_the_pipeline(parts):
    """Two inpainting ControlNets with their own control images, scales and windows, and one mask for both; the
    pipeline gives zero pooled projections and shifted latents whatever force_zeros_for_pooled_projection says."""
    pipe = pipeline(parts, CLS, controlnet=[_net(seed=9, force_zeros_for_pooled_projection=False), _net(seed=10)])
    kw = dict(height=SIZE, width=SIZE, output_type="latent", guidance_scale=1.0, control_mask=[_mask(slice(0, 12))],
              control_image=[[_image(11)], [_image(12)]], controlnet_conditioning_scale=[0.5, 1.5],
              control_guidance_start=[0.0, 0.5], control_guidance_end=[0.5, 1.0], **random_embeds(1, 16, seed=13))
    theirs = pipe(num_inference_steps=4, generator=_gen(14), **kw).images
    ours = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, generator=_gen(14), **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_glass_and_steering_run(parts):
    """GLASS inner calls read the window by their own times (a window holding no step equals scale 0); FK
    steering returns finite samples of the right shape."""
    pipe = pipeline(parts, CLS, controlnet=_net(seed=15))
    emb = random_embeds(2, 16, seed=16, negative=True)
    kw = dict(transitions=3, inner_steps=3, height=SIZE, width=SIZE, output_type="latent", guidance_scale=2.0,
              control_image=_image(17), control_mask=_mask(slice(8, 16)), **emb)
    glass = gd.sample(pipe, method="glass", generator=_gen(18), **kw)
    assert torch.isfinite(glass).all()
    off = gd.sample(pipe, method="glass", generator=_gen(18), control_guidance_start=0.9, control_guidance_end=0.95,
                    **kw)
    torch.testing.assert_close(gd.sample(pipe, method="glass", generator=_gen(18), controlnet_conditioning_scale=0.0,
                                         **kw), off, atol=1e-6, rtol=0)
    assert (off - glass).abs().max() > 1e-3
    reward = lambda images, prompts: images[:, 0].mean((1, 2))  # noqa: E731
    best, result = gd.steer(pipe, reward=reward, particles=3, generator=_gen(19), max_batch=4, **WINDOW,
                            **{**kw, "transitions": 2, "inner_steps": 2})
    assert best.shape == (2, 4, SIZE // 2, SIZE // 2)
    assert result.samples.shape == (2, 3, 4, SIZE // 2, SIZE // 2) and torch.isfinite(result.samples).all()
    assert result.nfe == 4


def test_errors_are_named(parts):
    pipe = pipeline(parts, CLS, controlnet=_net())
    kw = dict(**RUN, height=SIZE, width=SIZE, output_type="latent", guidance_scale=1.0, **random_embeds(2, 16))
    img, mask = dict(control_image=_image(1)), dict(control_mask=_mask(slice(0, 8)))
    with pytest.raises(ValueError, match=f"{CLS} inpaints its control_image: pass control_mask="):
        gd.sample(pipe, **img, **kw)
    with pytest.raises(ValueError, match=f"mask_image: {CLS}'s mask is control_mask="):
        gd.sample(pipe, mask_image=_mask(slice(0, 8)), **img, **kw)
    with pytest.raises(ValueError, match=f"image=: {CLS} takes the image it inpaints as control_image="):
        gd.sample(pipe, image=_image(2), **img, **mask, **kw)
    with pytest.raises(ValueError, match=r"control_mask holds 3 images; pass one, or one per prompt \(2\)"):
        gd.sample(pipe, control_mask=_mask(slice(0, 8), 3), **img, **kw)
    with pytest.raises(ValueError, match=r"control_mask as a 4-D Tensor must have shape \[1 or 2, 1, 32, 32\]"):
        gd.sample(pipe, control_mask=torch.zeros(1, 3, SIZE, SIZE), **img, **kw)
    with pytest.raises(ValueError, match=r"control_mask must hold values in \[0, 1\], got values in \[0.0, 2.0\]"):
        gd.sample(pipe, control_mask=torch.full((1, 1, SIZE, SIZE), 2.0).index_fill(3, torch.tensor([0]), 0.0),
                  **img, **kw)
    with pytest.raises(TypeError, match=r"control_mask must be a real Tensor of values in \[0, 1\], got torch.bool"):
        gd.sample(pipe, control_mask=torch.zeros(1, 1, SIZE, SIZE, dtype=torch.bool), **img, **kw)
    with pytest.raises(ValueError, match="control_mask holds NaN"):
        gd.sample(pipe, control_mask=torch.full((1, 1, SIZE, SIZE), float("nan")), **img, **kw)
    with pytest.raises(ValueError, match=f"{CLS}'s ControlNet reads the masked image's latents and the mask: it "
                                         f"needs extra_conditioning_channels=1, this one has 0"):
        gd.sample(pipeline(parts, CLS, controlnet=tiny_sd3_controlnet()), **img, **mask, **kw)
    with pytest.raises(ValueError, match=r"reads none \(joint_attention_dim=None\)"):
        gd.sample(pipeline(parts, CLS, controlnet=_net(joint_attention_dim=None)), **img, **mask, **kw)
    plain = pipeline(parts, "StableDiffusion3ControlNetPipeline", controlnet=_net())
    with pytest.raises(ValueError, match="extra_conditioning_channels=1\\): an inpainting ControlNet"):
        gd.sample(plain, **img, **kw)
    with pytest.raises(ValueError, match=f"control_mask is {CLS}'s mask of its control image; this pipeline"):
        gd.sample(plain, **img, **mask, **kw)
    with pytest.raises(ValueError, match=f"control_mask is {CLS}'s mask"):
        gd.sample(parts, **mask, **kw)
