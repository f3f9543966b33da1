"""The digits model end to end: sampler wall-clock at 50 model calls, and the miniature paper tables.

    pytest benchmarks/bench_digits.py --benchmark-enable          # seconds per batch of 64, per sampler
    python benchmarks/bench_digits.py [glass-fast bench options]  # the markdown tables (= glass-fast bench)
"""
import sys

import pytest
import torch

import glass_fast
from glass_fast.steering import fk_steering
from glass_fast.zoo import digit_reward, digits_flow_model

CONFIGS = {
    "ode": dict(method="ode"),
    "sde": dict(method="sde"),
    "glass-ddpm": dict(method="glass", rho="ddpm"),
    "glass-0.4": dict(method="glass", rho=0.4),
    "glass-0.4-midpoint": dict(method="glass", rho=0.4, solver="midpoint"),
}


@pytest.fixture(scope="module")
def model():
    return digits_flow_model()


def _against_reference(run):
    """(run on the active backend, run on the reference backend), both from the same seed.

    A fast wrong kernel fails here instead of passing as a win. The tolerance covers float32 rounding over
    50 stages (measured: at most 3e-5); FK's resampling then draws the same ancestors on both backends.
    """
    got = run(torch.Generator().manual_seed(1))
    with glass_fast.ops.use_backend("reference"):
        want = run(torch.Generator().manual_seed(1))
    return got, want


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sample_50_calls(benchmark, model, name):
    noise = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(transitions=5, inner_steps=10, **CONFIGS[name])
    got, want = _against_reference(lambda g: glass_fast.sample(model, noise, generator=g, **kw))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    gen = torch.Generator().manual_seed(1)
    benchmark.group = "digits sample, batch 64, 50 model calls"
    benchmark(glass_fast.sample, model, noise, generator=gen, **kw)
    benchmark.extra_info.update(sampler=name, batch=64, calls=50, device="cpu", threads=torch.get_num_threads(),
                                backend=glass_fast.ops.resolve_backend("cpu"))


@pytest.mark.parametrize("method", ["sde", "glass"])
def test_fk_steering_8_particles(benchmark, model, method):
    noise = torch.randn(8, 8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    reward = digit_reward(3)
    got, want = _against_reference(lambda g: fk_steering(model, reward, noise, method=method, generator=g))
    assert got.nfe == want.nfe == 50, f"{got.nfe} model calls per particle, expected 50"
    torch.testing.assert_close(got.samples, want.samples, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.log_weights, want.log_weights, rtol=1e-4, atol=1e-4)
    gen = torch.Generator().manual_seed(1)
    benchmark.group = "digits FK steering, 8 groups x 8 particles, 50 model calls"
    benchmark(fk_steering, model, reward, noise, method=method, generator=gen)
    benchmark.extra_info.update(proposal=method, groups=8, particles=8, calls=50, device="cpu",
                                threads=torch.get_num_threads(), backend=glass_fast.ops.resolve_backend("cpu"))


if __name__ == "__main__":
    from glass_fast.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
