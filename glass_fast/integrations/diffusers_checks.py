"""Argument checks of the diffusers integration's ``sample`` and ``steer`` that concern no single model part:
output type, generator, guidance weights, CUDA-graph capture, steering options."""
from __future__ import annotations

import inspect
import math

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .diffusers_adapter import DiffusersFlow

OUTPUT_TYPES = ("pt", "np", "pil", "latent")


def pipeline_classes(pipe) -> set[str]:
    """The class names of the pipeline behind ``pipe`` (a pipeline or its DiffusersFlow adapter), its base
    classes included, so that a user's subclass of a pipeline is read as that pipeline (nothing imported)."""
    from .diffusers_adapter import DiffusersFlow
    owner = pipe.pipeline if isinstance(pipe, DiffusersFlow) else pipe
    return {c.__name__ for c in type(owner).__mro__}


# FLUX pipelines whose default guidance_scale is not their family's (FluxPipeline 3.5, FLUX.2 4.0, SD3 7.0); FLUX.1
# Fill's (30) follows its condition wherever it comes from (``ChannelCondition.guidance``).
PIPELINE_GUIDANCE = {name: 7.0 for name in (
    "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxControlImg2ImgPipeline", "FluxControlInpaintPipeline",
    "FluxControlNetPipeline", "FluxControlNetImg2ImgPipeline", "FluxControlNetInpaintPipeline")} | {
    "Flux2KleinInpaintPipeline": 8.0}


def pipeline_guidance(pipe):
    """The default guidance_scale of the pipeline behind ``pipe`` where it differs from its family's, else None
    (the most derived class of its MRO that has one)."""
    from .diffusers_adapter import DiffusersFlow
    owner = pipe.pipeline if isinstance(pipe, DiffusersFlow) else pipe
    for cls in type(owner).__mro__:
        if cls.__name__ in PIPELINE_GUIDANCE:
            return PIPELINE_GUIDANCE[cls.__name__]
    return None


def check_output(output_type, flow: DiffusersFlow | None = None):
    """A known output_type; with ``flow``: one it can produce (decoding needs a VAE), checked before sampling."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if flow is not None and output_type != "latent" and flow.vae is None:
        raise ValueError(f"output_type={output_type!r} decodes the images through the pipeline's VAE, and it has "
                         f"none (vae is None): pass output_type='latent'")


def check_generator(generator, device: torch.device) -> None:
    """One torch.Generator on the pipeline's device, or None: it draws the starting noise and every transition's
    randomness, so neither a list (the pipelines' one generator per image) nor a generator elsewhere can serve."""
    if generator is None:
        return
    if isinstance(generator, (list, tuple)):
        raise TypeError(f"generator must be one torch.Generator or None, got a {type(generator).__name__} of "
                        f"{len(generator)}: a single generator draws every row's starting noise and the "
                        f"transitions' randomness (pass latents= for noise drawn per image)")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    g = generator.device
    if g.type != device.type or (g.index is not None and device.index is not None and g.index != device.index):
        raise ValueError(f"generator is on {g} but the pipeline runs on {device}: create it with "
                         f"torch.Generator(device={str(device)!r})")


def guidance_weight(name: str, value, none_ok: bool = True) -> float | None:
    """A guidance weight as a finite float (None kept where allowed); ValueError naming it otherwise. A NaN
    would compare False with 1 and silently switch guidance off."""
    if value is None and none_ok:
        return None
    try:
        ok = not isinstance(value, (bool, str)) and math.isfinite(float(value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a finite number{' or None' if none_ok else ''}, got {value!r}")
    return float(value)


def check_capturable(cuda_graph: bool, skip_guidance_layers) -> None:
    if cuda_graph and skip_guidance_layers is not None:
        raise ValueError("skip-layer guidance decides on the host, at every call, whether its extra transformer "
                         "call runs, which a CUDA graph cannot replay: use it without cuda_graph=True "
                         "(eagerly or with compile=)")


# fk_steering's and beam_search's arguments that steer sets itself (from its own arguments).
_STEER_SETS = frozenset(("model", "reward", "noise", "method", "transitions", "inner_steps", "rho", "solver",
                         "potential", "lmbda", "resample", "ess_threshold", "generator", "progress", "guidance",
                         "max_batch", "project"))


def check_steering_options(algorithm: str, options: dict, fk_args: dict, steer) -> None:
    """steer's **steering_options must be options of the chosen algorithm's function, and FK's own arguments
    (potential, lmbda, resample, ess_threshold; ``fk_args``, compared with ``steer``'s defaults) are refused
    with beam search, which would ignore them."""
    from ..steering import beam_search, fk_steering
    allowed = {name: sorted(set(inspect.signature(fn).parameters) - _STEER_SETS)
               for name, fn in (("fk", fk_steering), ("beam", beam_search))}
    for key in options:
        if key in allowed[algorithm]:
            continue
        other = "beam" if algorithm == "fk" else "fk"
        why = (f"it is an option of algorithm={other!r}" if key in allowed[other] else
               "steer sets it from its own arguments" if key in _STEER_SETS else "no such option")
        raise TypeError(f"steer got the steering option {key!r}, which algorithm={algorithm!r} does not "
                        f"take ({why}); its options are {', '.join(allowed[algorithm])}")
    if algorithm == "beam":
        defaults = inspect.signature(steer).parameters
        changed = [f"{k}={v!r}" for k, v in fk_args.items() if v != defaults[k].default]
        if changed:
            raise ValueError(f"{', '.join(changed)}: Feynman-Kac steering's arguments, which algorithm='beam' "
                             f"does not use; leave them at their defaults or use algorithm='fk'")
