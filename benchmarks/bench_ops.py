"""pytest-benchmark of the fused sampler step and the particle ops, per provider.

    python -m pytest benchmarks/bench_ops.py --benchmark-enable --benchmark-group-by=group
    OMP_NUM_THREADS=2 python -m pytest benchmarks/bench_ops.py --benchmark-enable -k cpu   # README's 2 cores

pytest.ini disables benchmarks (each body then runs once, as a test): every bench_*.py module needs
``--benchmark-enable`` to time, also with ``--benchmark-only``.

Providers: ``reference`` (eager plain PyTorch), ``compile`` (torch.compile of the reference),
``cpp`` (C++ CPU kernels), ``triton`` and ``cuda`` (GPU only). Each group holds one op at one shape;
pytest-benchmark's table gives every provider's time relative to the fastest in its group, and
``extra_info`` records shape, dtype, device, provider, torch threads and commit. Every provider's result
is checked against the reference on the same inputs, so a fast wrong kernel fails instead of winning. All
providers of a run share one thread count (``torch.set_num_threads``; the C++ kernels use ATen's pool).
"""
from __future__ import annotations

import functools
import subprocess

import pytest
import torch

from glass_fast import ops
from glass_fast.ops import reference as R

CPU_NUMEL = 4 * 2 ** 20  # the fused GLASS Euler step at 4M float32 elements
GPU_NUMEL = 64 * 2 ** 20


@functools.lru_cache(None)
def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _providers(device: str):
    names = ["reference", "compile"] + (["cpp"] if device == "cpu" else ["triton", "cuda"])
    params = []
    for name in names:
        why = None
        if device == "cuda" and not torch.cuda.is_available():
            why = "no CUDA device"
        elif name in ("cpp", "triton", "cuda"):
            why = ops._backend.unavailable_reason(name, device)
        marks = [pytest.mark.skip(reason=f"{name} on {device}: {why}")] if why else []
        params.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    return params


PROVIDERS = _providers("cpu") + _providers("cuda")


def _run(provider: str, ref_fn, op_fn):
    """The callable to time for ``provider``: eager reference, compiled reference, or the op."""
    if provider == "reference":
        return ref_fn
    if provider == "compile":
        compiled = torch.compile(ref_fn, fullgraph=True)
        compiled()  # compile outside the timed region
        return compiled

    def run():
        with ops.use_backend(provider):
            return op_fn()
    return run


def _sync(device):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _bench(benchmark, fn, device):
    sync = _sync(device)

    def timed():
        out = fn()
        sync()
        return out

    timed()  # warm-up: first-call kernel loading and allocator growth
    return benchmark.pedantic(timed, rounds=30, warmup_rounds=2)


@pytest.mark.parametrize("provider,device", PROVIDERS)
def test_fused_glass_euler_step(benchmark, provider, device):
    """new = base + h*(w1 base + w2 out + w3 x_t) folded into coef; y = c_x x_t + c_b new."""
    numel = CPU_NUMEL if device == "cpu" else GPU_NUMEL
    g = torch.Generator().manual_seed(0)
    shape = (16, numel // 16)
    base, out, xt = (torch.randn(shape, generator=g).to(device) for _ in range(3))
    coef = torch.tensor([0.98, 0.0, 0.01, 0.05, 0.3, 0.7], device=device)
    benchmark.group = f"fused_step glass-euler {device} {numel} fp32"
    benchmark.extra_info.update(op="fused_step", provider=provider, shape=list(shape),
                                dtype="float32", device=device, commit=_commit(),
                                threads=torch.get_num_threads(), bytes=5 * numel * 4)
    fn = _run(provider, lambda: R.fused_step(base, out, coef, xt),
              lambda: ops.fused_step(base, out, coef, x_t=xt))
    new, y = _bench(benchmark, fn, device)
    ref_new, ref_y = R.fused_step(base, out, coef, xt)
    torch.testing.assert_close(new, ref_new)
    torch.testing.assert_close(y, ref_y)


@pytest.mark.parametrize("provider,device", PROVIDERS)
def test_gather_particles(benchmark, provider, device):
    b, k = 8, 64
    d = (CPU_NUMEL if device == "cpu" else GPU_NUMEL) // (b * k)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((b, k, d), generator=g).to(device)
    idx = torch.randint(0, k, (b, k), generator=g).to(device)
    benchmark.group = f"gather_particles {device} {x.numel()} fp32"
    benchmark.extra_info.update(op="gather_particles", provider=provider, shape=[b, k, d],
                                dtype="float32", device=device, commit=_commit(),
                                threads=torch.get_num_threads(), bytes=2 * x.numel() * 4)
    fn = _run(provider, lambda: R.gather_particles(x, idx), lambda: ops.gather_particles(x, idx))
    assert torch.equal(_bench(benchmark, fn, device), R.gather_particles(x, idx))


@pytest.mark.parametrize("provider,device", PROVIDERS)
def test_resample_indices(benchmark, provider, device):
    b, k = 64, 256
    g = torch.Generator().manual_seed(2)
    lw, u = (3 * torch.randn((b, k), generator=g)).to(device), torch.rand((b, k), generator=g).to(device)
    benchmark.group = f"resample_indices systematic {device} B={b} K={k}"
    benchmark.extra_info.update(op="resample_indices", provider=provider, shape=[b, k],
                                dtype="float32", device=device, commit=_commit(), threads=torch.get_num_threads())
    fn = _run(provider, lambda: R.resample_indices(lw, u, "systematic"),
              lambda: ops.resample_indices(lw, u, "systematic"))
    got = _bench(benchmark, fn, device)
    _check_ancestors(got.cpu(), lw.cpu(), u.cpu(), "systematic", provider)


def _check_ancestors(got, lw, u, scheme, provider):
    """Ancestors equal the reference's, except where a position lies on a CDF boundary within float32 rounding.

    The float32 cumulative sums of the backends add in different orders, so a position within about K float32
    epsilons of a boundary may pick the neighbouring ancestor (seed 2: one slot of 16384 on cpp); any other
    difference is a wrong result.
    """
    want = R.resample_indices(lw, u, scheme)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype)
    rows, cols = torch.nonzero(got != want, as_tuple=True)
    cdf = torch.cumsum(torch.softmax(lw.double(), -1), -1)
    pos = R.resampling_positions(u.double(), scheme)
    tol = lw.shape[-1] * torch.finfo(torch.float32).eps
    for b, j in zip(rows.tolist(), cols.tolist()):
        lo, hi = sorted((int(got[b, j]), int(want[b, j])))
        gap = float((cdf[b, lo:hi] - pos[b, j]).abs().min())  # the boundaries between the two ancestors
        assert gap <= tol, (f"{provider}: group {b} slot {j}: ancestor {int(got[b, j])}, reference "
                            f"{int(want[b, j])}, position {float(pos[b, j]):.8f} is {gap:.2e} from a boundary")
