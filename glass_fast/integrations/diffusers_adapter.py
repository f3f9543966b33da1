"""A diffusers flow-matching transformer (FLUX.1, FLUX.2 or Stable Diffusion 3) as a glass_fast velocity model.

Conventions at the boundary (MATH.md section 1):

    diffusers:  x = (1 - sigma) z + sigma eps, sigma = 1 is noise; the transformer predicts v = eps - z
    glass_fast: x_t = t z + (1 - t) eps, t = 0 is noise (LinearSchedule); velocity u = dx/dt = z - eps
    so          t = 1 - sigma and u = -v.

Timestep inputs: the FLUX.1 and FLUX.2 transformers take sigma in [0, 1] and multiply it (and the distilled
guidance scale) by 1000 themselves; the SD3 transformer takes sigma * num_train_timesteps.

State layout: the transformer's own. FLUX.1 and FLUX.2 work on packed latents [N, (h/2)(w/2), 4C]: token
(i, j) holds the 2x2 patch of VAE latents at rows 2i, 2i+1 and columns 2j, 2j+1, features ordered (channel,
row, column) in both (FLUX.1's ``latents`` argument; FLUX.2's patchified latents with tokens in raster order).
They differ in the latent normalisation: FLUX.1 shifts and scales the VAE latents by the VAE config's
shift_factor and scaling_factor, FLUX.2 standardises every packed feature by its VAE's batch-norm running
statistics. SD3 works on [N, C, h, w]. Noise is drawn in the layout each pipeline draws it (FLUX.1 and SD3
[N, C, h, w], FLUX.2 [N, 4C, h/2, w/2]) and packed the way it packs it, so one generator seed gives the
pipeline's starting point. It is drawn in float32, where the pipelines draw in the transformer's dtype: with a
bfloat16 or float16 transformer theirs may differ from it by that dtype's rounding; pass their noise as ``latents``
to start from exactly the same point.
"""
from __future__ import annotations

import numbers
import numpy as np
import torch

try:
    from diffusers import (FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel, FluxTransformer2DModel,
                           SD3Transformer2DModel)
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("glass_fast.integrations.diffusers needs the diffusers package: "
                      "pip install \"glass_fast[diffusers]\"") from exc

from ..model import FlowModel
from ..schedules import LinearSchedule
from .diffusers_channels import check_features
from .diffusers_checks import guidance_weight
from .diffusers_conditioning import Conditioning, cfg_stack
from .diffusers_controlnet import in_window, steps_window
from .diffusers_flux import (ReferenceCache, caches_references, check_flux2_pipeline, flux2_guidance, flux2_mu,
                             packed_image_ids, text_ids)

KINDS = {"flux": FluxTransformer2DModel, "flux2": Flux2Transformer2DModel, "sd3": SD3Transformer2DModel}
PACKED = ("flux", "flux2")   # kinds whose state is packed 2x2 latent patches
NAMES = {"flux": "FLUX.1", "flux2": "FLUX.2", "sd3": "SD3"}


def transformer_kind(transformer) -> str:
    """"flux", "flux2" or "sd3" for a supported transformer; TypeError naming what is supported otherwise."""
    for kind, cls in KINDS.items():
        if isinstance(transformer, cls):
            return kind
    raise TypeError(f"unsupported transformer {type(transformer).__name__}: glass_fast supports FLUX.1 "
                    f"(FluxTransformer2DModel), FLUX.2 (Flux2Transformer2DModel) and Stable Diffusion 3 "
                    f"(SD3Transformer2DModel) pipelines")


class DiffusersFlow:
    """A FLUX.1, FLUX.2 or SD3 transformer, its flow-matching scheduler config and (optionally) its VAE.

    Args:
        transformer: FluxTransformer2DModel, Flux2Transformer2DModel or SD3Transformer2DModel.
        scheduler: a FlowMatchEulerDiscreteScheduler (only its config is read; it is never stepped).
        vae: AutoencoderKL (AutoencoderKLFlux2 for FLUX.2) for decoding, or None (then only latents can be
            produced).
        pipeline: the pipeline these came from, used for prompt encoding and default sizes; may be None.

    Example:
        >>> flow = DiffusersFlow.from_pipeline(pipe)
        >>> model = flow.flow_model(flow.encode(prompt_embeds=pe, pooled_prompt_embeds=pp), 4, 512, 512)
    """

    def __init__(self, transformer, scheduler, vae=None, *, pipeline=None):
        self.kind = transformer_kind(transformer)
        config = getattr(scheduler, "config", None)
        if config is None or "shift" not in config or "use_dynamic_shifting" not in config:
            raise TypeError(f"scheduler must be a flow-matching scheduler (FlowMatchEulerDiscreteScheduler), "
                            f"got {type(scheduler).__name__}")
        if config.get("stochastic_sampling", False) or config.get("invert_sigmas", False):
            raise ValueError("scheduler configs with stochastic_sampling or invert_sigmas are not supported: "
                             "their sigmas are not the flow-matching noise levels of the sampled states")
        if self.kind == "flux2" and pipeline is not None:
            check_flux2_pipeline(pipeline)
        if self.kind == "flux2" and vae is not None and getattr(vae, "bn", None) is None:
            raise TypeError(f"a FLUX.2 transformer needs the FLUX.2 VAE (AutoencoderKLFlux2, whose batch-norm "
                            f"statistics normalise the latents), got {type(vae).__name__}")
        self.transformer, self.scheduler_config, self.vae, self.pipeline = transformer, config, vae, pipeline
        self._scheduler = scheduler   # read for its shift only (``sigmas``)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8

    @classmethod
    def from_pipeline(cls, pipe) -> "DiffusersFlow":
        """The adapter of a loaded FLUX.1 / FLUX.2 / StableDiffusion3 pipeline (or any object with
        ``transformer``, ``scheduler`` and optionally ``vae`` attributes)."""
        if isinstance(pipe, DiffusersFlow):
            return pipe
        if not hasattr(pipe, "transformer") or not hasattr(pipe, "scheduler"):
            raise TypeError(f"pipe must be a FLUX or Stable Diffusion 3 pipeline (with .transformer and "
                            f".scheduler), got {type(pipe).__name__}")
        return cls(pipe.transformer, pipe.scheduler, getattr(pipe, "vae", None), pipeline=pipe)

    # -- geometry -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the transformer runs: the pipeline's execution device (right under CPU offload), else the
        transformer's."""
        dev = getattr(self.pipeline, "_execution_device", None)
        return torch.device(dev) if dev is not None else self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def default_size(self) -> int:
        """The pipeline's default image side in pixels."""
        sample = getattr(self.pipeline, "default_sample_size", None)
        if sample is None:
            sample = 128 if self.kind in PACKED else self.transformer.config.sample_size
        return sample * self.vae_scale_factor

    @property
    def patch_pixels(self) -> int:
        """Pixels a side of one transformer token: image sides are multiples of it."""
        return self.vae_scale_factor * (2 if self.kind in PACKED else self.transformer.config.patch_size)

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        """Unpacked latent (h, w) of an image; ValueError for sizes the transformer cannot tile."""
        step = self.patch_pixels
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % step:
                raise ValueError(f"{name} must be a positive multiple of {step} pixels for this "
                                 f"{NAMES[self.kind]} model, got {v!r}")
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def latent_channels(self) -> int:
        """VAE latent channels of the state: the transformer's output (FLUX.1 Fill and Control read more)."""
        c = getattr(self.transformer.config, "out_channels", None) or self.transformer.config.in_channels
        return c // 4 if self.kind in PACKED else c

    def pack(self, lat: torch.Tensor) -> torch.Tensor:
        """[N, C, h, w] -> the state layout (FLUX.1 / FLUX.2: [N, (h/2)(w/2), 4C] of 2x2 patches; SD3:
        unchanged). Layout only: the latent normalisation is ``to_state``'s."""
        if self.kind not in PACKED:
            return lat
        n, c, h, w = lat.shape
        return lat.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), 4 * c)

    def unpack(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The state layout -> [N, C, h, w]."""
        self.check_states(x, height, width)
        if self.kind not in PACKED:
            return x
        h, w = self.latent_hw(height, width)
        n, _, c4 = x.shape
        return x.reshape(n, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c4 // 4, h, w)

    def check_states(self, x: torch.Tensor, height: int, width: int) -> None:
        """ValueError unless ``x`` is a batch of states [N, *state_shape] of an image of this size."""
        shape = self.state_shape(height, width)
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != shape or x.dim() != len(shape) + 1:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"states of a {height} x {width} image must have shape [N, {', '.join(map(str, shape))}] "
                             f"({NAMES[self.kind]} state layout), got {got}")

    def state_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one state (no batch dimension)."""
        h, w = self.latent_hw(height, width)
        c = self.latent_channels()
        return ((h // 2) * (w // 2), 4 * c) if self.kind in PACKED else (c, h, w)

    def noise(self, n: int, height: int, width: int, generator=None, dtype=torch.float32) -> torch.Tensor:
        """[n, *state_shape] draws of N(0, I) in the pipelines' order: FLUX.1 and SD3 draw [n, C, h, w]
        (then FLUX.1 packs it), FLUX.2 draws the patchified [n, 4C, h/2, w/2] and lists its tokens."""
        h, w = self.latent_hw(height, width)
        c = self.latent_channels()
        if self.kind == "flux2":
            lat = torch.randn((n, 4 * c, h // 2, w // 2), generator=generator, device=self.device, dtype=dtype)
            return lat.flatten(2).transpose(1, 2)
        lat = torch.randn((n, c, h, w), generator=generator, device=self.device, dtype=dtype)
        return self.pack(lat)

    # -- time grid ------------------------------------------------------------------------------------------
    def sigmas(self, steps: int | None, height: int, width: int, custom=None) -> torch.Tensor:
        """The pipeline's sigma schedule for ``steps`` steps: float32 [steps + 1], decreasing to 0.

        Shifts (FLUX.1's resolution-dependent mu, FLUX.2's mu depending on resolution and step count, SD3's
        static shift) are applied exactly as the pipelines do, by a fresh scheduler built from the same config
        (the pipeline's own scheduler is not touched; its static shift is read as the pipelines read it, set_shift
        included). ``steps``: an integer >= 1, or None with ``custom``. ``custom``: the pipelines' ``sigmas``
        argument (a decreasing sequence, shifted like the default one); it sets the number of steps (FLUX.2's mu
        is then computed for that many steps: the FLUX.2 pipelines' with ``num_inference_steps=len(sigmas)``).
        """
        cfg = self.scheduler_config
        sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
        # The static shift the pipelines' set_timesteps applies is the scheduler's ``shift``, which set_shift changes
        # without touching the config.
        sched.set_shift(float(getattr(self._scheduler, "shift", cfg["shift"])))
        h, w = self.latent_hw(height, width)
        kwargs = {}
        if custom is not None:
            custom = np.asarray(custom, dtype=np.float64)
            if (custom.ndim != 1 or custom.size < 1 or not np.all(np.isfinite(custom)) or np.any(custom <= 0)
                    or np.any(custom > 1) or np.any(np.diff(custom) >= 0)):
                raise ValueError(f"sigmas must be a 1-D sequence of finite noise levels, strictly decreasing in "
                                 f"(0, 1] (the final 0 is appended), got {custom.tolist()}")
            if steps is not None and steps != custom.size:
                raise ValueError(f"steps={steps!r} disagrees with the {custom.size} custom sigmas, which set the "
                                 f"number of steps: pass steps=None")
            steps = custom.size
        elif isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1 (or None with custom sigmas), got {steps!r}")
        steps = int(steps)
        if self.kind in PACKED:
            seq_len = (h // 2) * (w // 2)
            if not cfg.get("use_flow_sigmas", False):
                kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps) if custom is None else custom
        else:
            p = self.transformer.config.patch_size
            seq_len = (h // p) * (w // p)
            if custom is not None:
                kwargs["sigmas"] = custom
        if cfg.get("use_dynamic_shifting", False):
            kwargs["mu"] = (flux2_mu(seq_len, steps) if self.kind == "flux2" else
                            _shift_mu(seq_len, cfg, 1.15 if self.kind == "flux" else 1.16))
        sched.set_timesteps(steps, device="cpu", **kwargs)
        return sched.sigmas.to(torch.float32)

    def time_grid(self, steps: int | None, height: int, width: int, custom=None) -> torch.Tensor:
        """The same schedule as glass_fast times t = 1 - sigma: float64 [steps + 1], increasing to 1."""
        return 1.0 - self.sigmas(steps, height, width, custom).to(torch.float64)

    # -- the network ----------------------------------------------------------------------------------------
    def predict(self, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                height: int, width: int, guidance_scale: float | None = None,
                attention_kwargs: dict | None = None, skip_layers: tuple[int, ...] | None = None,
                context: tuple[torch.Tensor, torch.Tensor] | None = None,
                channels: torch.Tensor | None = None, control=None, inputs: tuple | None = None,
                references=None) -> torch.Tensor:
        """One transformer call, diffusers' convention: v = eps - z at noise level ``sigma``.

        Args:
            x: [N, *state_shape] in the transformer's dtype.
            sigma: [N] noise levels in [0, 1].
            embeds, pooled: [N, S, D] and [N, Dp] conditioning rows (FLUX.2: pooled is None).
            guidance_scale: the distilled guidance embedding's value (FLUX.1, and FLUX.2 outside Klein; see
                ``embedded_guidance``).
            attention_kwargs: the transformer's ``joint_attention_kwargs`` (e.g. {"scale": lora_scale}).
            skip_layers: SD3 only: transformer blocks to skip (skip-layer guidance's extra call).
            context: FLUX.1 Kontext's or FLUX.2's reference images: (tokens [N, L, 4C], ids [L, 3] (FLUX.1) or
                [L, 4] (FLUX.2)), appended to the image tokens; the output is read on x's tokens.
            channels: FLUX.1 Fill's or Control's condition [N, L, features], appended to x's features.
            control: the call's ControlNet residuals, fn(x, sigma, embeds, pooled, guidance, attention_kwargs,
                txt_ids, img_ids) -> the transformer's keyword arguments (``Conditioning.control_rows``).
            inputs: FLUX only: ``packed_inputs`` for this size, token count and guidance value (``flow_model``
                builds them once); None: built here.
            references: Flux2KleinKVPipeline: its reference images' cached keys and values for these rows
                (``ReferenceCache.rows``), read in place of ``context`` tokens.
        Returns:
            [N, *state_shape] raw transformer output.
        """
        tr = self.transformer
        # A fresh dict per call: the transformers pop entries (ip_adapter_image_embeds) from the one they get.
        extra = None if attention_kwargs is None else dict(attention_kwargs)
        if self.kind in PACKED:
            img_ids, txt_ids, guidance = inputs or self.packed_inputs(height, width, embeds.shape[1],
                                                                      guidance_scale, x.device, x.dtype)
            guidance = None if guidance is None else guidance.expand(x.shape[0])
            check_features(self, x.shape[-1], channels)
            if context is not None and channels is not None:
                raise ValueError("a FLUX.1 Fill / Control condition (channels) cannot be combined with reference "
                                 "image tokens (context): the reference tokens carry no condition features")
            hidden = x if channels is None else torch.cat([x, channels.to(x.dtype)], dim=2)
            if context is not None:
                hidden = torch.cat([x, context[0].to(x.dtype)], dim=1)
                img_ids = torch.cat([img_ids, context[1].to(img_ids.dtype)])
            pooled_kw = {} if self.kind == "flux2" else {"pooled_projections": pooled}
            if references is not None:
                pooled_kw.update(kv_cache=references, kv_cache_mode="cached")
            if control is not None:
                pooled_kw.update(control(x, sigma.to(x.dtype), embeds, pooled, guidance, attention_kwargs, txt_ids,
                                         img_ids))
            out = tr(hidden_states=hidden, timestep=sigma.to(x.dtype), guidance=guidance, encoder_hidden_states=embeds,
                     txt_ids=txt_ids, img_ids=img_ids, joint_attention_kwargs=extra, return_dict=False,
                     **pooled_kw)[0]
            return out if context is None else out[:, :x.shape[1]]
        timestep = sigma.to(torch.float32) * self.scheduler_config.get("num_train_timesteps", 1000)
        skip = {} if skip_layers is None else {"skip_layers": list(skip_layers)}
        if control is not None:
            skip.update(control(x, timestep, embeds, pooled, None, attention_kwargs))
        return tr(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds, pooled_projections=pooled,
                  joint_attention_kwargs=extra, return_dict=False, **skip)[0]

    def embedded_guidance(self, guidance_scale: float | None) -> float | None:
        """The value given to the transformer's guidance embedding (None: no guidance input): FLUX.1 with a
        guidance embedding, default 3.5 (FluxPipeline); FLUX.2 outside Klein, default 4.0 (Flux2Pipeline)."""
        if self.kind == "flux" and self.transformer.config.guidance_embeds:
            return 3.5 if guidance_scale is None else float(guidance_scale)
        if self.kind == "flux2" and flux2_guidance(self) == "embedded":
            return 4.0 if guidance_scale is None else float(guidance_scale)
        return None

    def packed_inputs(self, height: int, width: int, tokens: int, guidance_scale, device, dtype) -> tuple:
        """A FLUX call's inputs that depend only on the size, the prompt's token count and the guidance value:
        (image position ids, text position ids, the guidance embedding's value as a 0-d float32 Tensor or None).
        Ids are in ``dtype`` for FLUX.1 (as FluxPipeline casts them) and float32 for FLUX.2, whose pipelines keep
        them integer: its text ids count up to 512 tokens, past what bfloat16 holds exactly (256)."""
        h, w = self.latent_hw(height, width)
        g = self.embedded_guidance(guidance_scale)
        dtype = torch.float32 if self.kind == "flux2" else dtype
        return (packed_image_ids(self.kind, h // 2, w // 2, device, dtype), text_ids(self.kind, tokens, device, dtype),
                None if g is None else torch.full((), g, device=device, dtype=torch.float32))

    def flow_model(self, cond: Conditioning, per_prompt: int, height: int, width: int, *,
                   guidance_scale: float | None = None, cfg_scale: float = 1.0,
                   max_batch: int | None = None, attention_kwargs: dict | None = None,
                   skip_layer_guidance: "SkipLayerGuidance | None" = None) -> FlowModel:
        """The glass_fast FlowModel of this transformer under ``cond``.

        Rows are prompt-major: row r belongs to prompt r // per_prompt, so the model expects P * per_prompt
        rows, or a multiple m of that with every row repeated m times in place (``repeat_interleave``, as
        posterior-value estimates do): then row r belongs to prompt r // (m * per_prompt). With classifier-free
        guidance (cfg_scale != 1, which needs ``cond``'s negative embeddings) the model is the guided field
        u_uncond + cfg_scale (u_cond - u_uncond), from one transformer call on the stacked (uncond, cond) rows.

        Args:
            cond: prompt conditioning of P prompts.
            per_prompt: rows (particles, images) per prompt.
            height, width: image size in pixels.
            guidance_scale: FLUX's distilled guidance embedding value (``embedded_guidance``).
            cfg_scale: classifier-free guidance weight (SD3's and FLUX.2 Klein's guidance_scale, FLUX's
                true_cfg_scale).
            max_batch: most rows per transformer call (guided rows count twice); None = all at once.
            attention_kwargs: the transformer's ``joint_attention_kwargs``, given to every call as they are (with
                each call's rows' IP-Adapter image prompts from ``cond`` added).
            skip_layer_guidance: SD3 with classifier-free guidance only: adds scale * (u_cond - u_skip) inside
                its time window, u_skip from one more call on the conditional rows with blocks skipped.
        Returns:
            FlowModel(prediction="velocity", LinearSchedule()) running in the transformer's dtype.
        Raises:
            ValueError: per_prompt or max_batch not an integer >= 1, a non-finite weight, cfg_scale != 1 without
                negative embeddings, skip-layer guidance outside SD3 with guidance or naming no block it has.
        """
        if isinstance(per_prompt, bool) or not isinstance(per_prompt, numbers.Integral) or per_prompt < 1:
            raise ValueError(f"per_prompt must be an integer >= 1, got {per_prompt!r}")
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, numbers.Integral)
                                      or max_batch < 1):
            raise ValueError(f"max_batch must be an integer >= 1 or None, got {max_batch!r}")
        cfg_scale = guidance_weight("cfg_scale", cfg_scale, none_ok=False)
        guidance_scale = guidance_weight("guidance_scale", guidance_scale)
        rows = cond.num_prompts * int(per_prompt)
        use_cfg = cfg_scale != 1.0
        if use_cfg and cond.negative_embeds is None:
            # Running the unguided field instead would silently ignore the weight.
            raise ValueError(f"cfg_scale={cfg_scale!r} needs the unconditional branch: the conditioning has no "
                             f"negative embeddings (encode with cfg=True), or pass cfg_scale=1.0")
        if skip_layer_guidance is not None and (self.kind != "sd3" or not use_cfg):
            raise ValueError("skip-layer guidance needs a Stable Diffusion 3 transformer and classifier-free "
                             "guidance (guidance_scale > 1 with negative embeddings), as in the SD3 pipeline")
        if skip_layer_guidance is not None:
            skip_layer_guidance.check_layers(self.transformer.config.num_layers)
        per_call = None if max_batch is None else max(1, max_batch // (2 if use_cfg else 1))
        # With guidance, one call on the stacked (unconditional, conditional) rows.
        embeds, pooled = (((cond.negative_embeds, cond.prompt_embeds), (cond.negative_pooled, cond.pooled)) if use_cfg
                          else ((cond.prompt_embeds,), (cond.pooled,)))
        # Built once, not in every call: nothing in them changes between calls (and a CUDA graph replays them).
        inputs = None if self.kind not in PACKED else self.packed_inputs(
            height, width, cond.prompt_embeds.shape[1], guidance_scale, cond.prompt_embeds.device, self.dtype)
        refs = None
        if cond.context is not None and caches_references(self):
            refs = ReferenceCache(self, cond.context, cond.context_ids, cond.prompt_embeds, inputs,
                                  self.state_shape(height, width)[0], attention_kwargs)

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            n = x.shape[0]
            if n % rows:
                raise ValueError(f"this model was built for {cond.num_prompts} prompt(s) x {per_prompt} rows = "
                                 f"{rows} rows (prompt-major) or a multiple of that, got a batch of {n}")
            block = per_prompt * (n // rows)
            outs = []
            size = n if per_call is None else per_call
            for lo in range(0, n, size):
                idx = torch.arange(lo, min(lo + size, n), device=cond.prompt_embeds.device) // block
                tc = t[lo:lo + size]
                xc, sc = x[lo:lo + size], 1.0 - tc
                v = self.predict(cfg_stack(xc, use_cfg), cfg_stack(sc, use_cfg), _rows(*embeds, idx=idx),
                                 _rows(*pooled, idx=idx), height, width, guidance_scale,
                                 cond.attention_kwargs(self.kind, attention_kwargs, idx, use_cfg),
                                 context=None if refs is not None else cond.context_rows(idx, use_cfg),
                                 channels=cond.channel_rows(idx, use_cfg), control=cond.control_rows(idx, tc, use_cfg),
                                 inputs=inputs,
                                 references=None if refs is None else refs.rows(len(idx) * (2 if use_cfg else 1)))
                if use_cfg:
                    unc, con = v.float().chunk(2)
                    v = unc + cfg_scale * (con - unc)
                    slg = skip_layer_guidance
                    on = None if slg is None else slg.active(tc)
                    # A host check (one small sync per call) saves the extra transformer call outside the window.
                    if on is not None and bool(on.any()):
                        skipped = self.predict(xc, sc, cond.prompt_embeds[idx], _rows(cond.pooled, idx=idx),
                                               height, width, guidance_scale,
                                               cond.attention_kwargs(self.kind, attention_kwargs, idx, False),
                                               slg.layers).float()
                        shift = slg.scale * (con - skipped)
                        v = v + torch.where(on.view((-1,) + (1,) * (v.dim() - 1)), shift, torch.zeros_like(shift))
                outs.append((-v).to(x.dtype))  # u = dx/dt = z - eps = -v
            return outs[0] if len(outs) == 1 else torch.cat(outs)

        fn.__name__ = f"{self.kind}_transformer"
        return FlowModel(fn, LinearSchedule(), prediction="velocity", dtype=self.dtype)

    # -- the VAE -------------------------------------------------------------------------------------------
    def _need_vae(self, purpose: str) -> None:
        if self.vae is None:
            raise ValueError(f"{purpose} needs a VAE: build the adapter with vae=...")

    def _latent_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """FLUX.2: (mean, std) [4C] of every packed feature, the VAE's batch-norm running statistics."""
        bn = self.vae.bn
        return bn.running_mean.float(), torch.sqrt(bn.running_var.float() + self.vae.config.batch_norm_eps)

    def to_state(self, lat: torch.Tensor) -> torch.Tensor:
        """VAE latents [n, C, h, w] -> normalised states [n, *state_shape]: FLUX.2 packs then standardises by
        the batch-norm statistics; FLUX.1 and SD3 shift and scale by the VAE config, then FLUX.1 packs."""
        self._need_vae("latent normalisation")
        if not isinstance(lat, torch.Tensor) or lat.dim() != 4 or lat.shape[1] != self.latent_channels():
            got = tuple(lat.shape) if isinstance(lat, torch.Tensor) else type(lat).__name__
            raise ValueError(f"VAE latents must have shape [n, {self.latent_channels()}, h, w], got {got}")
        if self.kind == "flux2":
            mean, std = self._latent_stats()
            return (self.pack(lat) - mean.to(lat.device)) / std.to(lat.device)
        cfg = self.vae.config
        return self.pack((lat - (cfg.get("shift_factor", None) or 0.0)) * cfg.scaling_factor)

    def to_vae(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """States -> the VAE's latents [n, C, h, w] (``to_state``'s inverse; FLUX.2 Klein's "latent" output)."""
        self._need_vae("latent normalisation")
        self.check_states(x, height, width)
        if self.kind == "flux2":
            mean, std = self._latent_stats()
            return self.unpack(x * std.to(x.device) + mean.to(x.device), height, width)
        cfg = self.vae.config
        return self.unpack(x, height, width) / cfg.scaling_factor + (cfg.get("shift_factor", None) or 0.0)

    def encode_images(self, images: torch.Tensor, generator=None, mean: bool = False) -> torch.Tensor:
        """Images [n, 3, H, W] in [-1, 1] -> states [n, *state_shape] (float32): one draw from the VAE's
        posterior with ``generator`` (as the img2img pipelines encode images) or its mean (``mean``, as FLUX.1
        Kontext and FLUX.2 encode reference images), normalised and packed (``to_state``)."""
        self._need_vae("encoding an image")
        with torch.no_grad():
            dist = self.vae.encode(images.to(device=self.device, dtype=self.vae.dtype)).latent_dist
            lat = dist.mode() if mean else dist.sample(generator)
        return self.to_state(lat.float())

    def decode(self, x: torch.Tensor, height: int, width: int, max_batch: int | None = None) -> torch.Tensor:
        """States -> images [N, 3, height, width] in [-1, 1] (float32), decoded under ``max_batch`` rows."""
        self._need_vae("decoding (output_type other than 'latent')")
        size = x.shape[0] if max_batch is None else max(1, int(max_batch))
        out = []
        for lo in range(0, x.shape[0], size):
            lat = self.to_vae(x[lo:lo + size], height, width)
            # Under CPU offload the VAE's weights sit on the CPU until its hook moves them for the call.
            img = self.vae.decode(lat.to(device=self.device, dtype=self.vae.dtype), return_dict=False)[0]
            out.append(img.float())
        return torch.cat(out)


def _shift_mu(seq_len: int, cfg, default_max_shift: float) -> float:
    """Resolution-dependent shift: mu linear in the token count (the pipelines' calculate_shift)."""
    lo_len, hi_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    lo, hi = cfg.get("base_shift", 0.5), cfg.get("max_shift", default_max_shift)
    slope = (hi - lo) / (hi_len - lo_len)
    return seq_len * slope + (lo - slope * lo_len)


def _rows(*tensors, idx: torch.Tensor):
    """The rows ``idx`` of every tensor, concatenated; None when they are None (FLUX.2 has no pooled
    embeddings)."""
    if tensors[0] is None:
        return None
    return torch.cat([t[idx] for t in tensors]) if len(tensors) > 1 else tensors[0][idx]


class SkipLayerGuidance:
    """SD3's skip-layer guidance on a window of glass_fast times (t = 1 - sigma).

    Args:
        layers: transformer block indices to skip in the extra call.
        scale: weight of (u_cond - u_skip).
        window: (lo, hi) times where it is on, or None for never (``from_steps`` converts the pipeline's
            step fractions).
    """

    def __init__(self, layers, scale: float, window: tuple[float, float]):
        if isinstance(layers, (numbers.Number, str)) or not all(
                isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"skip_guidance_layers must be a list of block indices, got {layers!r}")
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not np.isfinite(scale):
            raise ValueError(f"skip_layer_guidance_scale must be a finite number, got {scale!r}")
        self.layers, self.scale = tuple(int(i) for i in layers), float(scale)
        self.window = None if window is None else (float(window[0]), float(window[1]))

    @classmethod
    def from_steps(cls, layers, scale: float, start: float, stop: float, grid: torch.Tensor) -> "SkipLayerGuidance":
        """The pipeline's rule, step i of N on when N * start < i < N * stop, as the time window spanned by
        those steps' times on ``grid`` (N + 1 increasing glass_fast times); model calls at those times, as
        in an ODE with one call per step, get exactly the pipeline's guidance."""
        for name, v in (("skip_layer_guidance_start", start), ("skip_layer_guidance_stop", stop)):
            # A NaN compares False everywhere: the guidance would silently never run.
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v):
                raise ValueError(f"{name} must be a finite number (a fraction of the steps), got {v!r}")
        return cls(layers, scale, steps_window(grid, lambda i, n: n * start < i < n * stop, whole=False))

    def check_layers(self, blocks: int) -> None:
        """ValueError unless every skipped layer is one of the transformer's ``blocks`` blocks: it skips only
        indices it has, so another index (or none) would make the extra call the conditional one and the
        guidance silently zero."""
        if not self.layers or any(not 0 <= i < blocks for i in self.layers):
            raise ValueError(f"skip_guidance_layers must be a non-empty list of block indices in 0..{blocks - 1} "
                             f"(this SD3 transformer has {blocks} blocks), got {list(self.layers)}")

    def active(self, t: torch.Tensor) -> torch.Tensor | None:
        """[N] bool: which rows' times lie in the window (with a tolerance for float32 times); None when
        the window holds no step (never on: no check, no extra call)."""
        return None if self.window is None else in_window(t, self.window, whole=False)
