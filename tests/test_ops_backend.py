"""The backend switch, torch.library registration (opcheck) and torch.compile tracing of the ops."""
import logging
import os

import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from glass_fast import ops  # noqa: E402
from glass_fast.ops import _backend  # noqa: E402
from glass_fast.ops import _library  # noqa: E402
from glass_fast.ops.testing import backend_device_params, backend_devices  # noqa: E402

PAIRS = backend_device_params()
CPU_COMPILED = [b for b, d in backend_devices() if d == "cpu"]
needs_cpp = pytest.mark.skipif("cpp" not in CPU_COMPILED,
                               reason="glass_fast._C (cpp backend) is not built here")


@pytest.fixture
def no_extension(monkeypatch):
    """Pretend glass_fast._C failed to import."""
    monkeypatch.setattr(_backend, "_ext", (False, "pretend: glass_fast._C is not built"))
    monkeypatch.setattr(_backend, "_logged", set())


def test_reference_always_available():
    assert "reference" in ops.available_backends()
    assert "reference" in ops.available_backends("cpu")
    with ops.use_backend("reference"):
        assert ops.resolve_backend("cpu") == "reference"


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "reference")
    assert ops.requested_backend() == "reference"
    assert ops.resolve_backend("cpu") == "reference"
    monkeypatch.setenv(ops.ENV_VAR, "Auto ")
    assert ops.requested_backend() == "auto"
    monkeypatch.setenv(ops.ENV_VAR, "fortran")
    with pytest.raises(ValueError, match="GLASS_FAST_BACKEND='fortran' is not a backend"):
        ops.resolve_backend("cpu")


def test_override_beats_env_and_restores(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "cuda")
    with ops.use_backend("reference"):
        assert ops.resolve_backend("cpu") == "reference"
        with ops.use_backend("auto"):
            assert ops.resolve_backend("cpu") in ("cpp", "reference")
        assert ops.resolve_backend("cpu") == "reference"
    assert ops.requested_backend() == "cuda"
    with pytest.raises(ValueError, match="backend='bogus'"):
        ops.set_backend("bogus")


@needs_cpp
def test_auto_prefers_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    with ops.use_backend(None):
        assert ops.resolve_backend("cpu") == "cpp"


def test_explicit_cuda_on_cpu_tensors_raises():
    x = torch.randn(2, 3)
    with ops.use_backend("cuda"):
        with pytest.raises(ops.BackendUnavailableError, match="backend 'cuda' .*cannot run.*cuda tensors only"):
            ops.fused_step(x, x, torch.zeros(6))


def test_explicit_cpp_without_extension_raises(no_extension):
    with ops.use_backend("cpp"):
        with pytest.raises(ops.BackendUnavailableError, match="backend 'cpp' .*cannot run: pretend"):
            ops.normalize_log_weights(torch.zeros(2, 3))


def test_explicit_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if _backend._triton_status()[0]:
        with ops.use_backend("triton"):
            with pytest.raises(ops.BackendUnavailableError, match="TRITON_INTERPRET=1"):
                ops.resolve_backend("cpu")


def test_auto_falls_back_and_logs_once(no_extension, caplog):
    x = torch.randn(2, 3)
    with ops.use_backend("auto"), caplog.at_level(logging.WARNING, logger="glass_fast.ops"):
        assert ops.resolve_backend("cpu") == "reference"
        new, _ = ops.fused_step(x, x, torch.tensor([1.0, 0, 0, 1.0, 0, 1.0]))
        ops.fused_step(x, x, torch.zeros(6))
    assert torch.allclose(new, 2 * x)
    records = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(records) == 1 and "'cpp'" in records[0].getMessage()


def test_available_backends_lists_built_ones():
    names = ops.available_backends("cpu")
    assert names[-1] == "reference"
    assert ("cpp" in names) == (_backend.unavailable_reason("cpp", "cpu") is None)
    assert "cuda" not in names  # the cuda backend never runs on CPU tensors


def test_triton_cpu_really_runs_the_interpreter():
    if ("triton", "cpu") not in backend_devices():
        pytest.skip("no Triton interpreter run here (CUDA present, triton missing, or imported "
                    "before TRITON_INTERPRET=1)")
    from triton.runtime.interpreter import InterpretedFunction

    from glass_fast.kernels import fused_step, gather, resample
    for kernel in (fused_step._fused_step_kernel, resample._search_kernel, gather._gather_kernel):
        assert isinstance(kernel, InterpretedFunction)


# ------------------------------------------------------------------ torch.library / compile


def _samples(device):
    g = torch.Generator().manual_seed(0)
    r = (lambda *s: torch.randn(*s, generator=g).to(device))
    x, out = r(3, 4, 5), r(3, 4, 5).to(torch.bfloat16)
    lw, u = r(3, 6), torch.rand(3, 6, generator=g).to(device)
    idx = torch.randint(0, 6, (3, 6), generator=g).to(device)
    parts = r(3, 6, 7)
    return {
        "fused_step": [(x, out, r(3, 6), x.clone(), None), (x, x.clone(), r(6), None, r(3, 4, 5))],
        "fused_step_": [(x.clone(), out, r(6), x.clone(), x.clone(), out.clone())],
        "normalize_log_weights": [(lw,)],
        "resample_indices": [(lw, u, s) for s in ("multinomial", "stratified", "systematic",
                                                  "residual")],
        "gather_particles": [(parts, idx)],
        "gather_particles_": [(parts.clone(), idx, torch.empty_like(parts))],
    }


@pytest.mark.parametrize("backend,device", PAIRS)
def test_opcheck_every_op(backend, device):
    ops.resolve_backend(device)  # loads the extension (and its fakes) if needed
    for name, arg_list in _samples(device).items():
        for args in arg_list:
            torch.library.opcheck(_library.op(backend, name).default, args)


def _pipeline(x, out, coef, lw, u, scratch):
    new, y = ops.fused_step(x, out, coef, x_t=x)
    lw_n, ess = ops.normalize_log_weights(lw)
    idx = ops.resample_indices(lw_n, u, "systematic")
    ops.fused_step_(new, out, coef, x_t=x, y_out=y)
    g = ops.gather_particles(new, idx)
    ops.gather_particles_(y, idx, scratch)
    return new, y, g, ess, idx


def _pipeline_args(device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, generator=g).to(device)
    return (x, torch.randn(2, 5, 3, generator=g).to(device), torch.randn(2, 6, generator=g).to(device),
            torch.randn(2, 5, generator=g).to(device), torch.rand(2, 5, generator=g).to(device),
            torch.empty_like(x))


@pytest.mark.parametrize("backend,device",
                         PAIRS + [pytest.param("reference", "cpu", id="reference-cpu")])
def test_compile_fullgraph_traces_every_op(backend, device):
    args = _pipeline_args(device)
    torch._dynamo.reset()
    with ops.use_backend(backend):
        expected = _pipeline(*[a.clone() for a in args])
        compiled = torch.compile(_pipeline, fullgraph=True, backend="aot_eager")
        got = compiled(*[a.clone() for a in args])
    for e, r in zip(expected, got):
        torch.testing.assert_close(r, e)


@needs_cpp
def test_compile_inductor_with_cpp_ops_and_backend_switch_retraces():
    args = _pipeline_args("cpu")
    torch._dynamo.reset()
    compiled = torch.compile(_pipeline, fullgraph=True)
    with ops.use_backend("cpp"):
        got_cpp = compiled(*[a.clone() for a in args])
    with ops.use_backend("reference"):
        expected = _pipeline(*[a.clone() for a in args])
        got_ref = compiled(*[a.clone() for a in args])  # a new backend value must retrace
    for e, a, b in zip(expected, got_cpp, got_ref):
        torch.testing.assert_close(a, e)
        torch.testing.assert_close(b, e)


@pytest.mark.parametrize("backend,device", [p for p in PAIRS if p.values[1] == "cuda"])
def test_cuda_ops_never_sync_the_host(backend, device):
    args = _pipeline_args("cuda")
    with ops.use_backend(backend):
        _pipeline(*[a.clone() for a in args])  # first call: compile / load kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for scheme in ops.RESAMPLING_SCHEMES:
                ops.resample_indices(args[3], args[4], scheme)
            _pipeline(*args)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_triton_cpu_kernels_in_a_fresh_interpreter():
    """When this process imported triton before TRITON_INTERPRET=1 was set (another test module
    imported it first), the in-process Triton CPU tests are not collected; run them in a fresh
    Python instead, so the full suite still checks the Triton kernels against the reference."""
    if ("triton", "cpu") in backend_devices():
        pytest.skip("the Triton CPU tests run in this process")
    if torch.cuda.is_available() or not _backend._triton_status()[0]:
        pytest.skip("Triton runs on CUDA here, or triton is not installed")
    import pathlib
    import subprocess
    import sys
    here = pathlib.Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop(ops.ENV_VAR, None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton",
         str(here / "test_ops.py"), str(here / "test_ops_particles.py")],
        cwd=here.parent, env=env, capture_output=True, text=True, timeout=600)
    tail = "\n".join(proc.stdout.splitlines()[-15:])
    assert proc.returncode == 0, f"Triton CPU tests failed in a fresh interpreter:\n{tail}"
    assert " passed" in tail, tail  # pytest exits 5 (not 0) when nothing was collected
