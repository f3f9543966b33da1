"""FLUX.1, FLUX.2 and Stable Diffusion 3 pipelines sampled and steered with GLASS, ODE and SDE transitions.

    pip install "glass_fast[diffusers]"

    >>> from glass_fast.integrations.diffusers import sample, steer
    >>> images = sample(pipe, "a red bicycle", method="glass", transitions=5, inner_steps=10)
    >>> images, result = steer(pipe, "a red bicycle", reward, particles=8)

The transition grid is the pipeline's own (shifted) sigma schedule with ``transitions`` steps, read as
glass_fast times t = 1 - sigma; ``method="ode", inner_steps=1`` is then the pipeline's Euler loop. The
sampler state is float32 in the transformer's latent layout (see ``diffusers_adapter``); the transformer
runs in its own dtype. Prompts are encoded once and shared by all rows (images, particles) of a prompt.
"""
from __future__ import annotations

import torch

from ..plan import check_calls
from ..sampling import DEFAULT_TRANSITIONS, Sampler, check_hooks, in_turn, transition_grid
from ..transitions import check_state
from .diffusers_adapter import NAMES, DiffusersFlow, SkipLayerGuidance, transformer_kind  # noqa: F401
from .diffusers_channels import (ChannelCondition, check_finite, check_images, control_latents,  # noqa: F401
                                 fill_latents, image_processor)
from .diffusers_checks import (OUTPUT_TYPES, check_capturable, check_generator, check_output,  # noqa: F401
                               check_steering_options, guidance_weight, pipeline_guidance)
from .diffusers_conditioning import Conditioning, context_tokens, encode, image_prompts  # noqa: F401
from .diffusers_controlnet import ControlNetArgs
from .diffusers_flux import check_flux2_images, flux2_guidance, kontext_image, reference_tokens
from .diffusers_inpaint import InpaintArgs
from .rewards import CLIPScoreReward, ImageGuidance, ImageReward, LatentReward  # noqa: F401

_EMBEDDING_ARGS = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt", "negative_prompt_embeds",
                   "negative_pooled_prompt_embeds", "max_sequence_length", "prompt_2", "prompt_3",
                   "negative_prompt_2", "negative_prompt_3", "text_encoder_out_layers")
_IMAGE_PROMPT_ARGS = ("ip_adapter_image", "ip_adapter_image_embeds", "negative_ip_adapter_image",
                      "negative_ip_adapter_image_embeds", "context_image", "context_auto_resize")
_SKIP_LAYER_ARGS = ("skip_guidance_layers", "skip_layer_guidance_scale", "skip_layer_guidance_start",
                    "skip_layer_guidance_stop")


def as_flow(pipe) -> DiffusersFlow:
    """The ``DiffusersFlow`` adapter of a pipeline (or the adapter itself)."""
    return DiffusersFlow.from_pipeline(pipe)


def _setup(flow: DiffusersFlow, prompt, embeds: dict, per_prompt: int, per_name: str, height, width, guidance_scale,
           true_cfg_scale, max_batch, attention_kwargs, transitions: int | None, grid, skip_layers: dict, sigmas=None):
    """(conditioning, FlowModel, height, width, transition grid), shared by sample and steer.

    ``embeds``: the prompt and image-prompt arguments by name; ``skip_layers``: the pipeline's
    skip_guidance_layers / skip_layer_guidance_scale / _start / _stop."""
    if attention_kwargs is not None and not isinstance(attention_kwargs, dict):
        raise TypeError(f"joint_attention_kwargs must be a dict or None, got {type(attention_kwargs).__name__}")
    if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or per_prompt < 1:
        raise ValueError(f"{per_name} must be an integer >= 1, got {per_prompt!r}")
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch must be an integer >= 1 or None, got {max_batch!r}")
    images = {k: embeds.pop(k) for k in _IMAGE_PROMPT_ARGS}
    context, auto_resize = images.pop("context_image"), images.pop("context_auto_resize")
    references = None
    if flow.kind == "flux2":
        check_flux2_images(images, auto_resize)
        if context is not None:   # the FLUX.2 pipelines' default size is their first reference image's
            references = reference_tokens(flow, context)
            height, width = (references[2][0] if height is None else height,
                             references[2][1] if width is None else width)
    height = flow.default_size() if height is None else height
    width = flow.default_size() if width is None else width
    flow.latent_hw(height, width)
    cfg, cfg_scale, distilled = _guidance(flow, guidance_scale, true_cfg_scale, embeds)
    # The pipelines scale LoRA layers loaded into the text encoders by joint_attention_kwargs["scale"] too.
    lora_scale = None if attention_kwargs is None else attention_kwargs.get("scale")
    cond = encode(flow, prompt, cfg=cfg, lora_scale=lora_scale, **embeds)
    if references is not None:
        cond.context, cond.context_ids = references[0].expand(cond.num_prompts, -1, -1), references[1]
    elif flow.kind != "flux2":
        cond.image_embeds, cond.negative_image_embeds = image_prompts(flow, cond.num_prompts, cfg, height, width,
                                                                      **images)
        if context is not None:
            cond.context, cond.context_ids = context_tokens(flow, context, cond.num_prompts, auto_resize)
    if grid is not None and sigmas is not None:
        raise ValueError("pass grid (glass_fast times) or sigmas (the pipeline's noise levels), not both")
    if grid is not None:
        grid = transition_grid(transitions, grid)
    elif sigmas is not None:
        grid = flow.time_grid(None, height, width, sigmas)   # the sigmas set the number of steps
        if transitions is not None and transitions != len(grid) - 1:
            raise ValueError(f"transitions={transitions!r} disagrees with sigmas, which set {len(grid) - 1} "
                             f"transitions: pass sigmas alone")
    else:
        steps = DEFAULT_TRANSITIONS if transitions is None else check_calls(transitions, "transitions")
        grid = flow.time_grid(steps, height, width)
    slg = None
    if skip_layers["skip_guidance_layers"] is not None:
        slg = SkipLayerGuidance.from_steps(skip_layers["skip_guidance_layers"],
                                           skip_layers["skip_layer_guidance_scale"],
                                           skip_layers["skip_layer_guidance_start"],
                                           skip_layers["skip_layer_guidance_stop"], grid)
    model = flow.flow_model(cond, per_prompt, height, width, guidance_scale=distilled,
                            cfg_scale=cfg_scale if cfg else 1.0, max_batch=max_batch,
                            attention_kwargs=attention_kwargs, skip_layer_guidance=slg)
    return cond, model, height, width, grid


def _prepare(a: dict, per_name: str, grid, cuda_graph: bool):
    """What sample and steer share: check and map the pipeline-style arguments ``a`` (the caller's locals, by
    name), encode prompts and images, build the FlowModel and the transition grid, draw the start states.

    ``per_name``: "num_images_per_prompt" (sample; ``latents`` [P * n, *state]) or "particles" (steer;
    ``latents`` [P, K, *state]). Returns (adapter, conditioning, FlowModel, height, width, grid, start states
    [P * rows, *state], the ``project`` hook: the inpainting pipelines' blend, then the caller's ``project``;
    None without either, and the ``paste`` of decoded images into the image under ``padding_mask_crop``:
    ``InpaintArgs.paste``)."""
    pipe, latents, generator, per_prompt = a["pipe"], a["latents"], a["generator"], a[per_name]
    check_capturable(cuda_graph, a["skip_guidance_layers"])
    check_hooks(None, None, a["project"])
    flow = as_flow(pipe)   # built once: every step below reads this adapter
    check_generator(generator, flow.device)
    image, context_image = kontext_image(flow, a["image"], a["context_image"], a["strength"])
    inpaint = InpaintArgs(flow, image, a["mask_image"], a["masked_image_latents"], a["image_reference"],
                          context_image, a["context_auto_resize"], a["padding_mask_crop"])
    inpaint.check(flow)
    height, width = inpaint.size(flow, a["height"], a["width"])
    image = inpaint.image   # as given, or resized as the Kontext and Klein inpainting pipelines resize it
    strength = inpaint.strength(a["strength"])
    # An inpainting pipeline's mask is blended into the state, not a FLUX.1 Fill condition.
    mask_image, masked = (None, None) if inpaint.active else (a["mask_image"], a["masked_image_latents"])
    ctl = ControlNetArgs(flow, a["control_image"], a["controlnet_conditioning_scale"], a["control_guidance_start"],
                         a["control_guidance_end"], a["control_mode"], a["control_mask"], a["mask_image"])
    chan = ChannelCondition(flow, image, strength, latents is not None, mask_image, masked,
                            None if ctl.net is not None else a["control_image"], context_image)
    ctl.check(flow, image, chan.kind, context_image, (a["ip_adapter_image"], a["ip_adapter_image_embeds"]),
              a["skip_guidance_layers"])
    embeds = {k: a[k] for k in _EMBEDDING_ARGS + _IMAGE_PROMPT_ARGS} | {"context_image": context_image}
    guidance_scale = chan.guidance(_default_guidance(flow, a["guidance_scale"]))
    cond, model, height, width, grid = _setup(flow, a["prompt"], embeds, per_prompt, per_name, height,
                                              width, guidance_scale, a["true_cfg_scale"],
                                              a["max_batch"], a["joint_attention_kwargs"], a["transitions"], grid,
                                              {k: a[k] for k in _SKIP_LAYER_ARGS}, a["sigmas"])
    if per_name == "particles" and latents is not None:
        latents = _flat_particles(latents, cond.num_prompts, per_prompt, flow.state_shape(height, width))
    # The transitions that run: the ControlNet image-to-image pipelines read their window on these.
    run_grid = _strength_grid(grid, chan.image, chan.strength)[0]
    inpaint.draw_before_condition(flow, cond.num_prompts, height, width, generator)
    chan.attach(flow, cond, height, width, generator, before_noise=True)
    ctl.attach(flow, cond, height, width, generator, run_grid, before_noise=True)
    x, grid, z, noise = _start(flow, latents, cond.num_prompts, per_prompt, height, width, generator, grid,
                               chan.image, chan.strength, inpaint.mean)
    inpaint.attach(flow, cond, z, x.shape[0], height, width)
    chan.attach(flow, cond, height, width, generator, before_noise=False)
    ctl.attach(flow, cond, height, width, generator, run_grid, before_noise=False)
    blend = inpaint.hook(flow, z, noise, cond.num_prompts, height, width) if inpaint.active else None
    return flow, cond, model, height, width, grid, x, in_turn(blend, a["project"]), inpaint.paste


def _default_guidance(flow: DiffusersFlow, guidance_scale):
    """``guidance_scale``, or the pipeline's own default where it differs from its family's (``pipeline_guidance``;
    a step-wise distilled FLUX.2 Klein runs without guidance: no default)."""
    if guidance_scale is not None or (flow.kind == "flux2" and flux2_guidance(flow) == "distilled"):
        return guidance_scale
    return pipeline_guidance(flow)


def _flat_particles(latents, prompts: int, particles: int, shape: tuple) -> torch.Tensor:
    """steer's ``latents`` [P, K, *state] as [P * K, *state] (its state layout is checked by ``_start``)."""
    if not isinstance(latents, torch.Tensor) or latents.dim() < 2 or tuple(latents.shape[:2]) != (prompts, particles):
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must have shape {(prompts, particles) + shape} ([prompts, particles, state]), "
                         f"got {got}")
    return latents.reshape((prompts * particles,) + tuple(latents.shape[2:]))


def _guidance(flow: DiffusersFlow, guidance_scale, true_cfg_scale, embeds: dict) -> tuple[bool, float, float | None]:
    """(classifier-free guidance on, its weight, the guidance embedding's value) as each pipeline reads its
    arguments: SD3 and FLUX.2 Klein: guidance_scale is the CFG weight (defaults 7.0 and 4.0); FLUX.1 and
    FLUX.2 [dev]: guidance_scale is the guidance embedding's value, and true_cfg_scale > 1 with a negative
    prompt adds true CFG (as FluxPipeline; FLUX.2 pipelines have no true_cfg_scale)."""
    guidance_scale = guidance_weight("guidance_scale", guidance_scale)
    true_cfg_scale = guidance_weight("true_cfg_scale", true_cfg_scale, none_ok=False)
    negative = embeds.get("negative_prompt") is not None or embeds.get("negative_prompt_embeds") is not None
    mode = flux2_guidance(flow) if flow.kind == "flux2" else None
    if mode in ("cfg", "distilled") and float(true_cfg_scale) != 1.0:
        raise ValueError(f"true_cfg_scale={true_cfg_scale!r}: FLUX.2 Klein's classifier-free guidance weight is "
                         f"guidance_scale (leave true_cfg_scale at 1.0)")
    if mode == "distilled":
        if guidance_scale is not None and float(guidance_scale) > 1.0:
            raise ValueError(f"guidance_scale={guidance_scale!r}: this FLUX.2 Klein pipeline is step-wise distilled "
                             f"(is_distilled=True) and runs without guidance; leave guidance_scale unset")
        return False, 1.0, None
    if flow.kind == "sd3" or mode == "cfg":
        cfg_scale = (7.0 if flow.kind == "sd3" else 4.0) if guidance_scale is None else float(guidance_scale)
        return cfg_scale > 1.0, cfg_scale, None
    cfg_scale = float(true_cfg_scale)
    if cfg_scale > 1.0 and not negative:
        # FluxPipeline only logs this and runs unguided: refused here rather than ignored.
        raise ValueError(f"true_cfg_scale={true_cfg_scale!r} needs a negative prompt (negative_prompt= or "
                         f"negative_prompt_embeds=; negative_prompt=\"\" for the empty one), or leave it at 1.0")
    return cfg_scale > 1.0, cfg_scale, guidance_scale


def _bind_guidance(guidance, flow: DiffusersFlow, cond, per_prompt: int, height: int, width: int, max_batch):
    """The sampler hook of an ``ImageGuidance`` over this call's rows, or None."""
    if guidance is None:
        return None
    if not isinstance(guidance, ImageGuidance):
        raise TypeError(f"guidance must be an ImageGuidance or None, got {type(guidance).__name__}")
    return guidance.bind(LatentReward(flow, guidance.reward, cond.prompts, cond.num_prompts, per_prompt, height,
                                      width, max_batch))


def _start(flow: DiffusersFlow, latents, prompts: int, per_prompt: int, height: int, width: int, generator,
           grid: torch.Tensor, image=None, strength: float | None = None, mean: bool = False):
    """(start states [P * per_prompt, *state_shape] float32, transition grid, the image's latents [1 or P, *state]
    or None, the noise [P * per_prompt, *state]).

    Text-to-image: ``latents`` (or fresh noise) at the grid's start. Image-to-image (``image``), as the img2img
    pipelines do: the grid loses its first int(K (1 - strength)) steps, the image's latents z are drawn from
    the VAE (before the noise, with the same generator; ``mean``: its posterior's mean, no draw) and the start
    is t0 z + (1 - t0) noise at t0 = grid[0].
    """
    rows = prompts * per_prompt
    z = None
    grid, strength = _strength_grid(grid, image, strength)
    if image is not None:
        pixels = image_processor(flow).preprocess(image, height=height, width=width)
        check_images("image", pixels, prompts)
        z = flow.encode_images(pixels, generator, mean=mean)
    shape = (rows,) + flow.state_shape(height, width)
    if isinstance(latents, torch.Tensor) and latents.is_complex():
        raise TypeError(f"latents must be a real Tensor, got {latents.dtype}")
    if latents is None:
        noise = flow.noise(rows, height, width, generator)
    elif not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must have shape {shape} (prompts x rows per prompt, then the "
                         f"{NAMES[flow.kind]} state layout), got {got}")
    else:
        noise = latents.to(device=flow.device, dtype=torch.float32)
    if z is None:
        return noise, grid, None, noise
    t0 = float(grid[0])
    return t0 * z.repeat_interleave(rows // z.shape[0], dim=0) + (1.0 - t0) * noise, grid, z, noise


def _strength_grid(grid: torch.Tensor, image, strength) -> tuple[torch.Tensor, float | None]:
    """(the transitions that run, strength): image-to-image drops the grid's first int(K (1 - strength)) steps,
    as the img2img pipelines do (strength defaults to 0.6); without an image the grid is whole and strength
    must be unset."""
    if image is None:
        if strength is not None:
            raise ValueError(f"strength={strength!r} applies to image-to-image: pass image= too, or leave strength "
                             f"unset")
        return grid, None
    strength = 0.6 if strength is None else strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    k = len(grid) - 1
    return grid[int(max(k - min(k * strength, k), 0)):], strength


def postprocess(flow: DiffusersFlow, x: torch.Tensor, height: int, width: int, output_type: str,
                max_batch: int | None = None, paste=None):
    """Final states -> output_type: "latent" (the states), "pt" ([N, 3, H, W] in [0, 1]), "np" or "pil".
    ``paste``: optional fn(decoded images, output_type) -> images or None (``InpaintArgs.paste``)."""
    if output_type == "latent":
        return x
    with torch.no_grad():
        img = flow.decode(x, height, width, max_batch)
    pasted = None if paste is None else paste(img, output_type)
    return image_processor(flow).postprocess(img, output_type=output_type) if pasted is None else pasted


def sample(pipe, prompt=None, *, prompt_embeds=None, pooled_prompt_embeds=None, negative_prompt=None,
           negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, method: str = "glass",
           transitions: int | None = None, inner_steps: int = 10, rho=None, solver: str = "euler",
           guidance_scale: float | None = None, true_cfg_scale: float = 1.0, num_images_per_prompt: int = 1,
           height: int | None = None, width: int | None = None, grid: torch.Tensor | None = None,
           latents: torch.Tensor | None = None, image=None, strength: float | None = None,
           generator: torch.Generator | None = None, max_batch: int | None = None, output_type: str = "pt",
           max_sequence_length: int = 512,
           joint_attention_kwargs: dict | None = None, guidance: ImageGuidance | None = None, callback=None,
           skip_guidance_layers: list[int] | None = None, skip_layer_guidance_scale: float = 2.8,
           skip_layer_guidance_start: float = 0.01, skip_layer_guidance_stop: float = 0.2, ip_adapter_image=None,
           ip_adapter_image_embeds=None, negative_ip_adapter_image=None, negative_ip_adapter_image_embeds=None,
           compile=None, cuda_graph: bool = False, prompt_2=None, prompt_3=None, negative_prompt_2=None,
           negative_prompt_3=None, sigmas=None, context_image=None, context_auto_resize: bool = True,
           text_encoder_out_layers=None, mask_image=None, masked_image_latents=None, control_image=None,
           controlnet_conditioning_scale=None, control_guidance_start=None, control_guidance_end=None,
           control_mode=None, control_mask=None, image_reference=None, project=None, padding_mask_crop=None):
    """Generate images from a FLUX.1, FLUX.2 or SD3 pipeline with GLASS, ODE, SDE or plug-in transitions.

    Args:
        pipe: FluxPipeline / Flux2Pipeline / Flux2KleinPipeline (Flux2KleinKVPipeline too: its reference images'
            keys and values are cached) / StableDiffusion3Pipeline (and FLUX.1's
            img2img, Kontext, Fill, Control and ControlNet pipelines (FluxControlNetImg2ImgPipeline too), SD3's
            img2img and ControlNet pipelines (StableDiffusion3ControlNetInpaintingPipeline too), the
            inpainting pipelines listed under ``mask_image``), an
            object with .transformer/.scheduler/.vae (and .controlnet), or a DiffusersFlow.
        prompt: str or list of P strings (needs text encoders unless prompt_embeds are given).
        prompt_embeds, pooled_prompt_embeds: [P, S, D] and [P, Dp] precomputed embeddings (FLUX.2: no pooled).
        negative_prompt, negative_prompt_embeds, negative_pooled_prompt_embeds: classifier-free guidance's
            unconditional branch (SD3 and FLUX.2 Klein with guidance_scale > 1, where Klein's default negative
            prompt is ""; FLUX.1 and FLUX.2 [dev] with true_cfg_scale > 1).
        method: "glass" | "ode" | "sde" | "plugin".
        transitions: steps of the pipeline's sigma schedule used as the transition grid (default 5; set by
            ``grid`` or ``sigmas`` when given).
        inner_steps: model calls per transition (ODE: Euler steps inside each transition).
        rho, solver: GLASS correlation and inner solver (see ``glass_fast.glass_transition``).
        guidance_scale: SD3: CFG weight (default 7.0); FLUX.1: distilled guidance embedding (default: the
            pipeline's own, 3.5 as FluxPipeline, 7.0 for the image-to-image, inpainting and ControlNet
            pipelines, 30.0 with FLUX.1 Fill; ``diffusers_checks.PIPELINE_GUIDANCE``); FLUX.2 [dev]
            (Flux2Pipeline): guidance embedding (default 4.0); FLUX.2 Klein: CFG weight (default 4.0, 8.0 for
            its inpainting pipeline; a step-wise distilled Klein takes none).
        true_cfg_scale: FLUX.1 and FLUX.2 [dev] only: real CFG weight, active above 1 with a negative prompt.
        num_images_per_prompt: images per prompt; rows are prompt-major.
        height, width: image size in pixels (default: the pipeline's).
        grid: optional float64 Tensor[K+1] of increasing glass_fast times, replacing the sigma schedule.
        sigmas: optional decreasing noise levels as the pipelines take them (shifted the same way; their
            count sets the number of transitions); not with ``grid``.
        context_image, context_auto_resize: FLUX.1 Kontext's reference image (one, or one per prompt; a
            FluxKontextPipeline's ``image`` means this too) and whether it is resized to Kontext's preferred
            resolutions (the pipeline's ``_auto_resize``). Its latent tokens join every transformer call.
            Unlike FluxKontextPipeline, height and width are used as given (no ``max_area`` rescaling).
            FLUX.2: its reference images (a PIL image or a list, shared by every prompt; a FLUX.2 pipeline's
            ``image`` means this too), prepared as its pipelines prepare them; height and width default to
            the first image's size after preparation.
        latents: optional starting noise [P * num_images_per_prompt, *state_shape] (float32; FLUX.2: packed
            tokens, the FLUX.2 pipelines' 4-D ``latents`` ``lat`` as ``lat.flatten(2).transpose(1, 2)``).
        image, strength: image-to-image as in FluxImg2ImgPipeline / StableDiffusion3Img2ImgPipeline (FLUX.2,
            which has no image-to-image pipeline: its reference images, see ``context_image``, except with
            Flux2KleinInpaintPipeline: see ``mask_image``): the
            image (PIL, array or Tensor; one, or one per prompt) is encoded by the VAE and noised to the
            schedule's time at ``strength`` (1: pure noise, small: close to the image); the first
            int(transitions * (1 - strength)) transitions are skipped (strength defaults to 0.6, as in the
            pipelines; it is refused without an image, or where ``image`` is a reference image). ``latents`` is
            then the noise mixed in.
        generator: randomness for the starting noise and the stochastic transitions: one torch.Generator on
            the pipeline's device (not the pipelines' list of one per image: pass ``latents`` for that).
        max_batch: most rows per transformer or VAE call (guided rows count twice).
        output_type: "pt" ([N, 3, H, W] in [0, 1]), "np", "pil" or "latent" (final states).
        joint_attention_kwargs: given to every transformer call as the pipelines do (e.g. {"scale": s} for
            loaded LoRA weights, or a custom attention processor's arguments).
        guidance: optional ``ImageGuidance``: reward guidance with a differentiable image reward, decoded
            through the VAE under ``max_batch`` rows (each row scored with its own prompt).
        callback: optional fn(k, t, latents, x0_latents) before each transition, with the packed state and its
            x0-prediction (no extra transformer calls); ``as_flow(pipe).decode(x0_latents, height, width)``
            previews it.
        project: optional fn(k, t, latents) -> latents applied to the packed state after every transition (see
            ``glass_fast.Sampler.run``; t in glass_fast time, 1 - sigma), after an inpainting pipeline's blend.
        skip_guidance_layers, skip_layer_guidance_scale, skip_layer_guidance_start, skip_layer_guidance_stop:
            SD3's skip-layer guidance as in its pipeline (with classifier-free guidance; one more transformer
            call per model call inside the window). The pipeline's step fractions become the window of times
            spanned by those steps on the transition grid.
        ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image, negative_ip_adapter_image_embeds:
            image prompts for loaded IP-Adapters: images (through the pipeline's image encoder) or embeddings,
            a Tensor or a list of one Tensor per adapter with a leading dimension of 1 (every prompt) or P (one
            per prompt), in the pipeline's layout (FLUX [., images, D], SD3 [., tokens, D]). Every row gets its
            prompt's. The negative ones are classifier-free guidance's unconditional branch (default as in
            the pipelines: zeros for SD3, a black image for FLUX). Unlike the SD3 pipeline, which computes
            the adapter's timestep-dependent tokens once at its first step, every call recomputes them. The SD3
            pipeline's ip_adapter_image_embeds under CFG is the (negative, positive) pair stacked on the first
            dimension; here it is the positive alone, the negative going to negative_ip_adapter_image_embeds.
        compile, cuda_graph: run every transition, transformer calls included, compiled by torch.compile or
            replayed as a CUDA graph (see ``glass_fast.Sampler``; not with ``guidance``).
        prompt_2, prompt_3, negative_prompt_2, negative_prompt_3: prompts for the pipelines' other text
            encoders (FLUX: prompt_2 for T5; SD3: prompt_2 for CLIP-G, prompt_3 for T5); None: prompt's.
        text_encoder_out_layers: FLUX.2 only: the text encoder's hidden layers its embeddings stack (None: the
            pipeline's default).
        mask_image, masked_image_latents: FLUX.1 Fill (FluxFillPipeline) with ``image``: the mask (white is
            repainted; one, or one per prompt) or the packed condition itself [1 or P, L, 4C + 4 f^2]; ``image``
            is also the image-to-image start at ``strength`` (default 1.0: pure noise, FluxFillPipeline's), and
            guidance_scale defaults to 30.0 (FluxFillPipeline's). See ``diffusers_channels``. With
            FluxInpaintPipeline, FluxControlInpaintPipeline (with ``control_image``: FLUX.1 Control's condition),
            FluxControlNetInpaintPipeline (with ``control_image``: its ControlNet's), FluxKontextInpaintPipeline,
            StableDiffusion3InpaintPipeline or Flux2KleinInpaintPipeline:
            image-to-image from ``image`` whose kept region (mask black) is blended back after every transition,
            noised to the state's time along the starting noise (``diffusers_inpaint``; steering too);
            masked_image_latents is refused there (their transformers never read it). strength defaults to 0.6
            (Kontext's 1.0, Klein's 0.8) and guidance_scale to each pipeline's own, as in those pipelines. The Kontext and Klein pipelines generate at the image's size (height and width
            default to it; others are refused), encode it to the VAE posterior's mean and give the transformer
            reference tokens (``image_reference``'s, else the image's own for Kontext; the image's then
            ``image_reference``'s for Klein, whose mask is resized bilinearly to the tokens: a uint8 array mask
            is rounded there, as in the pipeline).
        image_reference: FluxKontextInpaintPipeline's reference image (one, or one per prompt; resized as
            ``context_image`` is) or Flux2KleinInpaintPipeline's reference images (one, or a sequence shared by
            every row).
        padding_mask_crop: as in FluxInpaintPipeline, StableDiffusion3InpaintPipeline, Flux2KleinInpaintPipeline,
            FluxKontextInpaintPipeline and FluxControlNetInpaintPipeline (refused elsewhere), with one PIL
            ``image`` and one PIL ``mask_image``: only the box around the mask's white pixels, widened by this
            many pixels and to the output's aspect ratio, is inpainted, cut from image and mask and resized to
            height x width (Kontext: its reference image is cut with the same box). The state, ``latents``
            and "latent" output are the box's; the first three pipelines paste the decoded box back into the
            image wherever the mask is not black ("pil", "np", "pt": at the image's size, 8-bit values), the
            other two return the box's images. Unlike the pipelines (PIL output only) every output_type is taken.
        control_image: FLUX.1 Canny / Depth (FluxControlPipeline): the control image (one, or one per prompt),
            whose packed latents join every transformer call along features. With a ControlNet pipeline
            (FluxControlNetPipeline, StableDiffusion3ControlNetPipeline: ``pipe.controlnet``): the ControlNet's
            image (one, or one per prompt; a multi-ControlNet: a list of those, one per ControlNet).
        controlnet_conditioning_scale, control_guidance_start, control_guidance_end, control_mode: as in the
            ControlNet pipelines (defaults 1.0, 0.0, 1.0; a list: one per control image); ``control_mode``: a
            union ControlNet's control type. The steps' window becomes the glass_fast times those steps span
            on the grid (``diffusers_controlnet``); guidance_scale defaults to 7.0, as the FLUX ControlNet
            pipelines'. FluxControlNetImg2ImgPipeline and FluxControlNetInpaintPipeline need
            ``image`` (image-to-image at ``strength``, default 0.6); their window counts only the steps that run after ``strength``, as theirs. As for the other
            edit pipelines, ``latents`` is the noise mixed with the image, and one image per prompt serves every
            row of its prompt (the pipelines tile the images over num_images_per_prompt).
        control_mask: StableDiffusion3ControlNetInpaintingPipeline's mask of ``control_image`` (the image it
            inpaints; white is repainted; one, or one per prompt; a 4-D Tensor [1 or P, 1, H, W] is taken as
            given, unbinarised, as the pipeline takes it). Its ControlNet reads the masked image's latents and
            the mask; it starts from noise (no ``image``, no ``strength``, no blend).
    Returns:
        The images (or latents) of the P * num_images_per_prompt rows.
    """
    check_output(output_type)
    flow, cond, model, height, width, grid, x, project, paste = _prepare(locals(), "num_images_per_prompt", grid,
                                                                         cuda_graph)
    check_output(output_type, flow)
    check_state(model, x, generator)
    sampler = Sampler(model, method=method, transitions=len(grid) - 1, inner_steps=inner_steps, rho=rho,
                      solver=solver, grid=grid, device=x.device, dtype=x.dtype, compile=compile,
                      cuda_graph=cuda_graph)
    hook = _bind_guidance(guidance, flow, cond, num_images_per_prompt, height, width, max_batch)
    with torch.no_grad():
        x = sampler.run(x, generator=generator, guidance=hook, callback=callback, project=project)
    return postprocess(flow, x, height, width, output_type, max_batch, paste)


def steer(pipe, prompt=None, reward=None, *, particles: int = 8, prompt_embeds=None, pooled_prompt_embeds=None,
          negative_prompt=None, negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
          method: str = "glass", transitions: int | None = None, inner_steps: int = 10, rho=None, solver: str = "euler",
          potential: str = "diff", lmbda: float = 1.0, resample: str = "systematic", ess_threshold: float = 0.5,
          guidance_scale: float | None = None, true_cfg_scale: float = 1.0, height: int | None = None,
          width: int | None = None, latents: torch.Tensor | None = None, image=None, strength: float | None = None,
          generator: torch.Generator | None = None,
          max_batch: int | None = None, output_type: str = "pt", progress: bool = False,
          max_sequence_length: int = 512, joint_attention_kwargs: dict | None = None,
          guidance: ImageGuidance | None = None, skip_guidance_layers: list[int] | None = None,
          skip_layer_guidance_scale: float = 2.8, skip_layer_guidance_start: float = 0.01,
          skip_layer_guidance_stop: float = 0.2, ip_adapter_image=None, ip_adapter_image_embeds=None,
          negative_ip_adapter_image=None, negative_ip_adapter_image_embeds=None, prompt_2=None, prompt_3=None,
          negative_prompt_2=None, negative_prompt_3=None, sigmas=None, context_image=None,
          context_auto_resize: bool = True, text_encoder_out_layers=None, mask_image=None,
          masked_image_latents=None, control_image=None, controlnet_conditioning_scale=None,
          control_guidance_start=None, control_guidance_end=None, control_mode=None, control_mask=None,
          algorithm: str = "fk",
          image_reference=None, project=None, padding_mask_crop=None, **steering_options):
    """Feynman-Kac steering of a FLUX.1, FLUX.2 or SD3 pipeline towards p(image | prompt)
    exp(lmbda reward(image)), or beam search for high-reward images.

    Each of the P prompts gets a group of ``particles`` particles. After every transition the x0-prediction
    of every particle is decoded through the VAE (under ``max_batch`` rows) and scored by ``reward``; with
    ``algorithm="fk"`` particles are reweighted and resampled within their group (``glass_fast.fk_steering``),
    with ``algorithm="beam"`` every particle draws ``expansions`` children per transition and each group
    keeps its ``particles`` best (``glass_fast.beam_search``; pass ``expansions=`` / ``value_samples=``).

    Args:
        pipe, prompt, prompt_embeds, ..., max_sequence_length, joint_attention_kwargs, guidance,
            skip_guidance_layers, ..., ip_adapter_image, ..., prompt_2, ..., sigmas, context_image, ...,
            text_encoder_out_layers, mask_image, masked_image_latents, control_image,
            controlnet_conditioning_scale, control_guidance_start, control_guidance_end, control_mode,
            control_mask, image_reference, project, padding_mask_crop: as in ``sample`` (project: applied to
            every particle; guidance shifts the proposal's model calls; its reward may differ from ``reward``;
            padding_mask_crop: the reward scores the box's images, which the particles are, and the best are
            pasted back).
        reward: an ``ImageReward``: reward(images [N, 3, H, W] in [0, 1], prompts list of N) -> Tensor[N].
        particles: K particles per prompt.
        method, transitions, inner_steps, rho, solver: the proposal (see ``sample``).
        potential, lmbda, resample, ess_threshold: see ``glass_fast.fk_steering``.
        latents: optional starting noise [P, K, *state_shape].
        image, strength: image-to-image, as in ``sample`` (steering an edit of the image).
        output_type: how the best particle of each group is returned ("pt", "np", "pil", "latent").
        algorithm: "fk" (default) or "beam".
        steering_options: further options of ``fk_steering`` (resample_window, final_correction, compile,
            cuda_graph, ...) or of ``beam_search`` (expansions, value_samples).
    Returns:
        (images of the P highest-reward particles, SteeringResult with latent samples [P, K, *state_shape]).

    The transition grid is the pipeline's (shifted) sigma schedule unless ``steering_options`` names a
    ``grid`` (every grid gives exact GLASS transitions; only the step placement differs).
    """
    from ..steering import beam_search, fk_steering
    check_output(output_type)
    if algorithm not in ("fk", "beam"):
        raise ValueError(f"algorithm must be 'fk' or 'beam', got {algorithm!r}")
    if algorithm == "beam" and guidance is not None:
        raise ValueError("guidance is not supported with algorithm='beam'; use algorithm='fk'")
    if not callable(reward):
        raise TypeError(f"reward must be callable(images, prompts) -> Tensor[N], got {type(reward).__name__}")
    check_steering_options(algorithm, steering_options, dict(potential=potential, lmbda=lmbda, resample=resample,
                                                             ess_threshold=ess_threshold), steer)
    grid = steering_options.pop("grid", None)
    flow, cond, model, height, width, grid, noise, project, paste = _prepare(
        locals(), "particles", grid, steering_options.get("cuda_graph", False))
    p = cond.num_prompts
    noise = noise.reshape((p, particles) + flow.state_shape(height, width))
    scorer = LatentReward(flow, reward, cond.prompts, p, particles, height, width, max_batch)
    steering_options["grid"] = grid
    if guidance is not None:
        steering_options["guidance"] = _bind_guidance(guidance, flow, cond, particles, height, width, max_batch)
    # The grid (set by transitions, sigmas or grid, and shortened by an image-to-image strength) sets the count.
    proposal = dict(method=method, inner_steps=inner_steps, rho=rho, solver=solver, generator=generator,
                    progress=progress, project=project)
    with torch.no_grad():
        if algorithm == "beam":
            result = beam_search(model, scorer, noise, **proposal, **steering_options)
        else:
            result = fk_steering(model, scorer, noise, potential=potential, lmbda=lmbda, resample=resample,
                                 ess_threshold=ess_threshold, **proposal, **steering_options)
    return postprocess(flow, result.best, height, width, output_type, max_batch, paste), result
