"""Sampler overhead: wall time of a full GLASS sample / (model calls x one model forward measured alone).

    python benchmarks/bench_overhead.py          # the ratio for the CPU MLP, the per-call cost with a tiny network
    pytest benchmarks/bench_overhead.py --benchmark-enable
A ratio of 1.00 means the sampler adds nothing beyond the model's own time. With a network that costs almost
nothing (x -> -x on [64, 2], as 2-D toy problems have) the run's time per model call is the sampler's own work:
``Sampler.run`` (planned once) and ``sample`` (planning included). Under pytest, each sample's ``extra_info``
holds its ratio to the forward timed in the same test (``ratio_median``, ``ratio_min``), and every timed sampler
is first checked against the eager reference-backend sample of the same seed.
"""
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import glass_fast as gf  # noqa: E402
from models import MLP  # noqa: E402

BATCH, DIM, TRANSITIONS, INNER = 256, 64, 5, 10


def _setup(device="cpu"):
    torch.manual_seed(0)
    net = MLP(DIM).to(device).eval()
    model = gf.FlowModel(net, gf.LinearSchedule())
    noise = torch.randn(BATCH, DIM, device=device)
    return net, model, noise


def _time(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


@torch.no_grad()
def overhead_ratio(repeats: int = 5) -> dict:
    net, model, noise = _setup()
    t = torch.full((BATCH,), 0.5)
    forward = _time(lambda: net(noise, t), repeats * 20)
    sampler = gf.Sampler(model, transitions=TRANSITIONS, inner_steps=INNER)
    gen = torch.Generator().manual_seed(0)
    full = _time(lambda: sampler.run(noise, generator=gen), repeats)
    return {"forward_s": forward, "sample_s": full, "calls": sampler.calls, "ratio": full / (sampler.calls * forward)}


TINY_BATCH, TINY_DIM = 64, 2


@torch.no_grad()
def tiny_overhead(repeats: int = 20) -> dict:
    """Seconds per model call of a GLASS run with a network that costs almost nothing."""
    model = gf.FlowModel(lambda x, t: -x, gf.LinearSchedule())
    noise = torch.randn(TINY_BATCH, TINY_DIM, generator=torch.Generator().manual_seed(0))
    sampler = gf.Sampler(model, transitions=TRANSITIONS, inner_steps=INNER)
    gen = torch.Generator().manual_seed(0)
    run = _time(lambda: sampler.run(noise, generator=gen), repeats)
    full = _time(lambda: gf.sample(model, noise, transitions=TRANSITIONS, inner_steps=INNER, generator=gen), repeats)
    return {"run_per_call_s": run / sampler.calls, "sample_per_call_s": full / sampler.calls, "calls": sampler.calls}


def check_sample(sampler: gf.Sampler, model: gf.FlowModel, noise: torch.Tensor) -> None:
    """The timed sampler (its backend, compiled or not) gives the eager reference-backend sample of one seed."""
    got = sampler.run(noise, generator=torch.Generator().manual_seed(0))
    with gf.ops.use_backend("reference"):
        want = gf.Sampler(model, transitions=TRANSITIONS, inner_steps=INNER).run(
            noise, generator=torch.Generator().manual_seed(0))
    # float32 state over 50 stages; compiled code may fuse and reorder the network's and the step's arithmetic
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("provider", ["forward", "sample", "sample-compiled", "sample-tiny"])
@torch.no_grad()
def test_overhead(benchmark, provider):
    net, model, noise = _setup()
    if provider == "sample-tiny":
        model = gf.FlowModel(lambda x, t: -x, gf.LinearSchedule())
        noise = torch.randn(TINY_BATCH, TINY_DIM, generator=torch.Generator().manual_seed(0))
    sampler = gf.Sampler(model, transitions=TRANSITIONS, inner_steps=INNER, compile=provider == "sample-compiled")
    t = torch.full((BATCH,), 0.5)
    forward = lambda: net(noise, t)  # noqa: E731
    if provider != "forward":
        check_sample(sampler, model, noise)  # also compiles "sample-compiled" outside the timed rounds
    gen = torch.Generator().manual_seed(0)  # called as in check_sample, so compiled code is reused as it is
    benchmark(forward if provider == "forward" else (lambda: sampler.run(noise, generator=gen)))
    batch, dim = noise.shape
    benchmark.extra_info.update(provider=provider, batch=batch, dim=dim, calls=sampler.calls, device="cpu",
                                backend=gf.ops.resolve_backend("cpu"), threads=torch.get_num_threads())
    if provider in ("sample", "sample-compiled") and benchmark.stats is not None:
        # The overhead ratio against the forward timed in this run, right after the sample's rounds: medians,
        # and minimums (the steadier figure when other jobs share the cores).
        times = []
        for _ in range(50):
            start = time.perf_counter()
            forward()
            times.append(time.perf_counter() - start)
        times.sort()
        stats, calls = benchmark.stats.stats, sampler.calls
        benchmark.extra_info.update(forward_median_s=times[len(times) // 2], forward_min_s=times[0],
                                    ratio_median=stats.median / (calls * times[len(times) // 2]),
                                    ratio_min=stats.min / (calls * times[0]))


if __name__ == "__main__":
    r = overhead_ratio()
    print(f"CPU MLP (batch {BATCH}, dim {DIM}): one forward {r['forward_s'] * 1e3:.3f} ms, "
          f"full GLASS sample ({r['calls']} calls) {r['sample_s'] * 1e3:.1f} ms, overhead ratio {r['ratio']:.3f}")
    r = tiny_overhead()
    print(f"CPU x -> -x (batch {TINY_BATCH}, dim {TINY_DIM}), {r['calls']} calls: Sampler.run "
          f"{r['run_per_call_s'] * 1e6:.1f} us per model call, sample (planning included) "
          f"{r['sample_per_call_s'] * 1e6:.1f} us per model call")
