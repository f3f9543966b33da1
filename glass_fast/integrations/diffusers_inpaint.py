"""Latent-blending inpainting: FluxInpaintPipeline, FluxControlInpaintPipeline, FluxControlNetInpaintPipeline,
FluxKontextInpaintPipeline, StableDiffusion3InpaintPipeline and Flux2KleinInpaintPipeline.

The pipelines run image-to-image from ``image`` at ``strength`` and, after every step, replace the state where
the mask is black (kept) by the image's latents noised to the next step's noise level along the run's starting
noise; at the last step the kept region is the image's latents exactly. Here that blend is a ``project`` hook
(``glass_fast.Inpaint``) applied after every transition, so GLASS transitions and steering run unchanged. The
mask is binarised (white, >= 0.5, is repainted) and resized as the pipelines do: to the latents by nearest
neighbour (FLUX.1, SD3), or bilinearly to the transformer's tokens (FLUX.2 Klein: soft at the edges); one mask
for all prompts or one per prompt.

FluxControlInpaintPipeline adds FLUX.1 Control's condition (``diffusers_channels``), and before drawing it
encodes the masked image, which its transformer never reads: that posterior draw is made here too, so that the
control image's draw and the noise are the pipeline's. FluxControlNetInpaintPipeline adds a ControlNet
(``diffusers_controlnet``); the masked image it encodes after the noise is never read either, and not drawn here.

Flux2KleinInpaintPipeline generates at its image's size (shrunk to 1024 x 1024 pixels when larger, cropped to
whole patches), encodes the image to the VAE posterior's mean (no draw), normalised by the VAE's batch-norm
statistics, and gives the transformer, beside the noisy state, the image's clean tokens (position index 10)
and those of its optional ``image_reference`` images (20, 30, ...). FluxKontextInpaintPipeline likewise
generates at its image's size (Kontext's preferred resolution closest to its aspect ratio, unless
``context_auto_resize=False``), encodes it to the posterior's mean, and gives the transformer FLUX.1 Kontext's
reference tokens (position index 1): those of ``image_reference`` when given, else the image's own.

``padding_mask_crop`` (``MaskCrop``): the pipelines that take it (CROP_PIPELINES) inpaint only a box around the
mask's white pixels, widened by the padding and to the output's aspect ratio: image and mask are cropped to it and
resized to height x width ("fill": kept aspect, the border stretched), so the state is the box's latents. Those
that paste the result back (FLUX.1 and SD3 inpainting, FLUX.2 Klein) overlay the decoded box, brought to the
box's pixels, onto the original image wherever the mask is not black; Kontext and ControlNet inpainting return the
box's images.

Given ``latents`` are the noise mixed with the image at the start, as for image-to-image (the pipelines start
from them unmixed, which only agrees at strength 1). Defaults are the pipelines': strength 0.6 (0.8 for FLUX.2
Klein, 1.0 for Kontext) and each pipeline's guidance_scale (``diffusers_checks.PIPELINE_GUIDANCE``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..inpaint import Inpaint
from ..schedules import LinearSchedule
from .diffusers_channels import check_images, image_processor, mask_pixels, masked_image_latents
from .diffusers_checks import pipeline_classes
from .diffusers_conditioning import context_tokens, kontext_size
from .diffusers_flux import inpaint_image_size, inpaint_references, packed_image_ids

if TYPE_CHECKING:
    from .diffusers_adapter import DiffusersFlow
    from .diffusers_conditioning import Conditioning

PIPELINES = ("FluxInpaintPipeline", "FluxControlInpaintPipeline", "FluxControlNetInpaintPipeline",
             "FluxKontextInpaintPipeline", "StableDiffusion3InpaintPipeline", "Flux2KleinInpaintPipeline")
# The pipelines taking a reference image beside the image to edit (which they encode to the posterior's mean).
REFERENCE_PIPELINES = ("Flux2KleinInpaintPipeline", "FluxKontextInpaintPipeline")
# The pipelines' default strength where it is not image-to-image's 0.6 (guidance_scale: diffusers_checks).
STRENGTH = {"Flux2KleinInpaintPipeline": 0.8, "FluxKontextInpaintPipeline": 1.0}
# The pipelines taking padding_mask_crop, and whether they paste the box's images back into the image.
CROP_PIPELINES = {"FluxInpaintPipeline": True, "StableDiffusion3InpaintPipeline": True,
                  "Flux2KleinInpaintPipeline": True, "FluxKontextInpaintPipeline": False,
                  "FluxControlNetInpaintPipeline": False}


class MaskCrop:
    """The pipelines' ``padding_mask_crop``: the box around a mask's white pixels (VaeImageProcessor's
    ``get_crop_region`` with ``pad`` pixels, widened to height:width), the crops resized into it, and the
    overlay of generated images onto the original one, all through the pipeline's own image and mask processors
    (FLUX.2's image processor cuts the box's images out of the generated ones at the overlay where the others
    resize them).

    Args:
        flow: the adapter of one of CROP_PIPELINES. image, mask_image: one PIL image each (the pipelines take no
            other kind here).
        pad: pixels added around the mask's bounding box. height, width: the size generated.
        name: the pipeline reproduced, for errors. overlay: whether the result is pasted back into ``image``
            (which must then have the mask's size).
    Attributes:
        coords: (x1, y1, x2, y2) of the box in the mask's pixels.
    """

    def __init__(self, flow: DiffusersFlow, image, mask_image, pad, height: int, width: int, name: str,
                 overlay: bool):
        import PIL.Image
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise ValueError(f"padding_mask_crop must be an integer >= 0 (pixels around the mask) or None, got "
                             f"{pad!r}")
        for arg, value in (("image", image), ("mask_image", mask_image)):
            if not isinstance(value, PIL.Image.Image):
                raise ValueError(f"padding_mask_crop needs {arg} as one PIL image, as {name} does; got "
                                 f"{type(value).__name__}")
        if not mask_image.convert("L").getbbox():
            raise ValueError("padding_mask_crop: mask_image has no pixel to repaint (all black), so there is no "
                             "region to crop around")
        if overlay and image.size != mask_image.size:
            # Checked before sampling: the pipelines fail here only when pasting.
            raise ValueError(f"padding_mask_crop pastes the result into image through mask_image: they must have "
                             f"the same size, got image {image.size} and mask_image {mask_image.size} (width, "
                             f"height; {name}'s image as it resizes it)")
        self.mask_image, self.height, self.width = mask_image, height, width
        self.images, self.masks = flow.pipeline.image_processor, flow.pipeline.mask_processor
        self.coords = self.masks.get_crop_region(mask_image, width, height, pad=pad)

    def crop(self, image, mask: bool = False, size: tuple | None = None):
        """``image`` (PIL, or a list of them) cut to the box and resized to height x width (or ``size``) as the
        pipelines' preprocess does with ``crops_coords`` and resize_mode "fill"; other kinds of images as given
        (their preprocess crops only PIL images). ``mask``: with the mask processor."""
        import PIL.Image
        if isinstance(image, list):
            return [self.crop(i, mask, size) for i in image]
        if not isinstance(image, PIL.Image.Image):
            return image
        height, width = (self.height, self.width) if size is None else size
        return (self.masks if mask else self.images).resize(image.crop(self.coords), height, width,
                                                            resize_mode="fill")

    def paste(self, original, images: torch.Tensor, output_type: str):
        """Decoded images [N, 3, H, W] in [-1, 1] of the box, pasted onto ``original`` (PIL) where the mask is
        not black, as the pipelines' ``apply_overlay``: the box's images resized (kept aspect, centre cut; FLUX.2:
        cut alone) to the box's pixels. Returns them as ``output_type`` ("pil", "np" or "pt" on the images'
        device, 8-bit values: the overlay is made on PIL images)."""
        proc = self.images
        pasted = [proc.apply_overlay(self.mask_image, original, i, self.coords)
                  for i in proc.postprocess(images, output_type="pil")]
        if output_type == "pil":
            return pasted
        array = proc.pil_to_numpy(pasted)
        return array if output_type == "np" else proc.numpy_to_pt(array).to(images.device)


class InpaintArgs:
    """The inpainting arguments of a sample / steer call: ``active`` for the pipelines above.

    Args:
        pipe: the pipeline. image: the image to edit (also the image-to-image start). mask_image: white where
        content is generated. masked_image_latents: FluxInpaintPipeline's, which its transformer never reads
        (refused rather than ignored). image_reference: the reference images of REFERENCE_PIPELINES.
        context_image: ``sample``'s (the reference-image pipelines take ``image_reference`` instead).
        auto_resize: ``sample``'s ``context_auto_resize`` (FluxKontextInpaintPipeline's ``_auto_resize``).
        padding_mask_crop: the pipelines' (CROP_PIPELINES): inpaint a box around the mask (``MaskCrop``).
    Attributes:
        name: the pipeline class reproduced, or None. mean: whether the image is encoded to the VAE posterior's
        mean (no generator draw) rather than drawn from it. crop: the ``MaskCrop`` once ``size`` has run, or None.
    """

    def __init__(self, pipe, image, mask_image, masked_image_latents=None, image_reference=None, context_image=None,
                 auto_resize: bool = True, padding_mask_crop=None):
        names = pipeline_classes(pipe) & set(PIPELINES)
        self.active, self.name = bool(names), min(names) if names else None
        self.image, self.mask_image, self.reference = image, mask_image, image_reference
        self.auto_resize, self.pad, self.crop, self.original = auto_resize, padding_mask_crop, None, None
        self.mean = self.name in REFERENCE_PIPELINES
        if padding_mask_crop is not None and self.name not in CROP_PIPELINES:
            own = self.name or type(getattr(pipe, "pipeline", None) or pipe).__name__
            raise ValueError(f"padding_mask_crop={padding_mask_crop!r}: only {', '.join(CROP_PIPELINES)} take it; "
                             f"this pipeline ({own}) has no such argument")
        if image_reference is not None and self.name not in REFERENCE_PIPELINES:
            raise ValueError(f"image_reference is the reference image of {', '.join(REFERENCE_PIPELINES)}; this "
                             f"pipeline takes none (FLUX.1 Kontext: context_image=, FLUX.2: image= or context_image=)")
        if not self.active:
            return
        if self.name in REFERENCE_PIPELINES and context_image is not None:
            raise ValueError(f"context_image: {self.name}'s reference images are image_reference= (image= is the "
                             f"image to edit)")
        if masked_image_latents is not None:
            raise ValueError("masked_image_latents= is not used by latent-blending inpainting (the transformer reads "
                             "only the state): pass image= and mask_image=")
        missing = [k for k, v in (("image", image), ("mask_image", mask_image)) if v is None]
        if missing:
            raise ValueError(f"inpainting needs image= (the image to edit) and mask_image= (white where content is "
                             f"generated); missing: {', '.join(missing)}")
        # Every one of these pipelines encodes image= through the VAE (none takes its latents), which would fail
        # in its first convolution.
        for name, value in (("image", image), ("image_reference", image_reference)):
            value = value[0] if isinstance(value, list) and value else value
            if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[1] != 3:
                raise ValueError(f"{name} must be images (PIL, arrays, or Tensors of 3 channels), got a Tensor "
                                 f"of shape {tuple(value.shape)} ({self.name}'s latents are not taken)")

    def strength(self, strength):
        """``strength``, or the pipeline's default where it is not image-to-image's (0.6)."""
        return STRENGTH.get(self.name) if strength is None else strength

    def check(self, flow: DiffusersFlow) -> None:
        """The transformer reads the state alone (SD3 inpainting models that also read the mask are not
        reproduced)."""
        extra = flow.transformer.config.in_channels - (getattr(flow.transformer.config, "out_channels", None)
                                                        or flow.transformer.config.in_channels)
        if self.active and flow.kind == "sd3" and extra:
            raise ValueError(f"this SD3 transformer reads {extra} input channels beyond the state's (an inpainting "
                             f"model taking the mask and masked image): not supported; latent-blending inpainting "
                             f"needs a transformer that reads the state alone")

    def size(self, flow: DiffusersFlow, height, width) -> tuple:
        """(height, width) of the images generated: the arguments, except for the pipelines that generate at
        their image's size (REFERENCE_PIPELINES), where a different height or width is refused rather
        than ignored. The image is resized here as the pipeline resizes it (``self.image``), then, with
        ``padding_mask_crop``, cut to the box around the mask with the mask (and Kontext's reference)."""
        if self.name not in REFERENCE_PIPELINES:
            if self.pad is None:
                return height, width
            # The box's shape follows the size generated, so the pipeline's default size is settled here.
            return self._crop(flow, flow.default_size() if height is None else height,
                              flow.default_size() if width is None else width)
        image, multiple = self.image, flow.patch_pixels
        if self.name == "FluxKontextInpaintPipeline":
            if isinstance(image, list) and image and isinstance(image[0], torch.Tensor) and image[0].ndim == 4:
                image = torch.cat(image)
            own = kontext_size(flow, image, self.auto_resize)
            image = image_processor(flow).resize(image, *own)
            how = ("Kontext's preferred resolution closest to its aspect ratio, " if self.auto_resize else "") + \
                f"rounded down to multiples of {multiple}"
        else:
            image, *own = inpaint_image_size(flow, image)
            how = f"shrunk to 1024 x 1024 pixels when larger, rounded down to multiples of {multiple}"
        for name, value, size in (("height", height, own[0]), ("width", width, own[1])):
            if value is not None and value != size:
                raise ValueError(f"{name}={value!r}: {self.name} generates at its image's size, {own[0]} x "
                                 f"{own[1]} pixels here ({how}); leave height and width unset or pass those")
        self.image = image
        return tuple(own) if self.pad is None else self._crop(flow, *own)

    def _crop(self, flow: DiffusersFlow, height: int, width: int) -> tuple:
        """Replaces the image and the mask by their crops (``MaskCrop``), FluxKontextInpaintPipeline's reference
        too (cut with the same box in its own pixels, as that pipeline does), keeping the image as it was for
        the overlay. Returns (height, width)."""
        self.crop = MaskCrop(flow, self.image, self.mask_image, self.pad, height, width, self.name,
                             CROP_PIPELINES[self.name])
        self.original = self.image
        self.image, self.mask_image = self.crop.crop(self.image), self.crop.crop(self.mask_image, mask=True)
        if self.name == "FluxKontextInpaintPipeline" and self.reference is not None:
            # Prepared at its own Kontext size and cut there; context_tokens then keeps that size.
            own = kontext_size(flow, self.reference, self.auto_resize)
            self.reference = self.crop.crop(self.crop.images.resize(self.reference, *own), size=own)
        return height, width

    def paste(self, images: torch.Tensor, output_type: str):
        """The pipelines' final images from decoded ones [N, 3, H, W] in [-1, 1]: pasted back into the image
        where the pipeline pastes them (``MaskCrop.paste``), else None."""
        if self.crop is None or not CROP_PIPELINES[self.name]:
            return None
        return self.crop.paste(self.original, images, output_type)

    def draw_before_condition(self, flow: DiffusersFlow, prompts: int, height: int, width: int, generator) -> None:
        """FluxControlInpaintPipeline's first use of the generator: one posterior draw per masked image (the image
        with the mask's white pixels set to 0), made and discarded here so that the later draws are its own."""
        if self.name == "FluxControlInpaintPipeline":
            masked_image_latents(flow, self.image, self.mask_image, prompts, height, width, generator)

    def attach(self, flow: DiffusersFlow, cond: Conditioning, image_states: torch.Tensor, rows: int, height: int,
               width: int) -> None:
        """Sets the reference tokens the transformer reads beside the state: for Flux2KleinInpaintPipeline the
        image's own latents ``image_states`` [1 or P, L, 4C] (position index 10), then ``image_reference``'s;
        for FluxKontextInpaintPipeline ``image_reference``'s, else the image's own (index 1). ``rows``: the
        rows generated."""
        p = cond.num_prompts
        h, w = flow.latent_hw(height, width)
        if self.name == "FluxKontextInpaintPipeline":
            if self.reference is None:
                cond.context = image_states.expand(p, -1, -1)
                cond.context_ids = packed_image_ids(flow.kind, h // 2, w // 2, flow.device, torch.float32, index=1)
            else:
                cond.context, cond.context_ids = context_tokens(flow, self.reference, p, self.auto_resize,
                                                                "image_reference")
            return
        if self.name != "Flux2KleinInpaintPipeline":
            return
        tokens = [image_states.expand(p, -1, -1)]
        ids = [packed_image_ids(flow.kind, h // 2, w // 2, flow.device, torch.float32, index=10)]
        if self.reference is not None:
            ref, ref_ids = inpaint_references(flow, self.reference, rows)
            tokens.append(ref.expand(p, -1, -1))
            ids.append(ref_ids)
        cond.context, cond.context_ids = torch.cat(tokens, dim=1), torch.cat(ids)

    def mask(self, flow: DiffusersFlow, prompts: int, height: int, width: int) -> torch.Tensor:
        """The mask in the state layout, [1 or P, *state_shape] (FLUX.2: [1 or P, L, 1], one value per token):
        1 where content is generated."""
        mask = mask_pixels(flow, self.mask_image, height, width)
        check_images("mask_image", mask, prompts)
        h, w = flow.latent_hw(height, width)
        if flow.kind == "flux2":
            # In the processed mask's dtype, as the pipeline: a mask given as uint8 arrays stays uint8, and its
            # bilinear token values are rounded to 0 or 1; PIL and float masks give soft edges.
            tokens = torch.nn.functional.interpolate(mask, size=(h // 2, w // 2), mode="bilinear")
            return tokens.float().flatten(2).transpose(1, 2).to(flow.device)
        mask = mask.float()
        mask = torch.nn.functional.interpolate(mask, size=(h, w))
        return flow.pack(mask.repeat(1, flow.latent_channels(), 1, 1)).to(flow.device)

    def hook(self, flow: DiffusersFlow, image_states: torch.Tensor, noise: torch.Tensor, prompts: int,
             height: int, width: int) -> Inpaint:
        """The blend for rows [P * per_prompt, *state] (prompt-major) whose start noise is ``noise``:
        ``image_states`` [1 or P, *state] are the image's latents (the same draw the start was mixed from)."""
        per_prompt = noise.shape[0] // prompts

        def rows(v):   # one for all rows, or one per prompt spread over its rows
            return v if v.shape[0] == 1 else v.repeat_interleave(per_prompt, dim=0)
        # The pipelines' states are x_sigma = (1 - sigma) z + sigma eps: the linear path at t = 1 - sigma.
        return Inpaint(LinearSchedule(), rows(image_states), rows(self.mask(flow, prompts, height, width)), noise)
