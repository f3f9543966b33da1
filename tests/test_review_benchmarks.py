"""The pytest-benchmark suite (benchmarks/bench_*.py) as tests: stable names, every timed result checked against
the reference (a fast wrong kernel must fail, not win), the provider recorded as the one that ran, README's
accuracy methods all measured, GPU-only modes refused with a reason on CPU.

Benchmark bodies are called here with pytest-benchmark's own fixture, which pytest.ini disables: each body then
runs once, as a test.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import glass_fast as gf
from glass_fast import accuracy, ops
from glass_fast.ops import _backend

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_accuracy  # noqa: E402
import bench_digits  # noqa: E402
import bench_ops  # noqa: E402
import bench_overhead  # noqa: E402
import bench_steering  # noqa: E402

MODULES = ["bench_ops", "bench_overhead", "bench_steering", "bench_digits", "bench_accuracy"]
CPP = _backend.unavailable_reason("cpp", "cpu")
needs_cpp = pytest.mark.skipif(CPP is not None, reason=f"cpp backend: {CPP}")
# A body whose check fails before its timed call leaves the fixture unused, as intended.
unused_fixture = pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")


def _wrong_on_compiled_backends(monkeypatch):
    """A fused step that is wrong by 1% on every backend but the reference: a fast wrong kernel."""
    real = ops.fused_step_on

    def wrong(backend, base, out, coef, *rest, **kw):
        new, y = real(backend, base, out, coef, *rest, **kw)
        return (new, y) if backend == "reference" else (new * 1.01, y * 1.01)

    monkeypatch.setattr(ops, "fused_step_on", wrong)


def test_benchmark_names_are_stable():
    """--benchmark-compare matches runs by name: the ids below are what earlier runs were saved under."""
    files = [f"benchmarks/{m}.py" for m in MODULES]
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *files], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ids = set(re.findall(r"^(benchmarks/\S+::\S+)$", res.stdout, flags=re.M))
    expected = {f"benchmarks/bench_ops.py::test_{op}[{p}-{d}]"
                for op in ("fused_glass_euler_step", "gather_particles", "resample_indices")
                for p, d in [("reference", "cpu"), ("compile", "cpu"), ("cpp", "cpu"), ("reference", "cuda"),
                             ("compile", "cuda"), ("triton", "cuda"), ("cuda", "cuda")]}
    expected |= {f"benchmarks/bench_overhead.py::test_overhead[{p}]"
                 for p in ("forward", "sample", "sample-compiled", "sample-tiny")}
    expected |= {f"benchmarks/bench_steering.py::test_steering_methods[{m}]"
                 for m in ("BoN-GLASS", "BoN-ODE", "BoN-SDE", "FKS-SDE", "FKS-GLASS")}
    expected |= {f"benchmarks/bench_digits.py::test_sample_50_calls[{n}]" for n in bench_digits.CONFIGS}
    expected |= {f"benchmarks/bench_digits.py::test_fk_steering_8_particles[{m}]" for m in ("sde", "glass")}
    expected |= {f"benchmarks/bench_accuracy.py::test_transition_accuracy[{m}]" for m in accuracy.METHODS}
    assert expected <= ids, sorted(expected - ids)


# ------------------------------------------------------------------------------------------- bench_ops
@needs_cpp
@pytest.mark.parametrize("op", ["fused_step", "gather_particles", "resample_indices"])
def test_ops_benchmarks_reject_a_wrong_kernel(benchmark, monkeypatch, op):
    real = getattr(ops, op)
    if op == "fused_step":
        monkeypatch.setattr(ops, op, lambda *a, **k: tuple(t * 1.01 for t in real(*a, **k)))
    elif op == "gather_particles":
        monkeypatch.setattr(ops, op, lambda x, idx: real(x, idx.flip(-1)))
    else:  # one ancestor off by one in one group: far from any float32 rounding of the CDF
        def shifted(lw, u, scheme):
            idx = real(lw, u, scheme).clone()
            idx[0, 0] = (idx[0, 0] + 1) % idx.shape[1]
            return idx
        monkeypatch.setattr(ops, op, shifted)
    body = {"fused_step": bench_ops.test_fused_glass_euler_step, "gather_particles": bench_ops.test_gather_particles,
            "resample_indices": bench_ops.test_resample_indices}[op]
    with pytest.raises(AssertionError):
        body(benchmark, "cpp", "cpu")


@pytest.mark.parametrize("provider", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_ops_resample_benchmark_passes_the_real_kernels(benchmark, provider):
    """Seed 2 puts one cpp position on a float32 CDF boundary: allowed, and only there."""
    bench_ops.test_resample_indices(benchmark, provider, "cpu")


def test_ops_ancestor_check_allows_only_boundary_ties():
    g = torch.Generator().manual_seed(2)
    lw, u = 3 * torch.randn((4, 16), generator=g), torch.rand((4, 16), generator=g)
    idx = ops.reference.resample_indices(lw, u, "systematic")
    bench_ops._check_ancestors(idx, lw, u, "systematic", "reference")
    # A systematic position placed on the boundary cdf[0, 3] may pick ancestor 3 or 4.
    cdf = torch.cumsum(torch.softmax(lw.double(), -1), -1)
    slot = int(16 * cdf[0, 3])
    u_tie = u.clone()
    u_tie[0, 0] = float(16 * cdf[0, 3] - slot)
    tie = ops.reference.resample_indices(lw, u_tie, "systematic")
    assert int(tie[0, slot]) in (3, 4)
    moved = tie.clone()
    moved[0, slot] = 7 - int(tie[0, slot])
    bench_ops._check_ancestors(moved, lw, u_tie, "systematic", "tied")
    wrong = idx.clone()
    wrong[1, 5] = (wrong[1, 5] + 1) % 16
    with pytest.raises(AssertionError, match="group 1 slot 5"):
        bench_ops._check_ancestors(wrong, lw, u, "systematic", "wrong")


# -------------------------------------------------------------------------------------- bench_steering
@pytest.mark.parametrize("backend", [None, "reference"])
def test_steering_benchmark_names_the_backend_it_ran(benchmark, backend):
    with ops.use_backend(backend):
        bench_steering.test_steering_methods(benchmark, "BoN-GLASS")
        assert benchmark.extra_info["provider"] == ops.resolve_backend("cpu")
    assert benchmark.extra_info["threads"] == torch.get_num_threads()


def test_steering_benchmark_rejects_an_untilted_fk_run(benchmark, monkeypatch):
    real = bench_steering.fk_steering
    monkeypatch.setattr(bench_steering, "fk_steering", lambda *a, **k: real(*a, **{**k, "lmbda": 0.0}))
    with pytest.raises(AssertionError, match="mean reward"):
        bench_steering.test_steering_methods(benchmark, "FKS-GLASS")


def test_steering_check_rejects_a_best_of_n_that_is_not_the_best():
    row = dict(method="BoN-GLASS", calls=400, reward=1.9, best=2.2)
    with pytest.raises(AssertionError, match="mean best reward"):
        bench_steering.check_row(row, 200)


def test_reward_moments_are_those_of_exact_samples():
    mean, sd = bench_steering.reward_moments()
    n = 200_000
    z = bench_steering.MIXTURE.tilted(bench_steering.LMBDA * bench_steering.B_VEC).sample(
        n, torch.Generator().manual_seed(0))
    r = z @ bench_steering.B_VEC
    assert abs(float(r.mean()) - mean) < 5 * sd / n ** 0.5
    assert abs(float(r.std()) - sd) < 5 * sd / (2 * n) ** 0.5  # standard error of a standard deviation


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_steering_gpu_check_without_cuda_is_a_usage_error():
    res = subprocess.run([sys.executable, "benchmarks/bench_steering.py", "--gpu-check"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "--gpu-check needs a CUDA device" in res.stderr


# ------------------------------------------------------------------------------- bench_overhead, digits
@needs_cpp
@unused_fixture
def test_overhead_benchmark_rejects_a_wrong_step(benchmark, monkeypatch):
    _wrong_on_compiled_backends(monkeypatch)
    with pytest.raises(AssertionError):
        bench_overhead.test_overhead(benchmark, "sample")


def test_overhead_benchmark_records_backend_and_threads(benchmark):
    bench_overhead.test_overhead(benchmark, "sample-tiny")
    assert benchmark.extra_info["backend"] == ops.resolve_backend("cpu")
    assert benchmark.extra_info["threads"] == torch.get_num_threads()


@needs_cpp
@unused_fixture
@pytest.mark.parametrize("body", ["sample", "fk"])
def test_digits_benchmarks_reject_a_wrong_step(benchmark, monkeypatch, body):
    model = gf.zoo.digits_flow_model()
    _wrong_on_compiled_backends(monkeypatch)
    with pytest.raises(AssertionError):
        if body == "sample":
            bench_digits.test_sample_50_calls(benchmark, model, "glass-0.4")
        else:
            bench_digits.test_fk_steering_8_particles(benchmark, model, "glass")


# ------------------------------------------------------------------------------------- bench_accuracy
def test_accuracy_benchmark_covers_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Accuracy per model call", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| ((?:glass-|sde)[\w-]*) \|", section, flags=re.M))
    assert rows == {"glass-euler", "glass-midpoint", "glass-heun", "sde"}
    params = set(next(m.args[1] for m in bench_accuracy.test_transition_accuracy.pytestmark
                      if m.name == "parametrize"))
    assert rows <= params, sorted(rows - params)


def test_accuracy_benchmark_rejects_a_wrong_transition(benchmark, monkeypatch):
    real = accuracy.glass_transition
    # GLASS transitions of another rho than the law they are compared with
    monkeypatch.setattr(accuracy, "glass_transition", lambda *a, **k: real(*a, **{**k, "rho": 0.9}))
    with pytest.raises(AssertionError, match="at 32 calls"):
        bench_accuracy.test_transition_accuracy(benchmark, "glass-midpoint")


# ---------------------------------------------------------------------------------------- whole suite
@pytest.mark.slow
def test_every_benchmark_body_runs_once_on_cpu():
    """Each module as documented, benchmarks disabled (one run per body); GPU providers skip with a reason."""
    for module in MODULES:
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "--benchmark-disable",
                              f"benchmarks/{module}.py"], capture_output=True, text=True, cwd=ROOT, timeout=900)
        assert res.returncode == 0, res.stdout[-4000:]
        skips = re.findall(r"^SKIPPED .*$", res.stdout, flags=re.M)
        assert all("cuda" in s for s in skips), skips
