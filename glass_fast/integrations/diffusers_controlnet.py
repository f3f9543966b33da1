"""ControlNets of FLUX.1 (FluxControlNetPipeline, FluxControlNetImg2ImgPipeline, FluxControlNetInpaintPipeline)
and SD3 (StableDiffusion3ControlNetPipeline, StableDiffusion3ControlNetInpaintingPipeline) in every transformer
call.

A ControlNet reads what the transformer reads plus a control condition and returns residuals that the
transformer adds to its blocks' hidden states (FLUX.1: ``controlnet_block_samples`` /
``controlnet_single_block_samples``; SD3: ``block_controlnet_hidden_states``). The sampler state stays the noisy
latents, so every transition (GLASS, SDE, steering) runs unchanged.

The condition is prepared as the pipelines prepare it, once per prompt (one image for every prompt, or one per
prompt) and read by every row of the prompt: FLUX.1: the VAE latents of the control image, normalised and packed
(pixels themselves for ControlNets with an input hint block); SD3: the VAE latents scaled by the VAE's scaling
factor and shifted by its shift factor, not shifted for ControlNets that zero their pooled projection.

The pipelines' rule for ``control_guidance_start`` / ``_end`` (step i of N on when start <= i / N and
(i + 1) / N <= end) becomes the window of glass_fast times t = 1 - sigma spanned by those steps on the
transition grid, [t_first, t_after_last): a model call at any time inside it, GLASS's inner calls included, gets
the ControlNet at ``controlnet_conditioning_scale``, outside it at scale 0 (as the pipelines' steps outside the
window). Classifier-free guidance as in the pipelines: FLUX.1 runs the ControlNet on the conditional rows and
gives its residuals to both branches; SD3 runs it on the stacked (unconditional, conditional) rows.

FluxControlNetImg2ImgPipeline and FluxControlNetInpaintPipeline run the same ControlNet calls on image-to-image
from ``image`` (the inpainting one blending its kept region back after every step, ``diffusers_inpaint``). They
count the window's steps among the steps that run, after ``strength`` has dropped the first ones: the window is
then read on that shortened grid. Both need ``image`` (their default guidance_scale, 7.0: ``diffusers_checks``). The
generator draws as theirs: the control image's VAE latents, then the image's, then the noise.

StableDiffusion3ControlNetInpaintingPipeline runs text-to-image from noise (no blend, no ``strength``); its
ControlNet (one extra conditioning channel) inpaints ``control_image`` where ``control_mask`` is white: its
condition is the VAE latents of the control image with the mask's pixels set to -1, shifted and scaled, followed
by 1 - mask resized to the latents (nearest), and it reads zero pooled projections and the prompt tokens
whatever its config says.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .diffusers_checks import pipeline_classes

if TYPE_CHECKING:
    from .diffusers_adapter import DiffusersFlow
    from .diffusers_conditioning import Conditioning

# The ControlNet pipelines editing an image (image-to-image, inpainting): ``image`` is required there.
EDIT_PIPELINES = ("FluxControlNetImg2ImgPipeline", "FluxControlNetInpaintPipeline")
# The SD3 pipeline inpainting its control image (the ControlNet reads the masked image and the mask).
INPAINT_PIPELINE = "StableDiffusion3ControlNetInpaintingPipeline"
SUPPORTED_PIPELINES = ("FluxControlNetPipeline", "StableDiffusion3ControlNetPipeline") + EDIT_PIPELINES + (
    INPAINT_PIPELINE,)
_NET_CLASSES = {"flux": "FluxControlNetModel", "sd3": "SD3ControlNetModel"}
_EPS = 1e-6   # tolerance of the window's ends for float32 times


def pipeline_controlnet(pipe):
    """The ControlNet a pipeline (or adapter) holds, or None; TypeError for ControlNet pipelines whose loops
    differ from those reproduced here."""
    from .diffusers_adapter import DiffusersFlow
    owner = pipe.pipeline if isinstance(pipe, DiffusersFlow) else pipe
    net = getattr(owner, "controlnet", None)
    if net is None:
        return None
    classes = {c.__name__ for c in type(owner).__mro__}
    if any(n.endswith("Pipeline") for n in classes) and not classes & set(SUPPORTED_PIPELINES):
        raise TypeError(f"{type(owner).__name__} is not supported: glass_fast reproduces the ControlNet pipelines "
                        f"{', '.join(SUPPORTED_PIPELINES[:-1])} and {SUPPORTED_PIPELINES[-1]}")
    return net


def _nets(controlnet) -> list:
    """The ControlNets of a single or multi ControlNet model."""
    return list(controlnet.nets) if hasattr(controlnet, "nets") else [controlnet]


def _as_list(name: str, value, n: int) -> list:
    """A per-ControlNet argument as a list of n entries (one value: every entry)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but there are {n} control images")
        return list(value)
    return [value] * n


def _number(name: str, value, lo=None, hi=None) -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or (lo is not None and not lo <= value <= hi)):
        allowed = "a number and finite" if lo is None else f"a number in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {allowed} (or a list of them, one per control image), got {value!r}")
    return float(value)


def steps_window(grid: torch.Tensor, on, whole: bool) -> tuple[float, float] | None:
    """The glass_fast times of a pipeline's steps i of N for which on(i, N) holds (``grid``: N + 1 increasing
    times): [grid[first], grid[last + 1]) with ``whole`` (the steps' whole intervals: every model call inside
    them), else [grid[first], grid[last]] (the steps' own times); None when no step is on."""
    n = len(grid) - 1
    kept = [i for i in range(n) if on(i, n)]
    if not kept:
        return None
    return float(grid[kept[0]]), float(grid[kept[-1] + 1 if whole else kept[-1]])


def in_window(t: torch.Tensor, window: tuple[float, float], whole: bool) -> torch.Tensor:
    """[N] bool: which times lie in a ``steps_window`` (half-open with ``whole``, else closed; float32 times
    within a tolerance), on the device: no host sync, so a transition stays capturable as a CUDA graph."""
    lo, hi = window
    return (t >= lo - _EPS) & ((t < hi - _EPS) if whole else (t <= hi + _EPS))


def step_window(start: float, end: float, grid: torch.Tensor) -> tuple[float, float] | None:
    """The pipelines' rule, step i of N on unless i / N < start or (i + 1) / N > end, as the half-open window
    of glass_fast times spanned by the steps it keeps (``steps_window``)."""
    return steps_window(grid, lambda i, n: not (i / n < start or (i + 1) / n > end), whole=True)


class ControlNetArgs:
    """The pipelines' ControlNet arguments, checked, and the condition they give.

    Args:
        pipe: the pipeline (or adapter) ``sample`` / ``steer`` got.
        control_image: one control image (or one per prompt), or a list of them per ControlNet for a
            multi-ControlNet (FluxMultiControlNetModel / SD3MultiControlNetModel; a multi-ControlNet of one
            union ControlNet takes any number of images, one mode each).
        scale, start, end: ``controlnet_conditioning_scale``, ``control_guidance_start`` / ``_end`` (a number,
            or a list of one per image); None: the pipelines' defaults 1.0, 0.0, 1.0.
        mode: ``control_mode`` of union ControlNets (an int, or a list per image; None where a net is not union).
        mask: INPAINT_PIPELINE's ``control_mask`` (white where content is generated; one, or one per prompt).
        mask_image: ``sample``'s, refused with INPAINT_PIPELINE (whose mask is ``control_mask``).
    Attributes:
        net: the pipeline's ControlNet, or None (then every ControlNet argument must be unset).
        edit: the EDIT_PIPELINES class reproduced, or None.
        inpaint: whether the pipeline is INPAINT_PIPELINE.
    """

    def __init__(self, pipe, control_image, scale=None, start=None, end=None, mode=None, mask=None,
                 mask_image=None):
        self.net = pipeline_controlnet(pipe)
        classes = pipeline_classes(pipe) if self.net is not None else set()
        edit = classes & set(EDIT_PIPELINES)
        self.edit = min(edit) if edit else None
        self.inpaint, self.mask = INPAINT_PIPELINE in classes, mask
        if mask is not None and not self.inpaint:
            raise ValueError(f"control_mask is {INPAINT_PIPELINE}'s mask of its control image; this pipeline takes "
                             f"none (the inpainting pipelines' mask is mask_image=)")
        if self.inpaint and mask_image is not None:
            raise ValueError(f"mask_image: {INPAINT_PIPELINE}'s mask is control_mask= (white where control_image, "
                             f"the image it inpaints, is repainted)")
        if self.inpaint and mask is None:
            raise ValueError(f"{INPAINT_PIPELINE} inpaints its control_image: pass control_mask= (white where "
                             f"content is generated)")
        given = [k for k, v in (("controlnet_conditioning_scale", scale), ("control_guidance_start", start),
                                ("control_guidance_end", end), ("control_mode", mode)) if v is not None]
        if self.net is None:
            if given:
                raise ValueError(f"{', '.join(given)}: this pipeline has no ControlNet (pipe.controlnet); these "
                                 f"are FluxControlNetPipeline's / StableDiffusion3ControlNetPipeline's arguments")
            return
        if control_image is None:
            raise ValueError(f"this pipeline has a ControlNet ({type(self.net).__name__}): pass control_image=")
        nets = _nets(self.net)
        multi = hasattr(self.net, "nets")
        images = list(control_image) if multi and isinstance(control_image, (list, tuple)) else [control_image]
        if not multi and isinstance(control_image, (list, tuple)) and any(
                isinstance(i, (list, tuple)) for i in control_image):
            raise ValueError("control_image holds lists of images (one per ControlNet), but the pipeline has one "
                             "ControlNet: pass one image, or one per prompt")
        # FLUX.1's multi-ControlNet of one (union) ControlNet reads any number of images; SD3's reads one per net.
        if (len(nets) > 1 or type(self.net).__name__ == "SD3MultiControlNetModel") and len(images) != len(nets):
            raise ValueError(f"control_image gives {len(images)} image(s) for {len(nets)} ControlNet(s): pass a list "
                             f"of one image (or one per prompt) per ControlNet")
        k = len(images)
        self.nets = nets if len(nets) == k else nets * k   # one union net reads every image in turn
        self.images = images
        self.scales = [_number("controlnet_conditioning_scale", s) for s in
                       _as_list("controlnet_conditioning_scale", 1.0 if scale is None else scale, k)]
        starts = [_number("control_guidance_start", s, 0.0, 1.0) for s in
                  _as_list("control_guidance_start", 0.0 if start is None else start, k)]
        ends = [_number("control_guidance_end", e, 0.0, 1.0) for e in
                _as_list("control_guidance_end", 1.0 if end is None else end, k)]
        for s, e in zip(starts, ends):
            if s >= e:
                raise ValueError(f"control_guidance_start ({s}) must be below control_guidance_end ({e})")
        self.bounds = list(zip(starts, ends))
        self.modes = _as_list("control_mode", mode, k)
        for net, m in zip(self.nets, self.modes):
            union = bool(getattr(net, "union", False))
            if union and m is None:
                raise ValueError("this is a union ControlNet (one model, several control types): pass control_mode= "
                                 "(an int, or one per control image)")
            if not union and m is not None:
                raise ValueError(f"control_mode={m!r} selects a union ControlNet's control type; this ControlNet "
                                 f"({type(net).__name__}) is not a union one")
            if m is not None and (isinstance(m, bool) or not isinstance(m, int)):
                raise ValueError(f"control_mode must be an int (or a list of them, one per control image), got {m!r}")
            count = getattr(net.config, "num_mode", None) if union else None
            if m is not None and count is not None and not 0 <= m < count:
                # Caught here rather than as an index out of range in the net's mode embedding.
                raise ValueError(f"control_mode={m} is not one of this union ControlNet's {count} control types "
                                 f"(0 to {count - 1})")

    def check(self, flow: DiffusersFlow, image, channels, context_image, ip_adapter, skip_layers) -> None:
        """Before anything is encoded: TypeError for a ControlNet that cannot drive the transformer, ValueError
        for what the ControlNet pipelines do not combine with it (image-to-image ``image``, except in the edit
        pipelines, which need it; a FLUX.1 Fill / Control kind ``channels``, Kontext's ``context_image``,
        IP-Adapter images or embeddings ``ip_adapter``, skip-layer guidance's layers)."""
        if self.net is None:
            return
        if flow.kind not in _NET_CLASSES or any(type(n).__name__ != _NET_CLASSES[flow.kind] for n in self.nets):
            names = sorted({type(n).__name__ for n in self.nets})
            raise TypeError(f"{', '.join(names)} cannot drive this transformer: FLUX.1 takes FluxControlNetModel, "
                            f"SD3 SD3ControlNetModel")
        if flow.kind == "sd3":
            _check_sd3_nets(self.nets, self.inpaint)
        if self.inpaint and image is not None:
            raise ValueError(f"image=: {INPAINT_PIPELINE} takes the image it inpaints as control_image= (with "
                             f"control_mask=) and starts from noise, not from an image")
        if self.edit is not None and image is None:
            raise ValueError(f"{self.edit} edits an image: pass image= (the image to edit)")
        other = [name for name, on in (("image= (image-to-image)", image is not None and self.edit is None),
                                       ("FLUX.1 Fill / Control conditions", channels is not None),
                                       ("context_image (FLUX.1 Kontext)", context_image is not None),
                                       ("IP-Adapter image prompts", any(v is not None for v in ip_adapter)),
                                       ("skip-layer guidance", skip_layers is not None)) if on]
        if other:
            raise ValueError(f"{', '.join(other)} cannot be combined with a ControlNet (the ControlNet pipelines "
                             f"reproduced here take none of them; image-to-image: {' or '.join(EDIT_PIPELINES)})")

    def attach(self, flow: DiffusersFlow, cond: Conditioning, height: int, width: int, generator,
               grid: torch.Tensor, before_noise: bool) -> None:
        """Encodes the condition and sets ``cond.control``: FLUX.1 before the starting noise is drawn (as
        FluxControlNetPipeline, with the generator); SD3 after it (StableDiffusion3ControlNetPipeline draws
        its VAE latents from the global random state, so the generator's noise stays the pipeline's).
        ``grid``: the transitions that run (image-to-image: after ``strength`` has dropped the first ones),
        on which the pipelines' step window is read."""
        if self.net is None or before_noise != (flow.kind == "flux"):
            return
        from .diffusers_channels import control_latents, control_pixels
        p = cond.num_prompts
        first = self.nets[0]
        images = []
        for i, img in enumerate(self.images):
            name = "control_image" if len(self.images) == 1 else f"control_image[{i}]"
            if flow.kind == "flux" and first.input_hint_block is not None:   # the net embeds pixels itself
                images.append(control_pixels(flow, img, p, height, width, name).to(flow.device, flow.dtype))
            elif flow.kind == "flux":
                images.append(control_latents(flow, img, p, height, width, generator, name))
            elif self.inpaint:
                images.append(_sd3_inpaint_condition(flow, img, self.mask, p, height, width, generator, name))
            else:
                images.append(_sd3_latents(flow, control_pixels(flow, img, p, height, width, name), generator,
                                           first.config.force_zeros_for_pooled_projection))
        cond.control = ControlNets(
            flow.kind, self.nets, images, self.modes, self.scales, [step_window(s, e, grid) for s, e in self.bounds],
            blocks_repeat=flow.kind == "flux" and first.input_hint_block is not None,
            guidance=flow.kind == "flux" and bool(first.config.guidance_embeds),
            # The inpainting pipeline gives its ControlNet zero pooled projections whatever the config says.
            zero_pooled=flow.kind == "sd3" and (self.inpaint or bool(first.config.force_zeros_for_pooled_projection)),
            text=flow.kind == "flux" or first.config.joint_attention_dim is not None)


def _check_sd3_nets(nets: list, inpaint: bool) -> None:
    """ValueError for SD3 ControlNets that the pipeline cannot run: INPAINT_PIPELINE's read one conditioning
    channel beyond the latents' (the mask) and the prompt tokens; StableDiffusion3ControlNetPipeline's none."""
    for net in nets:
        extra = net.config.extra_conditioning_channels
        if inpaint and extra != 1:
            raise ValueError(f"{INPAINT_PIPELINE}'s ControlNet reads the masked image's latents and the mask: it "
                             f"needs extra_conditioning_channels=1, this one has {extra}")
        if not inpaint and extra:
            raise ValueError(f"this SD3ControlNetModel reads {extra} conditioning channel(s) beyond the latents' "
                             f"(extra_conditioning_channels={extra}): an inpainting ControlNet, which "
                             f"{INPAINT_PIPELINE} runs with control_mask=")
        if inpaint and net.config.joint_attention_dim is None:
            raise ValueError(f"{INPAINT_PIPELINE} gives its ControlNet the prompt tokens; this one reads none "
                             f"(joint_attention_dim=None)")


def _sd3_latents(flow: DiffusersFlow, pixels: torch.Tensor, generator, zero_shift: bool) -> torch.Tensor:
    """SD3's control latents [P, C, h, w]: one VAE posterior draw per image, scaled by the VAE's scaling factor
    after subtracting its shift factor, except for ControlNets that zero their pooled projection (not shifted)."""
    flow._need_vae("encoding a control image")
    cfg = flow.vae.config
    with torch.no_grad():
        lat = flow.vae.encode(pixels.to(device=flow.device, dtype=flow.vae.dtype)).latent_dist.sample(generator)
    shift = 0.0 if zero_shift else (cfg.get("shift_factor", None) or 0.0)
    return ((lat - shift) * cfg.scaling_factor).to(dtype=flow.dtype)


def _sd3_inpaint_condition(flow: DiffusersFlow, image, mask, prompts: int, height: int, width: int, generator,
                           name: str) -> torch.Tensor:
    """INPAINT_PIPELINE's condition [P, C + 1, h, w]: the latents of the control image with the mask's pixels
    (> 0.5) set to -1, shifted and scaled (``_sd3_latents``), then 1 - mask resized to the latents (nearest). A
    4-D Tensor mask [1 or P, 1, height, width] is taken as given (values in [0, 1], not binarised), as the
    pipeline takes it; other masks are binarised and resized (``mask_pixels``)."""
    from .diffusers_channels import check_images, control_pixels, mask_pixels
    pixels = control_pixels(flow, image, prompts, height, width, name)
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        if tuple(mask.shape[1:]) != (1, height, width):
            raise ValueError(f"control_mask as a 4-D Tensor must have shape [1 or {prompts}, 1, {height}, "
                             f"{width}] (pixels at the output size), got {tuple(mask.shape)}")
        if mask.is_complex() or mask.dtype == torch.bool:
            raise TypeError(f"control_mask must be a real Tensor of values in [0, 1], got {mask.dtype}")
    else:
        mask = mask_pixels(flow, mask, height, width, "control_mask")
    check_images("control_mask", mask, prompts)
    if bool((mask < 0).any() or (mask > 1).any()):
        raise ValueError(f"control_mask must hold values in [0, 1], got values in [{float(mask.min())}, "
                         f"{float(mask.max())}]")
    mask = mask.to(device=pixels.device, dtype=torch.float32).expand(prompts, -1, -1, -1)
    masked = torch.where(mask > 0.5, -1.0, pixels.float())
    latents = _sd3_latents(flow, masked, generator, zero_shift=False)
    keep = 1.0 - torch.nn.functional.interpolate(mask, size=tuple(latents.shape[-2:]))
    return torch.cat([latents, keep.to(device=latents.device, dtype=latents.dtype)], dim=1)


@dataclass
class ControlNets:
    """ControlNets with their per-prompt conditions, as every transformer call reads them (``Conditioning.control``).

    Attributes:
        kind: "flux" or "sd3"; nets, images [P, ...], modes, scales, windows: one entry per control image.
        blocks_repeat: FLUX.1 ControlNets with an input hint block repeat their residuals over the blocks.
        guidance: the FLUX.1 ControlNet reads the guidance embedding; zero_pooled: the SD3 ControlNet reads zero
            pooled projections; text: it reads the prompt tokens.
    """

    kind: str
    nets: list
    images: list
    modes: list
    scales: list
    windows: list
    blocks_repeat: bool = False
    guidance: bool = False
    zero_pooled: bool = False
    text: bool = True

    def residuals(self, rows: torch.Tensor, t: torch.Tensor, cfg_pair: bool, x: torch.Tensor, sigma: torch.Tensor,
                  embeds: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None,
                  attention_kwargs: dict | None, txt_ids=None, img_ids=None) -> dict:
        """The transformer's ControlNet keyword arguments for one call.

        Args:
            rows: prompt indices of the call's rows (once, also for a CFG pair); t: their glass_fast times.
            cfg_pair: x, sigma, embeds, pooled stack the (unconditional, conditional) rows.
            x, sigma, embeds, pooled, txt_ids, img_ids: the transformer call's inputs; guidance: the guidance
                embedding's input, one value per row of x (read by FLUX.1 ControlNets with a guidance embedding).
        """
        if all(w is None for w in self.windows):   # never on: the residuals would all be zero
            return {}
        if self.kind == "flux" and cfg_pair:   # FluxControlNetPipeline: the conditional rows' residuals, twice
            half = x.shape[0] // 2
            x, sigma, embeds, pooled = x[half:], sigma[half:], embeds[half:], pooled[half:]
        pair = cfg_pair and self.kind == "sd3"
        rows_t = torch.cat([t, t]) if pair else t
        n = x.shape[0]
        total = None
        for net, image, mode, scale, window in zip(self.nets, self.images, self.modes, self.scales, self.windows):
            cond = image[rows]
            cond = torch.cat([cond, cond]) if pair else cond
            extra = None if attention_kwargs is None else dict(attention_kwargs)
            if self.kind == "flux":
                g = None if not self.guidance or guidance is None else guidance[:n]   # one value in every row
                modes = None if mode is None else torch.full((n, 1), mode, device=x.device, dtype=torch.long)
                out = net(hidden_states=x, controlnet_cond=cond, controlnet_mode=modes, conditioning_scale=1.0,
                          timestep=sigma, guidance=g, pooled_projections=pooled, encoder_hidden_states=embeds,
                          txt_ids=txt_ids, img_ids=img_ids, joint_attention_kwargs=extra, return_dict=False)
            else:
                out = net(hidden_states=x, timestep=sigma, encoder_hidden_states=embeds if self.text else None,
                          pooled_projections=torch.zeros_like(pooled) if self.zero_pooled else pooled,
                          controlnet_cond=cond, conditioning_scale=1.0, joint_attention_kwargs=extra,
                          return_dict=False)
            weight = _weight(rows_t, window, scale)
            out = [None if group is None else [(r.float() * weight.view(-1, 1, 1)).to(r.dtype) for r in group]
                   for group in out]
            total = out if total is None else [None if a is None or b is None else [u + v for u, v in zip(a, b)]
                                               for a, b in zip(total, out)]
        if self.kind == "sd3":
            return {"block_controlnet_hidden_states": total[0]}
        blocks, single = ([None if g is None else [torch.cat([r, r]) for r in g] for g in total] if cfg_pair
                          else total)
        return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": single,
                "controlnet_blocks_repeat": self.blocks_repeat}


def _weight(t: torch.Tensor, window: tuple[float, float] | None, scale: float) -> torch.Tensor:
    """[N] float32: ``scale`` for rows whose time lies in the window, 0 elsewhere."""
    if window is None:
        return torch.zeros(t.shape, device=t.device, dtype=torch.float32)
    return in_window(t, window, whole=True).to(torch.float32) * scale
