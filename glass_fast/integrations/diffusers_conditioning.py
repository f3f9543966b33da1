"""Prompt and image-prompt conditioning of a FLUX.1, FLUX.2 or SD3 pipeline: encoded once, one row per prompt.

Text prompts go through the pipeline's text encoders (or precomputed embeddings are checked and used);
IP-Adapter image prompts through its image encoder (or precomputed embeddings). Every row (image,
particle) of a prompt later reads its prompt's row (``DiffusersFlow.flow_model``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .diffusers_channels import check_finite, check_images, image_processor

if TYPE_CHECKING:
    from .diffusers_adapter import DiffusersFlow


@dataclass
class Conditioning:
    """Prompt embeddings, one row per prompt (encoded once, shared by every particle of the prompt).

    Attributes:
        prompt_embeds: [P, S, D] text token embeddings.
        pooled: [P, Dp] pooled text embeddings (None for FLUX.2, which has none).
        negative_embeds, negative_pooled: the same for the unconditional branch of classifier-free
            guidance, or None when no guidance branch is run.
        prompts: the P prompt strings where known (rewards such as CLIP score read them), else None.
        image_embeds: IP-Adapter image prompts, one Tensor [P, ...] per loaded adapter, or None.
        negative_image_embeds: the same for the unconditional branch (with classifier-free guidance).
        context, context_ids: FLUX.1 Kontext's reference image (or FLUX.2's reference images) as packed latent
            tokens [P, L, 4C] and their position ids [L, 3] (FLUX.2: [L, 4]), or None.
        channels: FLUX.1 Fill's or Control's condition [P, L, features], concatenated to the state's features
            in every call (``diffusers_channels``), or None.
        control: the ControlNets and their per-prompt conditions (``diffusers_controlnet.ControlNets``), or None.
    """

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None
    negative_embeds: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    prompts: list | None = None
    image_embeds: list | None = None
    negative_image_embeds: list | None = None
    context: torch.Tensor | None = None
    context_ids: torch.Tensor | None = None
    channels: torch.Tensor | None = None
    control: object | None = None

    @property
    def num_prompts(self) -> int:
        return self.prompt_embeds.shape[0]

    def context_rows(self, rows: torch.Tensor, cfg_pair: bool):
        """(tokens, ids) of the reference image for ``rows`` (prompt indices; twice for a CFG pair), or None."""
        if self.context is None:
            return None
        return cfg_stack(self.context[rows], cfg_pair), self.context_ids

    def channel_rows(self, rows: torch.Tensor, cfg_pair: bool) -> torch.Tensor | None:
        """The channel-concatenated condition of ``rows`` (prompt indices; twice for a CFG pair), or None."""
        return None if self.channels is None else cfg_stack(self.channels[rows], cfg_pair)

    def control_rows(self, rows: torch.Tensor, t: torch.Tensor, cfg_pair: bool):
        """The ControlNet residuals of a call on ``rows`` (prompt indices) at glass_fast times ``t`` (once, also
        for a CFG pair), as fn(x, sigma, embeds, pooled, guidance, attention_kwargs, txt_ids, img_ids), or None."""
        if self.control is None:
            return None
        return functools.partial(self.control.residuals, rows, t, cfg_pair)

    def attention_kwargs(self, kind: str, base: dict | None, rows: torch.Tensor, cfg_pair: bool) -> dict | None:
        """``base`` joint_attention_kwargs plus the IP-Adapter image prompts of ``rows`` (prompt indices), in
        the layout the transformer reads: FLUX a list per adapter, SD3 one Tensor. ``cfg_pair``: the call
        runs the stacked (unconditional, conditional) rows of classifier-free guidance."""
        if self.image_embeds is None:
            return base
        branches = (self.negative_image_embeds, self.image_embeds) if cfg_pair else (self.image_embeds,)
        per_adapter = [torch.cat([branch[i][rows] for branch in branches]) for i in range(len(self.image_embeds))]
        return {**(base or {}), "ip_adapter_image_embeds": per_adapter if kind == "flux" else per_adapter[0]}


def cfg_stack(rows: torch.Tensor, cfg_pair: bool) -> torch.Tensor:
    """Rows for one call: twice, stacked, for classifier-free guidance's (unconditional, conditional) pair."""
    return torch.cat([rows, rows]) if cfg_pair else rows


def _prompts(prompt):
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"prompt must be a string, a non-empty list of strings or None, got {prompt!r}")


def _matching(name: str, value, n: int):
    """A per-encoder prompt argument as a list of n strings (one string or one-entry list: for every prompt)."""
    texts = _prompts(value)
    if texts is None:
        return None
    if len(texts) == 1:
        return texts * n
    if len(texts) != n:
        raise ValueError(f"{name} has {len(texts)} entries but there are {n} prompts")
    return texts


def _check_embeds(name: str, value, dims: int, rows: int | None, flow: DiffusersFlow | None = None,
                  width_key: str | None = None, like=None):
    """``value`` is a finite Tensor with ``dims`` dimensions and ``rows`` rows (at least one), whose last dimension
    is the transformer config's ``width_key`` and whose shape past the rows is ``like``'s (the conditional
    embeddings, which classifier-free guidance batches with the unconditional ones)."""
    if not isinstance(value, torch.Tensor) or value.dim() != dims:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a Tensor with {dims} dimensions, got {got}")
    if rows is not None and value.shape[0] != rows:
        raise ValueError(f"{name} has {value.shape[0]} rows but there are {rows} prompts")
    if value.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one prompt's row, got shape {tuple(value.shape)}")
    width = None if width_key is None else flow.transformer.config.get(width_key, None)
    if width is not None and value.shape[-1] != width:
        raise ValueError(f"{name} has width {value.shape[-1]} (shape {tuple(value.shape)}) but the transformer reads "
                         f"{width} ({width_key} in its config)")
    if like is not None and value.shape[1:] != like.shape[1:]:
        raise ValueError(f"{name} has shape {tuple(value.shape)} but {name.replace('negative_', '')} "
                         f"{tuple(like.shape)}: classifier-free guidance runs both in one batched call, so they "
                         f"need the same tokens and width (encode both with the same max_sequence_length)")
    check_finite(name, value)


def _unused_texts(embeds_name: str, embeds, **texts) -> None:
    """Text prompts that precomputed embeddings would leave unread are refused (as the pipelines refuse them)."""
    given = [k for k, v in texts.items() if v is not None]
    if embeds is not None and given:
        raise ValueError(f"{', '.join(given)} would be ignored: {embeds_name} is given, and the text encoders only "
                         f"run without it; pass one or the other")


def encode(flow: DiffusersFlow, prompt=None, *, prompt_embeds=None, pooled_prompt_embeds=None, negative_prompt=None,
           negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, cfg: bool = False,
           max_sequence_length: int = 512, prompt_2=None, prompt_3=None, negative_prompt_2=None,
           negative_prompt_3=None, text_encoder_out_layers=None, lora_scale: float | None = None) -> Conditioning:
    """Prompt conditioning, one row per prompt: precomputed embeddings, or the pipeline's text encoders.

    Args:
        flow: the adapter.
        prompt: str or list of P strings (kept for rewards even when embeddings are given).
        prompt_embeds, pooled_prompt_embeds: [P, S, D] and [P, Dp], replacing the text encoders.
        negative_prompt, negative_prompt_embeds, negative_pooled_prompt_embeds: the unconditional branch.
        prompt_2, prompt_3, negative_prompt_2, negative_prompt_3: the pipelines' prompts for their other text
            encoders (FLUX: prompt_2 for T5; SD3: prompt_2 for CLIP-G, prompt_3 for T5), one or one per prompt;
            None: the same as prompt / negative_prompt.
        cfg: whether classifier-free guidance will run (then an unconditional branch is required).
        max_sequence_length: T5 token budget when encoding (FLUX.2: its text encoder's).
        text_encoder_out_layers: FLUX.2 only: the text encoder's hidden layers stacked into the embeddings
            (None: the pipeline's default).
        lora_scale: FLUX.1 and SD3: the scale of LoRA layers loaded into the text encoders while they encode,
            as the pipelines scale them by joint_attention_kwargs["scale"] (None: as loaded). FLUX.2's pipelines
            take none.
    Returns:
        Conditioning on the transformer's device and dtype.
    """
    if flow.kind == "flux2":
        return _encode_flux2(flow, _prompts(prompt), prompt_embeds, pooled_prompt_embeds, negative_prompt,
                             negative_prompt_embeds, negative_pooled_prompt_embeds, cfg, max_sequence_length,
                             prompt_2, prompt_3, negative_prompt_2, negative_prompt_3, text_encoder_out_layers)
    if text_encoder_out_layers is not None:
        raise ValueError("text_encoder_out_layers is a FLUX.2 argument (the layers of its text encoder); this "
                         "pipeline has no such argument")
    prompts = _prompts(prompt)
    pipe = flow.pipeline
    _unused_texts("prompt_embeds", prompt_embeds, prompt_2=prompt_2, prompt_3=prompt_3)
    _unused_texts("negative_prompt_embeds", negative_prompt_embeds, negative_prompt=negative_prompt,
                  negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3)
    if flow.kind == "flux" and (prompt_3 is not None or negative_prompt_3 is not None):
        raise ValueError("prompt_3 / negative_prompt_3 are for Stable Diffusion 3's third text encoder; FLUX has "
                         "two (prompt, prompt_2)")
    if prompt_embeds is None and prompts is None:
        raise ValueError("pass prompt or prompt_embeds (with pooled_prompt_embeds)")
    if prompt_embeds is not None and pooled_prompt_embeds is None:
        raise ValueError("pooled_prompt_embeds is required with prompt_embeds")
    if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
        raise ValueError("negative_pooled_prompt_embeds is required with negative_prompt_embeds")
    need_neg = cfg and negative_prompt_embeds is None
    if prompt_embeds is None or need_neg:
        if pipe is None or getattr(pipe, "text_encoder", None) is None or not hasattr(pipe, "encode_prompt"):
            if prompt_embeds is None:
                raise ValueError("prompt_embeds and pooled_prompt_embeds are required when the pipeline has no "
                                 "text encoders (text_encoder is None)")
            raise ValueError("classifier-free guidance needs negative_prompt_embeds and "
                             "negative_pooled_prompt_embeds when the pipeline has no text encoders (text_encoder "
                             "is None); pass them, or guidance_scale=1.0 (SD3) / true_cfg_scale=1.0 (FLUX) to run "
                             "without guidance")
    dev = flow.device
    with torch.no_grad():
        if flow.kind == "flux":
            if prompt_embeds is None:
                prompt_embeds, pooled_prompt_embeds, _ = pipe.encode_prompt(
                    prompt=prompts, prompt_2=_matching("prompt_2", prompt_2, len(prompts)), device=dev,
                    num_images_per_prompt=1, max_sequence_length=max_sequence_length, lora_scale=lora_scale)
            if need_neg:
                n = prompt_embeds.shape[0]
                negative_prompt_embeds, negative_pooled_prompt_embeds, _ = pipe.encode_prompt(
                    prompt=_matching("negative_prompt", negative_prompt, n),
                    prompt_2=_matching("negative_prompt_2", negative_prompt_2, n), device=dev,
                    num_images_per_prompt=1, max_sequence_length=max_sequence_length, lora_scale=lora_scale)
        elif prompt_embeds is None or need_neg:
            n = len(prompts) if prompt_embeds is None else prompt_embeds.shape[0]
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = \
                pipe.encode_prompt(prompt=prompts if prompt_embeds is None else None,
                                   prompt_2=_matching("prompt_2", prompt_2, n),
                                   prompt_3=_matching("prompt_3", prompt_3, n),
                                   device=dev, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
                                   prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                                   negative_prompt=_matching("negative_prompt", negative_prompt, n),
                                   negative_prompt_2=_matching("negative_prompt_2", negative_prompt_2, n),
                                   negative_prompt_3=_matching("negative_prompt_3", negative_prompt_3, n),
                                   negative_prompt_embeds=negative_prompt_embeds,
                                   negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                                   max_sequence_length=max_sequence_length, lora_scale=lora_scale)
    _check_embeds("prompt_embeds", prompt_embeds, 3, None, flow, "joint_attention_dim")
    return _conditioning(flow, prompts, cfg, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
                         negative_pooled_prompt_embeds)


def _conditioning(flow: DiffusersFlow, prompts, cfg: bool, embeds, pooled, negative, negative_pooled) -> Conditioning:
    """The Conditioning of checked prompt embeddings ``embeds``: the others are checked against them and their
    rows against ``prompts``, all moved to the transformer's device and dtype (FLUX.2: no pooled embeddings)."""
    n = embeds.shape[0]
    pooled_too = flow.kind != "flux2"
    if pooled_too:
        _check_embeds("pooled_prompt_embeds", pooled, 2, n, flow, "pooled_projection_dim")
    if prompts is not None and len(prompts) != n:
        raise ValueError(f"prompt has {len(prompts)} entries but prompt_embeds has {n} rows: they must match")
    if cfg:
        _check_embeds("negative_prompt_embeds", negative, 3, n, like=embeds)
        if pooled_too:
            _check_embeds("negative_pooled_prompt_embeds", negative_pooled, 2, n, like=pooled)
    rows = [embeds, pooled] + ([negative, negative_pooled] if cfg else [None, None])
    return Conditioning(*[None if v is None else v.to(device=flow.device, dtype=flow.dtype) for v in rows], prompts)


def _encode_flux2(flow: DiffusersFlow, prompts, prompt_embeds, pooled_prompt_embeds, negative_prompt,
                  negative_prompt_embeds, negative_pooled_prompt_embeds, cfg: bool, max_sequence_length: int,
                  prompt_2, prompt_3, negative_prompt_2, negative_prompt_3, out_layers) -> Conditioning:
    """``encode`` for FLUX.2: one text encoder (the pipeline's encode_prompt), no pooled embeddings; the
    unconditional branch's prompt is "" unless given (Flux2KleinPipeline's)."""
    given = {"pooled_prompt_embeds": pooled_prompt_embeds, "negative_pooled_prompt_embeds":
             negative_pooled_prompt_embeds, "prompt_2": prompt_2, "prompt_3": prompt_3,
             "negative_prompt_2": negative_prompt_2, "negative_prompt_3": negative_prompt_3}
    extra = [k for k, v in given.items() if v is not None]
    if extra:
        raise ValueError(f"FLUX.2 has one text encoder and no pooled embeddings: {', '.join(extra)} cannot be used "
                         f"(pass prompt / prompt_embeds and negative_prompt / negative_prompt_embeds)")
    if prompt_embeds is None and prompts is None:
        raise ValueError("pass prompt or prompt_embeds")
    _unused_texts("negative_prompt_embeds", negative_prompt_embeds, negative_prompt=negative_prompt)
    need_neg = cfg and negative_prompt_embeds is None
    pipe = flow.pipeline
    if (prompt_embeds is None or need_neg) and (pipe is None or getattr(pipe, "text_encoder", None) is None
                                                or not hasattr(pipe, "encode_prompt")):
        if prompt_embeds is None:
            raise ValueError("prompt_embeds is required when the pipeline has no text encoder (text_encoder is None)")
        raise ValueError("classifier-free guidance needs negative_prompt_embeds when the pipeline has no text "
                         "encoder (text_encoder is None); pass them, or guidance_scale=1.0 (FLUX.2 Klein) / "
                         "true_cfg_scale=1.0 to run without guidance")
    kw = dict(device=flow.device, num_images_per_prompt=1, max_sequence_length=max_sequence_length)
    if out_layers is not None:
        kw["text_encoder_out_layers"] = tuple(out_layers)
    with torch.no_grad():
        if prompt_embeds is None:
            prompt_embeds = pipe.encode_prompt(prompt=prompts, **kw)[0]
        _check_embeds("prompt_embeds", prompt_embeds, 3, None, flow, "joint_attention_dim")
        n = prompt_embeds.shape[0]
        if need_neg:
            negative = "" if negative_prompt is None else negative_prompt
            negative_prompt_embeds = pipe.encode_prompt(prompt=_matching("negative_prompt", negative, n), **kw)[0]
    return _conditioning(flow, prompts, cfg, prompt_embeds, None, negative_prompt_embeds, None)


def _loaded_ip_adapters(flow: DiffusersFlow) -> int:
    """How many IP-Adapters the transformer has loaded; ValueError when none."""
    tr = flow.transformer
    if flow.kind == "flux":
        proj = getattr(tr, "encoder_hid_proj", None)
        count = getattr(proj, "num_ip_adapters", 0)
    else:
        count = int(getattr(tr, "image_proj", None) is not None)
    if not count:
        raise ValueError("ip_adapter_image / ip_adapter_image_embeds need an IP-Adapter loaded into the "
                         "transformer (pipe.load_ip_adapter(...)); this transformer has none")
    return count


def _image_prompt(flow: DiffusersFlow, name: str, images, embeds, adapters: int, prompts: int) -> list:
    """One image-prompt branch: ``embeds`` (a Tensor or a list per adapter, each [1 or P, ...]) or the
    pipeline's image encoder applied to ``images``, as one Tensor [P, ...] per adapter."""
    if embeds is None:
        pipe = flow.pipeline
        if pipe is None or getattr(pipe, "image_encoder", None) is None:
            raise ValueError(f"{name} needs the pipeline's image encoder (image_encoder is None); pass "
                             f"{name}_embeds instead")
        with torch.no_grad():
            if flow.kind == "flux":
                embeds = pipe.prepare_ip_adapter_image_embeds(images, None, flow.device, 1)
            else:
                embeds = pipe.encode_image(images, flow.device)
    embeds = list(embeds) if isinstance(embeds, (list, tuple)) else [embeds]
    if len(embeds) != adapters:
        raise ValueError(f"{name}_embeds has {len(embeds)} entries but the transformer has {adapters} IP-Adapter(s)")
    out = []
    for e in embeds:
        if not isinstance(e, torch.Tensor) or e.dim() < 2 or e.shape[0] not in (1, prompts):
            got = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
            raise ValueError(f"{name}_embeds entries must be Tensors with a leading dimension of 1 or the number "
                             f"of prompts ({prompts}), got {got}")
        check_finite(f"{name}_embeds", e)
        out.append(e.to(device=flow.device, dtype=flow.dtype).expand((prompts,) + tuple(e.shape[1:])))
    return out


def image_prompts(flow: DiffusersFlow, prompts: int, cfg: bool, height: int, width: int, ip_adapter_image=None,
                  ip_adapter_image_embeds=None, negative_ip_adapter_image=None,
                  negative_ip_adapter_image_embeds=None) -> tuple[list | None, list | None]:
    """IP-Adapter image prompts as (conditional, unconditional) lists of one Tensor [P, ...] per adapter.

    Embeddings are used as given, images go through the pipeline's image encoder. Without classifier-free
    guidance the unconditional list is None; with it and no negative image prompt, the unconditional branch
    is the pipelines' default: zeros (SD3) or the embedding of a black image (FLUX). (None, None) when no
    image prompt is given.
    """
    if ip_adapter_image is None and ip_adapter_image_embeds is None:
        if negative_ip_adapter_image is not None or negative_ip_adapter_image_embeds is not None:
            raise ValueError("negative_ip_adapter_image(_embeds) needs ip_adapter_image or ip_adapter_image_embeds")
        return None, None
    adapters = _loaded_ip_adapters(flow)
    cond = _image_prompt(flow, "ip_adapter_image", ip_adapter_image, ip_adapter_image_embeds, adapters, prompts)
    if not cfg:
        return cond, None
    if negative_ip_adapter_image is None and negative_ip_adapter_image_embeds is None:
        if flow.kind == "sd3":
            return cond, [torch.zeros_like(e) for e in cond]
        negative_ip_adapter_image = [np.zeros((width, height, 3), dtype=np.uint8)] * adapters
    return cond, _image_prompt(flow, "negative_ip_adapter_image", negative_ip_adapter_image,
                               negative_ip_adapter_image_embeds, adapters, prompts)


def kontext_size(flow: DiffusersFlow, image, auto_resize: bool = True) -> tuple[int, int]:
    """(height, width) in pixels at which FLUX.1 Kontext's pipelines prepare an image (one, or a list read by
    its first): the closest of Kontext's preferred resolutions (``auto_resize``; else its own size), rounded
    down to whole patches."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    multiple = flow.patch_pixels
    height, width = image_processor(flow).get_default_height_width(image[0] if isinstance(image, list) else image)
    if auto_resize:
        _, width, height = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return height // multiple * multiple, width // multiple * multiple


def context_tokens(flow: DiffusersFlow, image, prompts: int, auto_resize: bool = True, name: str = "context_image"):
    """FLUX.1 Kontext's reference image as the transformer reads it, as FluxKontextPipeline prepares it.

    The image (one, or one per prompt) is resized to ``kontext_size``, encoded to the VAE posterior's mean and
    packed. ``name``: the argument it came from, for errors.

    Returns:
        (tokens [P, L, 4C] float32, position ids [L, 3] with first coordinate 1).
    """
    if flow.kind != "flux":
        raise ValueError(f"{name} is FLUX.1 Kontext's reference image: it needs a FLUX transformer")
    from .diffusers_flux import reference_latents

    proc = image_processor(flow)
    height, width = kontext_size(flow, image, auto_resize)
    pixels = proc.preprocess(proc.resize(image, height, width), height, width)
    check_images(name, pixels, prompts)
    tokens, ids = reference_latents(flow, pixels, index=1)
    return tokens.expand(prompts, -1, -1), ids
