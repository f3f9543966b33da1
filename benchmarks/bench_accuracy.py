"""Accuracy per model call of GLASS solvers and the SDE (KS distance to the exact transition).

    python benchmarks/bench_accuracy.py            # prints the markdown table (n = 20,000)
    pytest benchmarks/bench_accuracy.py --benchmark-enable
"""
import argparse

import pytest

from glass_fast.accuracy import accuracy_table, format_table, transition_ks


@pytest.mark.parametrize("method", ["glass-euler", "glass-midpoint", "sde"])
def test_transition_accuracy(benchmark, method):
    ks = benchmark.pedantic(transition_ks, args=(method, 8, 0.4, 0.6), kwargs=dict(n=20000), rounds=1, iterations=1)
    benchmark.extra_info.update(method=method, calls=8, ks=ks, device="cpu")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Accuracy per model call: KS to the exact transition.")
    parser.add_argument("n", nargs="?", type=int, default=20000, help="samples per KS estimate (default: 20000)")
    print(format_table(accuracy_table(n=parser.parse_args().n)))
