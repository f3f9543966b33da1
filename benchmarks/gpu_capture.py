"""GPU overhead of a full GLASS sample: eager, CUDA graph and torch.compile, on a DiT-style transformer.

    python benchmarks/gpu_capture.py [--compile]

Overhead ratio = wall time of a full sample / (model calls x one forward measured alone, eager). Also checks
that graph replays equal eager samples from the same seed and that the captured loop never syncs the host.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import glass_fast as gf  # noqa: E402
from models import DiT  # noqa: E402


def cuda_time(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow to build)")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    net = DiT().cuda().to(torch.bfloat16).eval()
    params = sum(p.numel() for p in net.parameters()) / 1e6
    model = gf.FlowModel(net, gf.LinearSchedule(), dtype=torch.bfloat16)
    noise = torch.randn(args.batch, 4, 32, 32, device="cuda")
    kw = dict(method="glass", transitions=5, inner_steps=10, device="cuda")
    t = torch.full((args.batch,), 0.5, device="cuda")
    xb = noise.to(torch.bfloat16)
    forward = cuda_time(lambda: net(xb, t), 50)
    # The network's own GPU time: its forward replayed from a CUDA graph (no launch overhead).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            net(xb, t)
    torch.cuda.current_stream().wait_stream(side)
    fwd_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(fwd_graph):
        net(xb, t)
    forward_graphed = cuda_time(fwd_graph.replay, 50)
    rows = []
    eager = gf.Sampler(model, **kw)
    calls = eager.calls
    gen = torch.Generator("cuda")
    rows.append(("eager", cuda_time(lambda: eager.run(noise, generator=gen.manual_seed(0)), 5)))
    graphed = gf.Sampler(model, cuda_graph=True, **kw)
    rows.append(("cuda_graph", cuda_time(lambda: graphed.run(noise, generator=gen.manual_seed(0)), 5)))
    if args.compile:
        comp = gf.Sampler(model, compile="max-autotune-no-cudagraphs", **kw)
        rows.append(("compile", cuda_time(lambda: comp.run(noise, generator=gen.manual_seed(0)), 5)))

    a = eager.run(noise, generator=gen.manual_seed(1))
    b = graphed.run(noise, generator=gen.manual_seed(1))
    diff = float((a - b).abs().max())
    torch.cuda.set_sync_debug_mode("error")
    try:
        x, g = noise, gen.manual_seed(2)
        for k in range(graphed.transitions):
            x = graphed.step(k, x, generator=g)
        sync_free = "yes"
    except RuntimeError as e:  # the sync debug mode raises on a synchronising call
        sync_free = f"NO ({str(e).splitlines()[0]})"
    finally:
        torch.cuda.set_sync_debug_mode(0)

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  backend {gf.ops.requested_backend()}")
    print(f"DiT {params:.1f}M params, bf16, batch {args.batch}, 4x32x32 latents; one forward {forward * 1e3:.3f} ms "
          f"eager, {forward_graphed * 1e3:.3f} ms replayed from a CUDA graph; {calls} calls per sample")
    print("| mode | sample ms | ratio to eager forwards | ratio to graphed forwards |\n|---|---|---|---|")
    for name, sec in rows:
        print(f"| {name} | {sec * 1e3:.1f} | {sec / (calls * forward):.3f} | {sec / (calls * forward_graphed):.3f} |")
    print(f"graph vs eager max |diff| (same seed): {diff:.2e}; graph loop free of host syncs: {sync_free}")
    steering_overhead(model, noise, forward, forward_graphed, kw)


def steering_overhead(model, noise, forward: float, forward_graphed: float, kw: dict, particles: int = 8):
    """FK steering over GLASS on the same batch as groups of ``particles``: a reused FKSteering object."""
    grouped = noise.reshape((noise.shape[0] // particles, particles) + tuple(noise.shape[1:]))
    reward = lambda x: -x.float().square().mean(dim=tuple(range(1, x.dim())))  # noqa: E731 (cheap on purpose)
    opts = {k: v for k, v in kw.items() if k != "device"}
    gen = torch.Generator(noise.device)
    rows = []
    for name, extra in (("FK eager", {}), ("FK cuda_graph", {"cuda_graph": True})):
        steer = gf.FKSteering(model, reward, **opts, **extra)
        nfe = steer(grouped, generator=gen.manual_seed(0)).nfe
        rows.append((name, cuda_time(lambda: steer(grouped, generator=gen.manual_seed(0)), 5), nfe))
    print(f"FK steering, {grouped.shape[0]} groups x {particles} particles, systematic resampling, a cheap reward:")
    print("| mode | run ms | model calls | ratio to eager forwards | ratio to graphed forwards |\n|---|---|---|---|---|")
    for name, sec, nfe in rows:
        print(f"| {name} | {sec * 1e3:.1f} | {nfe:.0f} | {sec / (nfe * forward):.3f} | {sec / (nfe * forward_graphed):.3f} |")


if __name__ == "__main__":
    main()
