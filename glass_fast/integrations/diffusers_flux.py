"""FLUX specifics shared by FLUX.1 and FLUX.2 (position ids) and FLUX.2's own: its schedule shift, how its
pipelines guide, and its reference images.

FLUX.2's conventions, as its pipelines (Flux2Pipeline, Flux2KleinPipeline) use them: 4-axis position ids
(index, row, column, token) where text tokens count along the last axis, the generated image has index 0 and
reference image i has index 10 (i + 1); the schedule shift mu depends on the token count and the step count.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .diffusers_checks import pipeline_classes

if TYPE_CHECKING:
    from .diffusers_adapter import DiffusersFlow

# The FLUX.2 pipelines shrink reference images above this many pixels to it (keeping the aspect ratio).
REFERENCE_MAX_AREA = 1024 * 1024


def flux2_mu(seq_len: int, steps: int) -> float:
    """FLUX.2's schedule shift: mu is linear in the step count between two lines in the token count, fitted
    at 10 and at 200 steps; beyond 4300 tokens the 200-step line alone (the FLUX.2 pipelines' rule)."""
    at_200 = 1.6927e-4 * seq_len + 0.45666666
    if seq_len > 4300:
        return float(at_200)
    at_10 = 8.73809524e-05 * seq_len + 1.89833333
    slope = (at_200 - at_10) / 190.0
    return float(slope * steps + (at_200 - 200.0 * slope))


def packed_image_ids(kind: str, h2: int, w2: int, device, dtype, index: int = 0) -> torch.Tensor:
    """Positional ids of packed image tokens (raster order): FLUX.1 [(h/2)(w/2), 3] = (index, row, column),
    index 0 for the generated image, 1 for Kontext's reference; FLUX.2 [(h/2)(w/2), 4] = (index, row, column,
    0), index 0 for the generated image, 10 (i + 1) for reference image i. Built on the device (no
    host-to-device copy per transformer call, so a transition stays capturable as a CUDA graph)."""
    rows = torch.arange(h2, device=device).repeat_interleave(w2)
    cols = torch.arange(w2, device=device).repeat(h2)
    axes = [torch.full_like(rows, index), rows, cols] + ([torch.zeros_like(rows)] if kind == "flux2" else [])
    return torch.stack(axes, dim=1).to(dtype=dtype)


def text_ids(kind: str, tokens: int, device, dtype) -> torch.Tensor:
    """Positional ids of text tokens: FLUX.1 zeros [S, 3]; FLUX.2 [S, 4] = (0, 0, 0, token index)."""
    if kind != "flux2":
        return torch.zeros(tokens, 3, device=device, dtype=dtype)
    ids = torch.zeros(tokens, 4, device=device, dtype=dtype)
    ids[:, 3] = torch.arange(tokens, device=device, dtype=dtype)
    return ids


def reference_latents(flow: DiffusersFlow, pixels: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A reference image as the transformer reads it: pixels [n, 3, H, W] (whole patches) encoded to the VAE
    posterior's mean and packed, [n, L, 4C] float32, and its position ids [L, 3 or 4] at position ``index``."""
    h2, w2 = (side // flow.patch_pixels for side in pixels.shape[-2:])
    return flow.encode_images(pixels, mean=True), packed_image_ids(flow.kind, h2, w2, flow.device, torch.float32, index)


KV_PIPELINE = "Flux2KleinKVPipeline"   # reads its reference images through cached keys and values
SUPPORTED_PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinInpaintPipeline", KV_PIPELINE)
KLEIN = ("Flux2KleinPipeline", "Flux2KleinInpaintPipeline", KV_PIPELINE)   # guided as Klein: CFG, or distilled


def _flux2_pipeline_classes(pipeline) -> set:
    """The FLUX.2 pipeline classes ``pipeline`` is an instance of, by name (subclasses count; nothing is
    imported)."""
    return {c.__name__ for c in type(pipeline).__mro__
            if c.__name__.startswith("Flux2") and c.__name__.endswith("Pipeline")}


def check_flux2_pipeline(pipeline) -> None:
    """TypeError for FLUX.2 pipeline classes whose sampling loop differs from the text-to-image (and
    reference image, or latent-blending inpainting) loops reproduced here."""
    classes = _flux2_pipeline_classes(pipeline)
    if classes and not classes & set(SUPPORTED_PIPELINES):
        raise TypeError(f"{type(pipeline).__name__} is not supported: glass_fast reproduces the FLUX.2 "
                        f"pipelines {', '.join(SUPPORTED_PIPELINES[:-1])} and {SUPPORTED_PIPELINES[-1]}")


def flux2_guidance(flow: DiffusersFlow) -> str:
    """How a FLUX.2 model is guided, as its pipeline does it: "embedded" (Flux2Pipeline, FLUX.2 [dev]: the
    guidance value enters the guidance embedding), "cfg" (Flux2KleinPipeline, Flux2KleinInpaintPipeline: true
    classifier-free guidance with guidance_scale as its weight, the negative prompt "" by default) or
    "distilled" (a step-wise distilled Klein, ``is_distilled``, and Flux2KleinKVPipeline, whose loop has no
    guidance: no guidance at all). Without a FLUX.2 pipeline it follows the transformer: "embedded" when it has
    a guidance embedding, else "cfg"."""
    classes = _flux2_pipeline_classes(flow.pipeline)
    if KV_PIPELINE in classes:
        return "distilled"
    if classes & set(KLEIN):
        return "distilled" if flow.pipeline.config.get("is_distilled", False) else "cfg"
    if "Flux2Pipeline" in classes or flow.transformer.config.guidance_embeds:
        return "embedded"
    return "cfg"


def reference_tokens(flow: DiffusersFlow, image) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """FLUX.2's reference images as the transformer reads them, prepared as the FLUX.2 pipelines prepare
    their ``image``: each image (PIL) above REFERENCE_MAX_AREA pixels is shrunk to it, cropped to whole
    patches, encoded to the VAE posterior's mean, normalised and packed; image i gets position index 10 (i + 1).

    Args:
        flow: a FLUX.2 adapter with a VAE.
        image: a PIL image or a list of them, the references of every prompt.
    Returns:
        (tokens [1, L, 4C] float32 of all images in order, position ids [L, 4], (height, width) in pixels of
        the first image after preparation: the pipelines' default output size).
    """
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise ValueError("image (FLUX.2's reference images) is an empty list; pass None for text-to-image")
    multiple = flow.patch_pixels
    proc = getattr(flow.pipeline, "image_processor", None)
    if not isinstance(proc, Flux2ImageProcessor):
        proc = Flux2ImageProcessor(vae_scale_factor=multiple)
    parts, sizes = [], []
    for i, img in enumerate(images):
        proc.check_image_input(img)   # a PIL image, 64 pixels a side or more, aspect ratio at most 8
        if img.size[0] * img.size[1] > REFERENCE_MAX_AREA:
            img = proc._resize_to_target_area(img, REFERENCE_MAX_AREA)
        height, width = img.size[1] // multiple * multiple, img.size[0] // multiple * multiple
        pixels = proc.preprocess(img, height=height, width=width, resize_mode="crop")
        parts.append(reference_latents(flow, pixels, index=10 * (i + 1)))
        sizes.append((height, width))
    return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts]), sizes[0]


def check_flux2_images(images: dict, auto_resize) -> None:
    """FLUX.2 has no IP-Adapters, and its reference images are prepared as its pipelines prepare them."""
    given = [k for k, v in images.items() if v is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: FLUX.2 pipelines take no IP-Adapter image prompts (their image "
                         f"conditioning is reference images: image= or context_image=)")
    if auto_resize is not True:
        raise ValueError(f"context_auto_resize={auto_resize!r} is FLUX.1 Kontext's; FLUX.2's reference images are "
                         f"prepared as its pipelines prepare them (shrunk above 1024 x 1024 pixels)")


def kontext_image(pipe, image, context_image, strength):
    """(image, context_image): FluxKontextPipeline's ``image`` is its reference image, not an img2img start;
    so is the FLUX.2 pipelines' (reference images; FLUX.2 has no image-to-image pipeline). ``strength``, an
    image-to-image argument, is refused with a reference image rather than ignored."""
    if image is None or "Flux2KleinInpaintPipeline" in pipeline_classes(pipe):   # there: the image to edit
        return image, context_image
    from .diffusers_adapter import DiffusersFlow
    flux2 = DiffusersFlow.from_pipeline(pipe).kind == "flux2"   # an adapter is taken as it is, not rebuilt
    if not flux2 and "FluxKontextPipeline" not in pipeline_classes(pipe):
        return image, context_image
    name = "FLUX.2's reference image" if flux2 else "FLUX.1 Kontext's reference image"
    if context_image is not None:
        raise ValueError(f"pass {name} once: image= (as the pipeline takes it) or context_image=")
    if strength is not None:
        raise ValueError(f"strength={strength!r} applies to image-to-image, but image= is {name} here (this "
                         "pipeline has no image-to-image mode): leave strength unset")
    return None, image


def inpaint_image_size(flow: DiffusersFlow, images) -> tuple:
    """(images, height, width) as Flux2KleinInpaintPipeline sizes its image and its references: a batch (a list
    of 4-D Tensors joined) read by its first image, shrunk to REFERENCE_MAX_AREA pixels when larger, and the size
    rounded down to whole patches (the images are then resized or cropped to it)."""
    pipe = flow.pipeline
    if isinstance(images, list) and images and isinstance(images[0], torch.Tensor) and images[0].ndim == 4:
        images = torch.cat(images)
    height, width = pipe._get_raw_image_size(images)
    if height * width > REFERENCE_MAX_AREA:
        scale = math.sqrt(REFERENCE_MAX_AREA / (height * width))
        images = pipe.image_processor.resize(images, int(height * scale), int(width * scale))
        height, width = pipe._get_raw_image_size(images)
    multiple = flow.patch_pixels
    return images, height // multiple * multiple, width // multiple * multiple


def inpaint_references(flow: DiffusersFlow, image_reference, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux2KleinInpaintPipeline's ``image_reference`` as its transformer reads them, after the edited image's
    own tokens: the images (one, or several of the first one's size) shrunk as a batch to REFERENCE_MAX_AREA
    pixels when the first is larger, cropped to whole patches at the first one's size, encoded to the VAE
    posterior's mean and normalised; image i gets position index 20 + 10 i.

    ``rows``: the rows generated (prompts x images per prompt): the pipeline reads a batch of that many
    references as one per row rather than as a sequence, which is refused.
    Returns:
        (tokens [1, L, 4C] float32 of all images in order, position ids [L, 4]).
    """
    images, height, width = inpaint_image_size(flow, image_reference)
    pixels = flow.pipeline.image_processor.preprocess(images, height, width, resize_mode="crop")
    count = pixels.shape[0]
    if count > 1 and count == rows:
        raise ValueError(f"image_reference holds {count} images, as many as the rows generated: "
                         f"Flux2KleinInpaintPipeline then gives each row its own reference, which is not "
                         f"reproduced; pass one reference image, or a sequence of another length (shared by all)")
    tokens = reference_latents(flow, pixels, index=0)[0]
    h2, w2 = height // flow.patch_pixels, width // flow.patch_pixels
    ids = torch.cat([packed_image_ids("flux2", h2, w2, flow.device, torch.float32, 20 + 10 * i) for i in range(count)])
    return tokens.reshape(1, -1, tokens.shape[-1]), ids


def caches_references(flow: DiffusersFlow) -> bool:
    """Whether the model reads its reference images through cached keys and values (Flux2KleinKVPipeline)."""
    return flow.kind == "flux2" and KV_PIPELINE in _flux2_pipeline_classes(flow.pipeline)


class ReferenceCache:
    """Flux2KleinKVPipeline's reference images as the attention keys and values every call reads.

    Its transformer lets reference tokens attend only to each other and modulates them at the fixed time 0,
    so their keys and values at every layer depend on the reference images alone: not on the prompt, the
    state or the time. They are computed once, by one transformer pass over one row (as the pipeline computes
    them in its first step's call, with its ``kv_cache_mode="extract"``), and each call reads them expanded
    to its rows (``kv_cache_mode="cached"``), without copies.

    Args:
        flow: a FLUX.2 adapter of a Flux2KleinKVPipeline.
        tokens, ids: the reference tokens [1 or P, L, 4C] (the same for every prompt) and their position ids.
        embeds: [P, S, D] prompt embeddings (one row is read: the result does not depend on it).
        inputs: ``DiffusersFlow.packed_inputs`` of the size sampled (image and text ids, guidance).
        state_tokens: tokens of a state; attention_kwargs: the calls' ``joint_attention_kwargs`` (a LoRA
            scale changes the keys and values).
    """

    def __init__(self, flow: DiffusersFlow, tokens: torch.Tensor, ids: torch.Tensor, embeds: torch.Tensor,
                 inputs: tuple, state_tokens: int, attention_kwargs: dict | None):
        from diffusers.models.transformers.transformer_flux2 import Flux2KVCache
        if tokens.shape[0] > 1 and not bool((tokens == tokens[:1]).all()):
            raise ValueError("Flux2KleinKVPipeline's reference images are shared by every prompt; got different "
                             "reference tokens per prompt")
        tr, dtype = flow.transformer, flow.dtype
        img_ids, txt_ids, _ = inputs
        ref = tokens[:1].to(device=flow.device, dtype=dtype)
        state = torch.zeros(1, state_tokens, ref.shape[-1], device=flow.device, dtype=dtype)
        extra = None if attention_kwargs is None else dict(attention_kwargs)
        with torch.no_grad():
            _, cache = tr(hidden_states=torch.cat([ref, state], dim=1), timestep=torch.ones(1, device=flow.device,
                          dtype=dtype), guidance=None, encoder_hidden_states=embeds[:1].to(dtype), txt_ids=txt_ids,
                          img_ids=torch.cat([ids.to(img_ids), img_ids]), joint_attention_kwargs=extra,
                          return_dict=False, kv_cache_mode="extract", num_ref_tokens=ref.shape[1])
        self._make = Flux2KVCache
        self.num_ref_tokens = ref.shape[1]
        self._double = [c.get() for c in cache.double_block_caches]
        self._single = [c.get() for c in cache.single_block_caches]
        self._by_rows: dict = {}   # rows -> the cache expanded to them, made once per batch size

    def rows(self, n: int):
        """The cache (a Flux2KVCache) for a call on ``n`` rows."""
        if n not in self._by_rows:
            cache = self._make(num_double_layers=len(self._double), num_single_layers=len(self._single))
            for layers, kv in ((cache.double_block_caches, self._double), (cache.single_block_caches, self._single)):
                for layer, (k, v) in zip(layers, kv):
                    layer.store(k.expand(n, *k.shape[1:]), v.expand(n, *v.shape[1:]))
            cache.num_ref_tokens = self.num_ref_tokens
            self._by_rows[n] = cache
        return self._by_rows[n]
