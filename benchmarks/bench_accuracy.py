"""Accuracy per model call of GLASS solvers and the SDE (KS distance to the exact transition).

    python benchmarks/bench_accuracy.py            # prints the markdown table (n = 20,000)
    pytest benchmarks/bench_accuracy.py --benchmark-enable
"""
import argparse

import pytest
import torch

from glass_fast.accuracy import METHODS, accuracy_table, format_table, transition_ks
from glass_fast.mixtures import ks_critical

N, TRANSITIONS, K = 20000, 5, 2
# Interior transition k of the README table's 5-transition grid, with the seed accuracy_table gives it (seed 0:
# k): each row is one of the transitions whose worst KS the table's "8 calls" column reports.
GRID = torch.linspace(0, 1, TRANSITIONS + 1).tolist()


@pytest.mark.parametrize("method", METHODS)
def test_transition_accuracy(benchmark, method):
    args = (GRID[K], GRID[K + 1])
    benchmark.group = f"transition accuracy, 8 calls, t = {args[0]:.1f} -> {args[1]:.1f}, n = {N}"
    ks = benchmark.pedantic(transition_ks, args=(method, 8, *args), kwargs=dict(n=N, seed=K), rounds=1,
                            iterations=1)
    # Correctness of the timed code: with 32 calls every method's transition is within the 0.1% critical value
    # of the exact law (README table); a wrong kernel or law lands far above it.
    ks_32 = transition_ks(method, 32, *args, n=N, seed=K)
    assert ks_32 < ks_critical(N, 0.001), f"{method}: KS {ks_32:.4f} at 32 calls >= {ks_critical(N, 0.001):.4f}"
    benchmark.extra_info.update(method=method, calls=8, ks=ks, ks_32_calls=ks_32, t=args[0], t_next=args[1],
                                n=N, device="cpu")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Accuracy per model call: KS to the exact transition.")
    parser.add_argument("n", nargs="?", type=int, default=20000, help="samples per KS estimate (default: 20000)")
    print(format_table(accuracy_table(n=parser.parse_args().n)))
