#!/usr/bin/env python3
"""Wall time per model call of GLASS, ODE and SDE sampling on a FLUX-shaped transformer (a plain script).

    python benchmarks/gpu_diffusers.py                       # CUDA, bf16, FLUX widths, 2 + 4 blocks
    python benchmarks/gpu_diffusers.py --device cpu --small  # a seconds-long smoke run anywhere

The transformer has FLUX.1's widths (24 heads of 128, T5 width 4096, CLIP pooled 768, 64 packed latent
channels, guidance embedding) with random weights and reduced depth; what is compared is the sampler around
it, so depth only scales every row alike. Each method runs transitions x inner_steps model calls on the
same prompt and batch; rows are interleaved over repeats and the median is reported. "FK-GLASS" is
Feynman-Kac steering with GLASS proposals and a latent reward (no VAE), which reuses the reward's
x0-prediction as the first model call of each transition. Exits 0 with a message where diffusers or CUDA
is missing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny widths and 64 px images (smoke test)")
    ap.add_argument("--double", type=int, default=2, help="double-stream blocks (FLUX.1: 19)")
    ap.add_argument("--single", type=int, default=4, help="single-stream blocks (FLUX.1: 38)")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--batch", type=int, default=4, help="images (particles) per prompt")
    ap.add_argument("--transitions", type=int, default=5)
    ap.add_argument("--inner-steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("diffusers not installed, skipped")
        return 0
    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA not available, skipped")
        return 0
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from glass_fast.steering import fk_steering
    from glass_fast.integrations import diffusers as gd

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if args.small:
        widths = dict(attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                      pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
        text_len, size = 16, 64
    else:  # FLUX.1 widths
        widths = dict(attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                      pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
        text_len, size = 256, args.size
    torch.manual_seed(0)
    with torch.device(dev):
        tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=args.double,
                                    num_single_layers=args.single, guidance_embeds=True, **widths)
    tr = tr.to(dtype).eval().requires_grad_(False)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                            max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    # A FLUX VAE downsamples by 8; the adapter reads the factor from the VAE, 8 without one.
    pipe = type("FluxParts", (), dict(transformer=tr, scheduler=sched, vae=None))()
    flow = gd.as_flow(pipe)
    g = torch.Generator(device=dev).manual_seed(0)
    emb = dict(prompt_embeds=torch.randn(1, text_len, widths["joint_attention_dim"], device=dev, generator=g),
               pooled_prompt_embeds=torch.randn(1, widths["pooled_projection_dim"], device=dev, generator=g))
    calls = args.transitions * args.inner_steps
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run_sample(method):
        return gd.sample(pipe, method=method, transitions=args.transitions, inner_steps=args.inner_steps,
                         num_images_per_prompt=args.batch, height=size, width=size, generator=g,
                         output_type="latent", **emb)

    cond = gd.encode(flow, **emb)
    model = flow.flow_model(cond, args.batch, size, size)

    def run_fk(_):
        noise = flow.noise(args.batch, size, size, g).unsqueeze(0)
        return fk_steering(model, lambda x: -x.float().pow(2).mean(dim=(1, 2)), noise,
                                               method="glass", transitions=args.transitions,
                                               inner_steps=args.inner_steps, generator=g)

    x = flow.noise(args.batch, size, size, g).to(dtype)
    t = torch.full((args.batch,), 0.5, device=dev)

    def run_bare(_):  # the transformer alone, calls times, no sampler around it
        with torch.no_grad():
            for _ in range(calls):
                model(x, t)

    rows = [("transformer alone", run_bare, None), ("ODE (Euler)", run_sample, "ode"),
            ("SDE (Euler-Maruyama)", run_sample, "sde"), ("GLASS (Euler, rho=0.4)", run_sample, "glass"),
            ("FK-GLASS (K=%d)" % args.batch, run_fk, None)]
    times = {name: [] for name, _, _ in rows}
    for rep in range(args.repeats + 1):  # the first round warms up (allocator, kernels, plans)
        for name, fn, arg in rows:
            sync()
            t0 = time.perf_counter()
            out = fn(arg)
            sync()
            if rep:
                times[name].append(time.perf_counter() - t0)
            if out is not None:
                res = out.samples if hasattr(out, "samples") else out
                if not bool(torch.isfinite(res).all()):
                    print(f"{name}: non-finite output", file=sys.stderr)
                    return 1

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    from glass_fast.ops import resolve_backend
    print(f"device: {name}; torch {torch.__version__}; diffusers {diffusers.__version__}; {dtype}; "
          f"glass_fast backend {resolve_backend(dev.type)}")
    print(f"FLUX-shaped transformer: {args.double} double + {args.single} single blocks, "
          f"{sum(p.numel() for p in tr.parameters()) / 1e9:.2f} B parameters; {args.batch} images of {size} px "
          f"({(size // 16) ** 2} image + {text_len} text tokens); {args.transitions} transitions x "
          f"{args.inner_steps} inner steps = {calls} calls; median of {args.repeats}")
    base = statistics.median(times["ODE (Euler)"]) / calls
    print(f"{'method':<24}{'ms / call':>11}{'vs ODE':>9}")
    for label, _, _ in rows:
        per = statistics.median(times[label]) / calls
        print(f"{label:<24}{per * 1e3:>11.2f}{per / base:>9.3f}")
    glass = statistics.median(times["GLASS (Euler, rho=0.4)"]) / calls
    print(f"GLASS / ODE per model call: {glass / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
