"""Inputs of the diffusers integration that the pipelines reject with errors from deep inside torch (inpainting
images of latents, bool or wide-integer masks, union ControlNet modes out of range), named here with what they
take; and CLIPScoreReward reading non-square images as CLIP's image processor does (tiny random parts, nothing
downloaded)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from glass_fast.integrations import diffusers as gd  # noqa: E402
from diffusers_parts import DIM, SIZE, pipeline, random_embeds, tiny_sd3_controlnet  # noqa: E402
from diffusers_parts import column_mask as _mask  # noqa: E402
from diffusers_parts import random_image as _image  # noqa: E402

RUN = dict(method="ode", transitions=2, inner_steps=1, height=SIZE, width=SIZE, output_type="latent")


@pytest.mark.parametrize("cls", ["FluxInpaintPipeline", "FluxControlNetInpaintPipeline"])
@pytest.mark.parametrize("channels", [16, 1])
def test_inpainting_images_of_other_than_three_channels_are_named(flux, cls, channels):
    """FLUX.1 and SD3 latent-blending inpainting encode image= through the VAE: a Tensor of latents (or of one
    channel) is refused by name, as for the reference-image pipelines, rather than failing in the VAE's first
    convolution."""
    extra = {}
    if "ControlNet" in cls:
        from diffusers_parts import tiny_flux_controlnet
        extra = dict(controlnet=tiny_flux_controlnet(seed=1))
    pipe = pipeline(flux, cls, **extra)
    kw = dict(control_image=_image(3)) if extra else {}
    image = torch.zeros(1, channels, SIZE // 2, SIZE // 2)
    for given in (image, [image]):
        with pytest.raises(ValueError, match=rf"image must be images \(PIL, arrays, or Tensors of 3 channels\), "
                                             rf"got a Tensor of shape \(1, {channels}, 16, 16\)"):
            gd.sample(pipe, image=given, mask_image=_mask(slice(8, 24)), **kw, **RUN, **random_embeds(1, DIM))


@pytest.mark.parametrize("kind", ["bool array", "bool tensor", "int64 tensor", "int32 array list"])
def test_masks_of_bools_or_wide_integers_are_named(flux, flux_fill, kind):
    """The pipelines' mask processor keeps a mask's dtype and resizing fails for bools and integers other than
    8-bit ones: the mask is refused by name (inpainting, FLUX.1 Fill, SD3 ControlNet inpainting's control_mask)."""
    from diffusers_parts import tiny_sd3, tiny_sd3_controlnet_transformer
    white = _mask(slice(8, 24)) > 0
    mask = {"bool array": white, "bool tensor": torch.from_numpy(white)[None],
            "int64 tensor": torch.from_numpy(white).long(), "int32 array list": [white.astype(np.int32)]}[kind]
    allowed = r"floats in \[0, 1\] or 8-bit values \(white, >= 0.5, is repainted\), got .*(bool|int64|int32)"
    emb = random_embeds(1, DIM)
    with pytest.raises(ValueError, match="mask_image must hold " + allowed):
        gd.sample(pipeline(flux, "FluxInpaintPipeline"), image=_image(1), mask_image=mask, **RUN, **emb)
    with pytest.raises(ValueError, match="mask_image must hold " + allowed):
        gd.sample(pipeline(flux_fill, "FluxFillPipeline"), image=_image(1), mask_image=mask, **RUN, **emb)
    if kind != "bool tensor":   # a 3-D Tensor: a 4-D one is taken as given (refused as bool there)
        sd3 = pipeline(tiny_sd3(tiny_sd3_controlnet_transformer()), "StableDiffusion3ControlNetInpaintingPipeline",
                       controlnet=tiny_sd3_controlnet(seed=1, extra_conditioning_channels=1))
        with pytest.raises(ValueError, match="control_mask must hold " + allowed):
            gd.sample(sd3, control_image=_image(2), control_mask=mask, guidance_scale=1.0, **RUN,
                      **random_embeds(1, 16))


def test_eight_bit_and_float_masks_give_the_same_result(flux):
    """What the check lets through: the same mask as uint8 0 / 255, floats 0 / 1 and a uint8 Tensor."""
    pipe = pipeline(flux, "FluxInpaintPipeline")
    white = _mask(slice(8, 24))
    outs = [gd.sample(pipe, image=_image(1), mask_image=m, generator=torch.Generator().manual_seed(0), **RUN,
                      **random_embeds(1, DIM)) for m in (white, white / 255.0, torch.from_numpy(white)[None, None])]
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], atol=0, rtol=0)


def test_clip_score_reads_the_centre_square_of_a_wide_image_as_clip_does():
    """CLIP's image processor resizes the shorter side to its input size and cuts the centre square out: the score
    of a wide image does not depend on columns well outside that square (beyond the resize's reach), and is not
    that of the image squeezed to a square."""
    import torch.nn.functional as F

    from diffusers_parts import tiny_clip
    from glass_fast.integrations.rewards import CLIPScoreReward
    model, tokenize = tiny_clip()
    reward = CLIPScoreReward(model, tokenize)   # 16 x 16 pixels
    g = torch.Generator().manual_seed(0)
    wide = torch.rand(2, 3, 32, 64, generator=g)
    prompts = ["a red bicycle", "a cat"]
    score = reward(wide, prompts)
    sides = wide.clone()   # the centre square is columns 16 to 48; the resize by 2 reads 4 pixels around each
    sides[..., :8], sides[..., 56:] = torch.rand(2, 3, 32, 8, generator=g), torch.rand(2, 3, 32, 8, generator=g)
    torch.testing.assert_close(reward(sides, prompts), score, atol=1e-6, rtol=0)
    inside = wide.clone()
    inside[..., 24:40] = torch.rand(2, 3, 32, 16, generator=g)
    assert (reward(inside, prompts) - score).abs().max() > 1e-3
    squeezed = F.interpolate(wide, size=(32, 32), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    assert (reward(squeezed, prompts) - score).abs().max() > 1e-3
    tall = wide.transpose(-1, -2)   # the same rule along the other side
    torch.testing.assert_close(reward(sides.transpose(-1, -2), prompts), reward(tall, prompts), atol=1e-6, rtol=0)


def test_clip_score_preprocessing_is_clips_image_processors():
    """The pixels CLIP reads from a wide image are, up to the processors' 8-bit rounding and resampling kernels,
    those of transformers' CLIP image processor (shorter side resized, centre square) for that CLIP's input size;
    the image squeezed to a square is far from them."""
    import torch.nn.functional as F
    from PIL import Image

    transformers = pytest.importorskip("transformers")
    from glass_fast.integrations.rewards import CLIPScoreReward
    processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = processor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    seen = {}

    class Model(torch.nn.Module):   # records the pixels CLIP would read
        config = type("Config", (), {"vision_config": type("Vision", (), {"image_size": 16})})

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def get_image_features(self, pixel_values):
            seen["pixels"] = pixel_values
            return torch.ones(pixel_values.shape[0], 4)

        def get_text_features(self, input_ids, attention_mask=None):
            return torch.ones(input_ids.shape[0], 4)

    reward = CLIPScoreReward(Model(), lambda texts, **_: {"input_ids": torch.zeros(len(texts), 2, dtype=torch.long)})
    smooth = F.avg_pool2d(torch.rand(1, 3, 48, 96, generator=torch.Generator().manual_seed(1)), 5, 1, 2)
    pil = Image.fromarray((smooth[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    theirs = torch.as_tensor(np.asarray(processor(images=pil, return_tensors="np")["pixel_values"]))
    reward(torch.as_tensor(np.asarray(pil) / 255.0).permute(2, 0, 1)[None].float(), ["a cat"])
    assert seen["pixels"].shape == theirs.shape == (1, 3, 16, 16)
    assert (seen["pixels"] - theirs).abs().mean() < 0.02
    squeezed = F.interpolate(torch.as_tensor(np.asarray(pil) / 255.0).permute(2, 0, 1)[None].float(), size=(48, 48),
                             mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    reward(squeezed, ["a cat"])
    assert (seen["pixels"] - theirs).abs().mean() > 0.1


@pytest.mark.parametrize("mode", [3, -1])
def test_a_union_controlnets_mode_out_of_range_is_named(flux, mode):
    """A union ControlNet of three control types reads modes 0, 1 and 2; another mode would fail as an index out of
    range inside its mode embedding (FluxControlNetPipeline too)."""
    from diffusers_parts import tiny_flux_controlnet
    pipe = pipeline(flux, "FluxControlNetPipeline", controlnet=tiny_flux_controlnet(seed=10, num_mode=3))
    with pytest.raises(ValueError, match=rf"control_mode={mode} is not one of this union ControlNet's 3 control "
                                         rf"types \(0 to 2\)"):
        gd.sample(pipe, control_image=_image(13), control_mode=mode, **RUN, **random_embeds(1, DIM))
    with pytest.raises(ValueError, match=rf"control_mode={mode} is not one"):
        gd.sample(pipeline(flux, "FluxControlNetPipeline", controlnet=[tiny_flux_controlnet(seed=10, num_mode=3)]),
                  control_image=[_image(13), _image(14)], control_mode=[0, mode], **RUN, **random_embeds(1, DIM))
