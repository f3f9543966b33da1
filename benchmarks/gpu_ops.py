"""Bandwidth of the per-element ops on a CUDA device, against a device-to-device copy.

    python benchmarks/gpu_ops.py [--numel 67108864] [--json results.json]

Prints, per op and backend (cuda, triton, reference, torch.compile of the reference), the median
time, the effective bandwidth (bytes read + written / time) and that bandwidth as a percentage of
a plain copy measured in the same run. Then computes resampling indices for B=64, K=256 with
torch.cuda.set_sync_debug_mode("error") on every available backend, which raises on any host sync.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from glass_fast import ops
from glass_fast.ops import reference as R


def time_cuda(fn, warmup: int = 5, iters: int = 20, reps: int = 10) -> float:
    """Median seconds per call of ``fn``: CUDA events around ``reps`` back-to-back calls, so the
    device time is measured with the launch queue ahead of it (the host's per-call overhead hidden
    as it is in a sampler loop)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(times)


def providers(op_name: str, eager_ref, call):
    """(name, fn) pairs for the compiled backends, the reference and torch.compile of it."""
    out = []
    for backend in ("cuda", "triton"):
        if ops._backend.unavailable_reason(backend, "cuda") is None:
            out.append((backend, lambda b=backend: _with_backend(b, call)))
        else:
            print(f"  [{op_name}] {backend}: skipped ({ops._backend.unavailable_reason(backend, 'cuda')})")
    out.append(("reference", eager_ref))
    compiled = torch.compile(eager_ref, fullgraph=True)
    out.append(("compile", compiled))
    return out


def _with_backend(backend, call):
    with ops.use_backend(backend):
        return call()


def bench_fused_step(numel: int, rows: list, per_sample: bool):
    g = torch.Generator(device="cuda").manual_seed(0)
    b = 64
    shape = (b, numel // b)
    base, out, xt = (torch.randn(shape, device="cuda", generator=g) for _ in range(3))
    coef = torch.randn((b, 6) if per_sample else (6,), device="cuda", generator=g)
    bytes_moved = 5 * base.numel() * base.element_size()  # read base, out, x_t; write new, y
    label = f"fused_step glass-euler fp32 {'per-sample' if per_sample else 'shared'} coef"
    ref = (lambda: R.fused_step(base, out, coef, xt))
    expected = R.fused_step(base, out, coef, xt)
    for name, fn in providers(label, ref, lambda: ops.fused_step(base, out, coef, x_t=xt)):
        got = fn()
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
        rows.append((label, name, time_cuda(fn), bytes_moved, tuple(shape)))
    del base, out, xt


def bench_gather(numel: int, rows: list):
    # A permutation reads every source row once (comparable with a copy); resampled ancestors
    # (drawn with replacement) read some rows several times, and repeats can come from L2.
    b, k = 64, 256
    d = numel // (b * k)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn((b, k, d), device="cuda", generator=g)
    patterns = {"permutation": torch.stack([torch.randperm(k, device="cuda", generator=g) for _ in range(b)]),
                "resampled": torch.randint(0, k, (b, k), device="cuda", generator=g).sort(1).values}
    bytes_moved = 2 * x.numel() * x.element_size()
    for pattern, idx in patterns.items():
        label = f"gather_particles fp32 {pattern}"
        ref = (lambda i=idx: R.gather_particles(x, i))
        expected = ref()
        for name, fn in providers(label, ref, lambda i=idx: ops.gather_particles(x, i)):
            assert torch.equal(fn(), expected), name
            rows.append((label, name, time_cuda(fn), bytes_moved, (b, k, d)))
    del x


def check_resample_no_sync() -> list:
    b, k = 64, 256
    g = torch.Generator(device="cuda").manual_seed(2)
    lw = 3 * torch.randn((b, k), device="cuda", generator=g)
    u = torch.rand((b, k), device="cuda", generator=g)
    report = []
    for backend in ["cuda", "triton", "reference"]:
        if ops._backend.unavailable_reason(backend, "cuda") is not None:
            continue
        with ops.use_backend(backend):
            for scheme in ops.RESAMPLING_SCHEMES:  # warm-up (kernel compilation may sync)
                ops.resample_indices(lw, u, scheme)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                got = {s: ops.resample_indices(lw, u, s) for s in ops.RESAMPLING_SCHEMES}
                lw_n, ess = ops.normalize_log_weights(lw)
                t = time_cuda(lambda: ops.resample_indices(lw, u, "systematic"), warmup=1, iters=10, reps=1)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        same = {s: int((got[s] == R.resample_indices(lw, u, s)).sum()) for s in got}
        report.append({"backend": backend, "us_systematic": t * 1e6, "matching_ancestors": same,
                       "of": b * k})
        print(f"  resample B={b} K={k} {backend:9s}: no host sync; systematic {t * 1e6:7.1f} us; "
              f"ancestors equal to reference: {same} of {b * k}")
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=64 * 2 ** 20)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA device"
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}; backends: {ops.available_backends()}")

    src = torch.randn(args.numel, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(500):  # about 70 ms of copies first, so clocks have settled before anything is timed
        dst.copy_(src)
    t_copy = time_cuda(lambda: dst.copy_(src))
    copy_bw = 2 * src.numel() * src.element_size() / t_copy
    del src, dst
    rows = []
    bench_fused_step(args.numel, rows, per_sample=False)
    bench_fused_step(args.numel, rows, per_sample=True)
    bench_gather(args.numel, rows)

    print(f"\ncopy (d2d, {args.numel} fp32): {t_copy * 1e3:.3f} ms, {copy_bw / 1e9:.0f} GB/s\n")
    print(f"{'op':48s} {'backend':10s} {'ms':>8s} {'GB/s':>8s} {'% copy':>7s}")
    results = []
    for label, name, t, nbytes, shape in rows:
        bw = nbytes / t
        print(f"{label:48s} {name:10s} {t * 1e3:8.3f} {bw / 1e9:8.0f} {100 * bw / copy_bw:6.1f}%")
        results.append({"op": label, "backend": name, "ms": t * 1e3, "GBps": bw / 1e9,
                        "pct_copy": 100 * bw / copy_bw, "shape": shape})
    print()
    resample = check_resample_no_sync()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "torch": torch.__version__, "copy_GBps": copy_bw / 1e9,
                       "ops": results, "resample": resample}, f, indent=1)


if __name__ == "__main__":
    main()
