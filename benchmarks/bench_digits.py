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


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sample_50_calls(benchmark, model, name):
    noise = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    benchmark(glass_fast.sample, model, noise, transitions=5, inner_steps=10, generator=gen, **CONFIGS[name])
    benchmark.extra_info.update(sampler=name, batch=64, calls=50, device="cpu", threads=torch.get_num_threads())


@pytest.mark.parametrize("method", ["sde", "glass"])
def test_fk_steering_8_particles(benchmark, model, method):
    noise = torch.randn(8, 8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    benchmark(fk_steering, model, digit_reward(3), noise, method=method, generator=gen)
    benchmark.extra_info.update(proposal=method, groups=8, particles=8, calls=50, device="cpu")


if __name__ == "__main__":
    from glass_fast.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
