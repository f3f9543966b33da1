"""Latent-blending inpainting through the diffusers integration (FluxInpaintPipeline,
StableDiffusion3InpaintPipeline) on tiny random parts, against diffusers' own pipelines."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from glass_fast.integrations import diffusers as gd  # noqa: E402
from diffusers_parts import ATOL, DIM, SIZE, pipeline, random_embeds, tiny_sd3, tiny_sd3_transformer  # noqa: E402


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


def _image(seed: int, count: int = 1):
    rng = np.random.default_rng(seed)
    images = [(rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8) for _ in range(count)]
    return images[0] if count == 1 else images


def _mask(columns: slice, count: int = 1):
    """White (repainted) in the given pixel columns, black (kept) elsewhere."""
    masks = []
    for i in range(count):
        m = np.zeros((SIZE, SIZE), dtype=np.uint8)
        m[:, columns] = 255
        m[: 4 * (i + 1)] = 255          # masks differ per prompt
        masks.append(m)
    return masks[0] if count == 1 else masks


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
