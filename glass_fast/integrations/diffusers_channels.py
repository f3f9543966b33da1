"""FLUX.1 Fill and FLUX.1 Canny / Depth (Control): conditions concatenated to the state along features.

FluxFillPipeline (inpainting, outpainting) gives the transformer, beside every noisy token, the packed VAE
latents of the masked image (the image with the mask's white pixels set to 0 in [-1, 1]) followed by the packed
mask (each latent pixel's f x f block of mask pixels, f the VAE's scale factor: 4 f^2 features per token);
FluxControlPipeline gives the packed VAE latents of the control image (an edge or depth map). The transformer
reads [state | condition] per token and predicts the state's velocity alone, so the sampler state stays the
noisy latents and every transition (GLASS, SDE, steering) runs unchanged.

The condition is encoded once per prompt (one image for every prompt, or one per prompt) into
``Conditioning.channels`` [P, L, features]; every row of a prompt reads its prompt's row in every transformer
call (``DiffusersFlow.flow_model``). The VAE draws use the generator in the pipelines' order: FLUX.1 Control
encodes its image before the starting noise is drawn, FLUX.1 Fill its masked image after.
"""
from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

import numpy as np
import torch

from .diffusers_checks import pipeline_classes

if TYPE_CHECKING:
    from .diffusers_adapter import DiffusersFlow
    from .diffusers_conditioning import Conditioning

FILL_GUIDANCE = 30.0   # FluxFillPipeline's default guidance_scale (FluxPipeline's is 3.5)


def extra_features(flow: DiffusersFlow) -> int:
    """Input features per token the transformer reads beyond the state's: 0 for a text-to-image model, the
    condition's width for FLUX.1 Fill or Control."""
    if flow.kind != "flux":
        return 0
    return flow.transformer.config.in_channels - 4 * flow.latent_channels()


def condition_width(flow: DiffusersFlow, kind: str) -> int:
    """Features per token of a "fill" condition (masked-image latents and mask) or a "control" one."""
    state = 4 * flow.latent_channels()
    return state + 4 * flow.vae_scale_factor ** 2 if kind == "fill" else state


def check_features(flow: DiffusersFlow, state_features: int, channels: torch.Tensor | None) -> None:
    """ValueError unless ``channels`` supplies exactly the features the transformer reads beyond the state's."""
    need = extra_features(flow)
    got = 0 if channels is None else channels.shape[-1]
    if need != got:
        raise ValueError(f"this FLUX.1 transformer reads {flow.transformer.config.in_channels} input features per "
                         f"token, {state_features} of them the state's: it needs a condition of {need} features "
                         f"concatenated to the state, got {got} ({_missing(flow)})")


def _missing(flow: DiffusersFlow) -> str:
    """What to pass for this transformer's condition, by its width."""
    need = extra_features(flow)
    if need == condition_width(flow, "fill"):
        return "a FLUX.1 Fill model: pass image= and mask_image= (or masked_image_latents=)"
    if need == condition_width(flow, "control"):
        return "a FLUX.1 Canny / Depth (Control) model: pass control_image="
    return "neither a FLUX.1 Fill nor a Control model's width"


def check_finite(name: str, value: torch.Tensor) -> None:
    """ValueError naming the argument when it holds NaN or Inf: caught here rather than as the NaN velocities
    it would give."""
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} holds NaN or Inf values")


def check_images(name: str, value: torch.Tensor, prompts: int) -> None:
    """ValueError naming the argument unless ``value`` (images or their latents, one per row) holds one image
    (for every prompt) or one per prompt, all finite."""
    if value.shape[0] not in (1, prompts):
        raise ValueError(f"{name} holds {value.shape[0]} images; pass one, or one per prompt ({prompts})")
    check_finite(name, value)


def image_processor(flow: DiffusersFlow, **kw):
    """The pipelines' VaeImageProcessor (``kw``: its options), sizing images in whole transformer tokens (so
    that it keeps every height and width ``latent_hw`` accepts)."""
    from diffusers.image_processor import VaeImageProcessor
    return VaeImageProcessor(vae_scale_factor=flow.patch_pixels, **kw)


class ChannelCondition:
    """The pipelines' Fill / Control arguments, checked, and the condition they give.

    Args:
        pipe: the pipeline (or adapter) ``sample`` / ``steer`` got.
        image, strength: ``sample``'s. With FLUX.1 Fill, ``image`` is the image to inpaint and also the
            image-to-image start at ``strength`` (default 1.0, FluxFillPipeline's: pure noise).
        latents_given: whether starting noise was passed (then the pipeline encodes no start image).
        mask_image, masked_image_latents: FluxFillPipeline's (white pixels are repainted); the latents are the
            packed condition itself, [1 or P, L, 4C + 4 f^2], instead of image and mask.
        control_image: FluxControlPipeline's: images (PIL, arrays, Tensors in [0, 1]), a 4-D Tensor of pixels
            in [-1, 1] at the output size, or a 3-D Tensor of packed latents [1 or P, L, 4C], as it takes them.
        context_image: FLUX.1 Kontext's reference image, which cannot be combined with these.
    Attributes:
        kind: "fill", "control" or None; image, strength: what image-to-image starts from.
    """

    def __init__(self, pipe, image, strength, latents_given: bool, mask_image=None, masked_image_latents=None,
                 control_image=None, context_image=None):
        classes = pipeline_classes(pipe)
        fill = "FluxFillPipeline" in classes or mask_image is not None or masked_image_latents is not None
        self.kind = "fill" if fill else ("control" if control_image is not None else None)
        self.mask_image, self.masked, self.control = mask_image, masked_image_latents, control_image
        self.image, self.strength, self.fill_image = image, strength, None
        if self.kind is not None and context_image is not None:
            raise ValueError("context_image (FLUX.1 Kontext's reference image) cannot be combined with FLUX.1 "
                             "Fill's or Control's condition")
        if fill and control_image is not None:
            raise ValueError("control_image is FLUX.1 Control's and image= / mask_image= FLUX.1 Fill's: one model "
                             "takes one of them, not both")
        if not fill:
            return
        if masked_image_latents is not None:
            if image is not None or mask_image is not None:
                raise ValueError("pass image= and mask_image=, or masked_image_latents= (the packed condition), "
                                 "not both")
            if strength is not None:
                raise ValueError(f"strength={strength!r} applies to image-to-image from image=, which "
                                 f"masked_image_latents= leaves out: leave strength unset")
            return
        missing = [k for k, v in (("image", image), ("mask_image", mask_image)) if v is None]
        if missing:
            raise ValueError(f"FLUX.1 Fill needs image= and mask_image= (or masked_image_latents=); missing: "
                             f"{', '.join(missing)}")
        self.fill_image = image
        self.strength = 1.0 if strength is None else strength
        # At strength 1 the start is the given noise, and the pipeline then encodes no start image.
        if (isinstance(self.strength, numbers.Real) and not isinstance(self.strength, bool) and self.strength == 1
                and latents_given):
            self.image, self.strength = None, None

    def guidance(self, guidance_scale):
        """The guidance embedding's value: FluxFillPipeline's default (30) for FLUX.1 Fill."""
        return FILL_GUIDANCE if guidance_scale is None and self.kind == "fill" else guidance_scale

    def attach(self, flow: DiffusersFlow, cond: Conditioning, height: int, width: int, generator,
               before_noise: bool) -> None:
        """Checks the transformer against the arguments and sets ``cond.channels``: before the starting noise
        is drawn (``before_noise``) for Control, after it for Fill, as the pipelines draw."""
        if before_noise:
            if self.kind is None:
                if extra_features(flow):
                    raise ValueError(f"this FLUX.1 transformer reads {extra_features(flow)} input features per "
                                     f"token beyond the state's and none were given: {_missing(flow)}")
                return
            given = "control_image" if self.kind == "control" else "image= / mask_image="
            if flow.kind != "flux":
                raise ValueError(f"{given} is FLUX.1 {self.kind.title()}'s condition; this is not a FLUX.1 model")
            if extra_features(flow) != condition_width(flow, self.kind):
                raise ValueError(f"{given} needs a FLUX.1 {self.kind.title()} transformer reading "
                                 f"{condition_width(flow, self.kind)} input features beyond the state's; this one "
                                 f"reads {extra_features(flow)} ({_missing(flow)})")
        if (self.kind == "control") != before_noise or self.kind is None:
            return
        p = cond.num_prompts
        if self.kind == "control":
            cond.channels = control_latents(flow, self.control, p, height, width, generator)
        elif self.masked is not None:
            cond.channels = _packed("masked_image_latents", self.masked, p, flow, height, width, "fill")
        else:
            cond.channels = fill_latents(flow, self.fill_image, self.mask_image, p, height, width, generator)


def _packed(name: str, value, prompts: int, flow: DiffusersFlow, height: int, width: int, kind: str):
    """A packed condition given as a Tensor [1 or P, L, features], checked and expanded to [P, L, features]."""
    shape = (flow.state_shape(height, width)[0], condition_width(flow, kind))
    if not isinstance(value, torch.Tensor) or value.dim() != 3 or tuple(value.shape[1:]) != shape:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a Tensor [1 or {prompts}, {shape[0]}, {shape[1]}] (packed latents at this "
                         f"height and width), got {got}")
    check_images(name, value, prompts)
    return value.to(device=flow.device, dtype=flow.dtype).expand(prompts, -1, -1)


def fill_latents(flow: DiffusersFlow, image, mask_image, prompts: int, height: int, width: int, generator=None):
    """FLUX.1 Fill's condition as FluxFillPipeline prepares it: [P, L, 4C + 4 f^2] in the transformer's dtype.

    The image and the mask (binarised; white is repainted) are resized to height x width; the masked image is
    one VAE posterior draw per image (with ``generator``), normalised and packed; the mask's f x f pixel block
    of every latent pixel becomes f^2 channels, packed like latents.
    """
    f = flow.vae_scale_factor
    masked, mask = masked_image_latents(flow, image, mask_image, prompts, height, width, generator)
    h, w = flow.latent_hw(height, width)
    n = mask.shape[0]
    blocks = mask[:, 0].reshape(n, h, f, w, f).permute(0, 2, 4, 1, 3).reshape(n, f * f, h, w)
    packed = flow.pack(blocks).to(device=masked.device)
    out = torch.cat([masked.expand(prompts, -1, -1), packed.expand(prompts, -1, -1)], dim=-1)
    return out.to(dtype=flow.dtype)


def masked_image_latents(flow: DiffusersFlow, image, mask_image, prompts: int, height: int, width: int,
                         generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the masked image's states [1 or P, *state_shape], the binarised mask's pixels [1 or P, 1, H, W]) as the
    FLUX.1 inpainting pipelines prepare them: image and mask resized to height x width, the mask's white pixels
    set to 0 in [-1, 1], one VAE posterior draw per masked image (with ``generator``)."""
    pixels = image_processor(flow).preprocess(image, height=height, width=width).float()
    mask = mask_pixels(flow, mask_image, height, width).float()
    check_images("image", pixels, prompts)
    check_images("mask_image", mask, prompts)
    return flow.encode_images(pixels * (1 - mask), generator), mask


def mask_pixels(flow: DiffusersFlow, mask_image, height: int, width: int, name: str = "mask_image") -> torch.Tensor:
    """A mask as the inpainting pipelines' mask processor gives it: [N, 1, height, width], grayscale, resized,
    binarised (white, >= 0.5, is 1: repainted). ``name``: the argument it came from, for errors."""
    for m in mask_image if isinstance(mask_image, (list, tuple)) else [mask_image]:
        # The processor keeps a Tensor's or array's dtype, and resizing is defined for floats and 8-bit values
        # alone: a bool or wider integer mask would fail inside torch's interpolation.
        dtype = m.dtype if isinstance(m, (torch.Tensor, np.ndarray)) else None
        if dtype is not None and not (dtype in (torch.uint8, np.uint8) or
                                      (m.is_floating_point() if isinstance(m, torch.Tensor) else dtype.kind == "f")):
            raise ValueError(f"{name} must hold floats in [0, 1] or 8-bit values (white, >= 0.5, is repainted), got "
                             f"{'a Tensor' if isinstance(m, torch.Tensor) else 'an array'} of {dtype} (e.g. "
                             f"mask.astype(np.uint8) * 255 for a bool array, mask.float() for a Tensor)")
    processor = image_processor(flow, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    return processor.preprocess(mask_image, height=height, width=width)


def control_latents(flow: DiffusersFlow, control_image, prompts: int, height: int, width: int, generator=None,
                    name: str = "control_image"):
    """FLUX.1 Control's condition as FluxControlPipeline prepares it: [P, L, 4C] in the transformer's dtype.

    Images are resized to height x width (a 4-D Tensor is taken as pixels in [-1, 1], a 3-D one as packed
    latents, both as given); one image is repeated for every prompt, and each prompt's is one VAE posterior
    draw (with ``generator``), normalised and packed. FluxControlPipeline draws one per image it generates:
    the same for one image per prompt, a fresh draw for each further image of a prompt.
    """
    if isinstance(control_image, torch.Tensor) and control_image.dim() == 3:
        return _packed(name, control_image, prompts, flow, height, width, "control")
    pixels = control_pixels(flow, control_image, prompts, height, width, name)
    return flow.encode_images(pixels, generator).to(dtype=flow.dtype)


def control_pixels(flow: DiffusersFlow, control_image, prompts: int, height: int, width: int,
                   name: str = "control_image") -> torch.Tensor:
    """Control images as pixels [P, 3, height, width] in [-1, 1]: images are resized to height x width, a 4-D
    Tensor is taken as pixels in [-1, 1] at that size; one image is repeated for every prompt."""
    if isinstance(control_image, torch.Tensor) and control_image.dim() == 4:
        pixels = control_image
    else:
        pixels = image_processor(flow).preprocess(control_image, height=height, width=width)
    check_images(name, pixels, prompts)
    if tuple(pixels.shape[-2:]) != (height, width):
        raise ValueError(f"{name} has {tuple(pixels.shape[-2:])} pixels; a Tensor of pixels must have the "
                         f"output's ({height}, {width})")
    return pixels.expand(prompts, -1, -1, -1) if pixels.shape[0] == 1 else pixels
