#!/usr/bin/env python3
"""FLUX with Feynman-Kac steering over GLASS transitions, scored by CLIP (or any image reward).

    # FLUX.1-dev and a CLIP model already on disk (nothing is downloaded):
    python examples/flux_fk_glass.py --model /models/FLUX.1-dev --clip /models/clip-vit-large-patch14 \\
        --prompt "a red bicycle leaning on a blue wall" --particles 8 --out flux_fk
    # The same pipeline end to end on tiny random weights (any machine, seconds; images are noise):
    python examples/flux_fk_glass.py --tiny --out flux_fk_tiny

What it does: 8 particles per prompt, 5 GLASS transitions of 10 Euler inner steps (rho = 0.4, the paper's
FLUX setting: 50 model calls per particle, 400 per prompt). After each transition every particle's
x0-prediction is decoded by the VAE and scored; particles are reweighted by exp(lmbda * reward increase) and
resampled within the prompt's group when the effective sample size drops below half. The highest-reward
final particle is saved, with the reward of every final particle printed.

GPU memory (assumptions: bf16 weights, everything resident on one GPU, 1024 x 1024 images):
    FLUX.1-dev transformer (12 B parameters)        ~ 24 GB
    T5-XXL text encoder (4.7 B)                     ~ 10 GB   (only for encoding; --offload moves it out)
    CLIP-L text encoder, VAE, CLIP reward model     ~  1.5 GB
    activations, 8 particles at 4096 image tokens   ~  4-8 GB with --max-batch 4 (model and VAE rows per call)
so about 40 GB resident: an 80 GB H100 / A100 is comfortable, a 48 GB card works; on a 24 GB card use
--offload (model CPU offload: slower, the transformer's 24 GB still needs the GPU during its calls, so
also lower --size). --max-batch trades speed for memory and never changes the result.

A reward is any callable(images [N, 3, H, W] in [0, 1], prompts list of N) -> Tensor[N]; an
ImageReward-style scorer plugs in the same way as the CLIP score here.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def tiny_flux(device):
    """A FLUX-shaped pipeline stand-in with random weights: transformer, scheduler, VAE; no text encoders."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, scaling_factor=1.5, shift_factor=0.06)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=16,
                                            max_image_seq_len=256)
    return SimpleNamespace(transformer=tr.to(device).eval(), vae=vae.to(device).eval(), scheduler=sched)


def colourfulness(images: torch.Tensor, prompts) -> torch.Tensor:
    """A prompt-free reward for runs without CLIP weights: mean per-pixel spread of the RGB channels."""
    return images.std(dim=1).mean(dim=(1, 2))


def _positive(text: str) -> int:
    if not text.lstrip("-").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def _check_args(ap, args) -> None:
    """Bad paths and devices fail here, in one line, before minutes of model loading."""
    if args.tiny and (args.size is not None or args.offload):
        # The tiny stand-in runs at its own 64 x 64 on --device; refused rather than silently ignored.
        ap.error(f"{'--size' if args.size is not None else '--offload'} applies to --model runs, not to --tiny")
    for flag, path in (("--model", None if args.tiny else args.model), ("--clip", args.clip)):
        if path is not None and not os.path.isdir(path):
            ap.error(f"{flag} {path!r} is not a folder; give the local folder of the saved model")
    try:
        torch.empty(1, device=args.device)
    except (RuntimeError, AssertionError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:300]
        ap.error(f"--device {args.device!r} cannot be used here ({reason}); use cpu"
                 + (" or cuda" if torch.cuda.is_available() else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="FLUX + FK steering over GLASS transitions")
    ap.add_argument("--model", default=os.environ.get("FLUX_PATH"), help="local FLUX.1-dev folder")
    ap.add_argument("--clip", default=os.environ.get("CLIP_PATH"), help="local CLIP folder (reward)")
    ap.add_argument("--tiny", action="store_true", help="tiny random weights instead of --model")
    ap.add_argument("--prompt", action="append", help="prompt (repeat for several groups)")
    ap.add_argument("--particles", type=_positive, default=8)
    ap.add_argument("--transitions", type=_positive, default=5)
    ap.add_argument("--inner-steps", type=_positive, default=10)
    ap.add_argument("--rho", type=float, default=0.4)
    ap.add_argument("--lmbda", type=float, default=10.0, help="reward temperature (CLIP cosines span ~0.1)")
    ap.add_argument("--guidance", type=float, default=3.5, help="FLUX distilled guidance")
    ap.add_argument("--size", type=_positive, default=None, help="image side in pixels (default 1024; --tiny: 64)")
    ap.add_argument("--max-batch", type=_positive, default=4)
    ap.add_argument("--offload", action="store_true", help="model CPU offload (low-memory GPUs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="flux_fk_glass")
    args = ap.parse_args(argv)
    _check_args(ap, args)

    from glass_fast.integrations.diffusers import sample, steer
    from glass_fast.integrations.rewards import CLIPScoreReward

    prompts = args.prompt or ["a red bicycle leaning on a blue wall"]
    extra = {}
    if args.tiny:
        pipe, size = tiny_flux(args.device), 64
        g = torch.Generator(device=args.device).manual_seed(args.seed)
        extra = dict(prompt_embeds=torch.randn(len(prompts), 16, 32, generator=g, device=args.device),
                     pooled_prompt_embeds=torch.randn(len(prompts), 32, generator=g, device=args.device))
    else:
        if not args.model:
            ap.error("--model (or FLUX_PATH) must name a local FLUX.1-dev folder; or use --tiny")
        from diffusers import FluxPipeline
        pipe = FluxPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16, local_files_only=True)
        pipe.enable_model_cpu_offload() if args.offload else pipe.to(args.device)
        pipe.set_progress_bar_config(disable=True)
        size = args.size or 1024
    if args.clip:
        reward = CLIPScoreReward.from_pretrained(args.clip, device=args.device)
        name = "CLIP score"
    else:
        reward, name = colourfulness, "colourfulness (no --clip given)"

    g = torch.Generator(device=args.device).manual_seed(args.seed)
    t0 = time.perf_counter()
    try:
        images, res = steer(pipe, prompts, reward, particles=args.particles, method="glass",
                            transitions=args.transitions, inner_steps=args.inner_steps, rho=args.rho,
                            lmbda=args.lmbda, guidance_scale=args.guidance, height=size, width=size, generator=g,
                            max_batch=args.max_batch, output_type="pil", progress=True, **extra)
    except ValueError as exc:  # the library's argument checks (rho, lmbda, size) name the value and what is allowed
        ap.error(str(exc).splitlines()[0])
    secs = time.perf_counter() - t0
    # The baseline: one plain ODE sample per prompt at one particle's budget (50 calls; steering spent 400 per
    # prompt), so the printed gap is what steering buys over a single sample.
    base = sample(pipe, prompts, method="ode", transitions=args.transitions * args.inner_steps, inner_steps=1,
                  guidance_scale=args.guidance, height=size, width=size, generator=g, max_batch=args.max_batch,
                  output_type="pt", **extra)
    base_scores = reward(base, prompts)
    os.makedirs(args.out, exist_ok=True)
    for i, (p, img) in enumerate(zip(prompts, images)):
        img.save(os.path.join(args.out, f"fk_glass_{i}.png"))
        print(f"[{i}] {p!r}: {name} of the {args.particles} final particles {res.rewards[i].tolist()}; "
              f"best {res.rewards[i].max().item():.4f}, plain ODE sample {base_scores[i].item():.4f}")
    print(f"{res.nfe:.0f} model calls per particle, {secs:.1f} s for steering; images in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
