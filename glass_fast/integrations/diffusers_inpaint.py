"""Latent-blending inpainting: FluxInpaintPipeline and StableDiffusion3InpaintPipeline.

Both pipelines run image-to-image from ``image`` at ``strength`` and, after every step, replace the state where
the mask is black (kept) by the image's latents noised to the next step's noise level along the run's starting
noise; at the last step the kept region is the image's latents exactly. Here that blend is a ``project`` hook
(``glass_fast.Inpaint``) applied after every transition, so GLASS transitions and steering run unchanged. The
mask is binarised (white, >= 0.5, is repainted) and resized to the latents by nearest neighbour, as the
pipelines do; one mask for all prompts or one per prompt.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..inpaint import Inpaint
from ..schedules import LinearSchedule
from .diffusers_channels import check_images, image_processor
from .diffusers_checks import pipeline_classes

if TYPE_CHECKING:
    from .diffusers_adapter import DiffusersFlow

PIPELINES = ("FluxInpaintPipeline", "StableDiffusion3InpaintPipeline")


class InpaintArgs:
    """The inpainting arguments of a sample / steer call: ``active`` for the pipelines above.

    Args:
        pipe: the pipeline. image: the image to edit (also the image-to-image start). mask_image: white where
        content is generated. masked_image_latents: FluxInpaintPipeline's, which its transformer never reads
        (refused rather than ignored).
    """

    def __init__(self, pipe, image, mask_image, masked_image_latents=None):
        self.active = bool(pipeline_classes(pipe) & set(PIPELINES))
        self.mask_image = mask_image
        if not self.active:
            return
        if masked_image_latents is not None:
            raise ValueError("masked_image_latents= is not used by latent-blending inpainting (the transformer reads "
                             "only the state): pass image= and mask_image=")
        missing = [k for k, v in (("image", image), ("mask_image", mask_image)) if v is None]
        if missing:
            raise ValueError(f"inpainting needs image= (the image to edit) and mask_image= (white where content is "
                             f"generated); missing: {', '.join(missing)}")

    def check(self, flow: DiffusersFlow) -> None:
        """The transformer reads the state alone (SD3 inpainting models that also read the mask are not
        reproduced)."""
        extra = flow.transformer.config.in_channels - (getattr(flow.transformer.config, "out_channels", None)
                                                        or flow.transformer.config.in_channels)
        if self.active and flow.kind == "sd3" and extra:
            raise ValueError(f"this SD3 transformer reads {extra} input channels beyond the state's (an inpainting "
                             f"model taking the mask and masked image): not supported; latent-blending inpainting "
                             f"needs a transformer that reads the state alone")

    def mask(self, flow: DiffusersFlow, prompts: int, height: int, width: int) -> torch.Tensor:
        """The mask in the state layout, [1 or P, *state_shape]: 1 where content is generated."""
        processor = image_processor(flow, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
        mask = processor.preprocess(self.mask_image, height=height, width=width).float()
        check_images("mask_image", mask, prompts)
        mask = torch.nn.functional.interpolate(mask, size=flow.latent_hw(height, width))
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
