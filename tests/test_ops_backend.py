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


def test_explicit_backend_on_the_wrong_device_type_raises():
    lw = torch.zeros(2, 3, device="meta")
    for name, why in (("cpp", "the cpp backend runs on cpu tensors only; got device type 'meta'"),
                      ("cuda", "the cuda backend runs on cuda tensors only; got device type 'meta'")):
        with ops.use_backend(name), pytest.raises(ops.BackendUnavailableError, match=why):
            ops.normalize_log_weights(lw)
    with ops.use_backend("auto"):
        assert ops.resolve_backend("meta") == "reference"


@needs_cpp
def test_cuda_device_type_choices_without_cuda_kernels(monkeypatch):
    """What CUDA tensors would get from an extension built without CUDA (decided from the device type
    alone, so checkable here): an explicit cuda raises; auto falls back to triton, then reference."""
    if _backend.unavailable_reason("cuda", "cuda") is None:
        pytest.skip("this extension has CUDA kernels")
    monkeypatch.setattr(_backend, "_logged", set())
    with ops.use_backend("cuda"), pytest.raises(ops.BackendUnavailableError,
                                                 match="built without CUDA kernels.*rebuild on a CUDA machine"):
        ops.resolve_backend("cuda")
    with ops.use_backend("auto"):
        want = "triton" if _backend._triton_status()[0] else "reference"
        assert ops.resolve_backend("cuda") == want
        monkeypatch.setattr(_backend, "_triton", (False, "pretend: triton is not installed"))
        assert ops.resolve_backend("cuda") == "reference"
    with ops.use_backend("triton"), pytest.raises(ops.BackendUnavailableError,
                                                   match="backend 'triton' .*cannot run: pretend: triton"):
        ops.resolve_backend("cuda")


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
    h, empty = x.half(), r(0, 4)
    return {
        "fused_step": [(x, out, r(3, 6), x.clone(), None), (x, x.clone(), r(6), None, r(3, 4, 5)),
                       (h, x.clone(), r(3, 6).double(), h.clone(), h.clone()),  # fp16 state, fp32 out
                       (x.double(), out, r(6), None, None), (empty, empty.clone(), r(6), None, None)],
        "fused_step_": [(x.clone(), out, r(6), x.clone(), x.clone(), out.clone()),
                        (h.clone(), x.clone(), r(3, 6).double(), None, None, x.clone())],
        # (no all -inf group: its NaN outputs never compare equal in opcheck)
        "normalize_log_weights": [(lw,), (lw.double(),),
                                  (torch.tensor([[0.0, -float("inf"), 1.0], [-float("inf")] * 2 + [2.0]],
                                                device=device),)],
        "resample_indices": [(lw, u, s) for s in ("multinomial", "stratified", "systematic",
                                                  "residual")],
        "gather_particles": [(parts, idx), (parts.bfloat16(), idx)],
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


@pytest.mark.parametrize("backend,device", [p for p in PAIRS if p.values[1] == "cpu"]
                         + [pytest.param("reference", "cpu", id="reference-cpu")])
def test_compile_fullgraph_full_glass_transition(backend, device):
    """A whole GLASS transition (noise injection, then midpoint predict / correct stages, each a model call
    and a fused step with per-sample coefficients) traces into one graph on every CPU backend."""
    import glass_fast as gf
    from glass_fast import transitions as T
    from glass_fast.plan import glass_plan
    data = gf.GaussianMixture(means=[[2.0, 0.0], [-2.0, 0.0]], stds=[0.5, 0.5], weights=[0.5, 0.5])
    model = data.flow_model(gf.LinearSchedule(), prediction="velocity")
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    t, t_next = T._interval(x, torch.linspace(0.1, 0.3, 6), torch.linspace(0.4, 0.6, 6))
    plan = glass_plan(model, t, t_next, T.resolve_rho(0.4, model.schedule, t, t_next), 4, "midpoint")
    dplan = T.DevicePlan(plan, x.device, x.dtype)
    assert dplan.coefs.shape[1:] == (6, ops.NUM_COEFS) and "correct" in dplan.kinds
    noise = T.draw_noise(dplan, x, torch.Generator().manual_seed(1))

    def transition(x, noise):
        return T.execute(model, dplan, x, noise)

    torch._dynamo.reset()
    with ops.use_backend(backend):
        expected, finite = transition(x, noise)
        got, got_finite = torch.compile(transition, fullgraph=True, backend="aot_eager")(x, noise)
    assert finite.all() and torch.equal(got_finite, finite)
    torch.testing.assert_close(got, expected)
    with ops.use_backend("reference"):
        torch.testing.assert_close(got, transition(x, noise)[0], rtol=1e-5, atol=1e-5)


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


# ------------------------------------------------------------------ argument checks, public and raw


def _bad_calls():
    """(op name, args, message pattern) that the public ops and the raw C++ ops both refuse."""
    x, c6, i = torch.randn(3, 4), torch.zeros(6), torch.zeros(2, 3, dtype=torch.long)
    lw, u, parts = torch.zeros(2, 3), torch.rand(2, 3), torch.randn(2, 3, 4)
    return [
        ("fused_step", (x, x, torch.zeros(5), None, None), r"coef has shape .*allowed: \[6\] or \[B, 6\] with B = 3"),
        ("fused_step", (x, x, torch.zeros(3, 5), None, None), r"coef has shape .*allowed: \[6\] or \[B, 6\]"),
        ("fused_step", (x, x, c6.long(), None, None), r"coef has dtype (torch\.int64|Long); allowed: float32, float64"),
        ("fused_step", (x.long(), x, c6, None, None), r"base has dtype (torch\.int64|Long); allowed: float32"),
        ("fused_step", (x, x.int(), c6, None, None), r"out has dtype (torch\.int32|Int); allowed: float32"),
        ("fused_step", (x, torch.randn(3, 5), c6, None, None), "out has shape .* but base has shape"),
        ("fused_step", (x, x, c6, x.half(), None), r"x_t has dtype (torch\.float16|Half) but base has dtype"),
        ("fused_step", (x, x, c6, None, torch.randn(4, 3)), "stage has shape .* but base has shape"),
        ("fused_step_", (x.clone(), x, c6, None, None, x.half()), "y_out has dtype .* but out has dtype"),
        ("fused_step_", (x.clone(), x, c6, None, None, torch.empty(4, 3)), "y_out has shape .* but base has shape"),
        ("normalize_log_weights", (torch.zeros(6),), r"log_w has shape .*; allowed: \[B, K\] with K >= 1"),
        ("normalize_log_weights", (torch.zeros(2, 0),), r"log_w has shape .*; allowed: \[B, K\] with K >= 1"),
        ("normalize_log_weights", (lw.long(),), r"log_w has dtype (torch\.int64|Long); allowed"),
        ("resample_indices", (lw, torch.rand(2, 4), "multinomial"), "uniforms has shape .* but log_w has shape"),
        ("resample_indices", (lw, u.long(), "systematic"), r"uniforms has dtype (torch\.int64|Long); allowed"),
        ("resample_indices", (lw, u, "bogus"), "scheme='bogus' is not a resampling scheme; allowed: multinomial"),
        ("gather_particles", (parts, i.int()), r"idx has dtype (torch\.int32|Int); allowed: (torch\.)?int64"),
        ("gather_particles", (parts, torch.zeros(3, 2, dtype=torch.long)), r"idx has shape .* idx must be \[B, K\]"),
        ("gather_particles", (torch.randn(4), i), r"x has shape .*; allowed: \[B, K, \.\.\.\]"),
        ("gather_particles_", (parts.clone(), i, torch.empty(2, 3)), "scratch has (shape|dtype)"),
        ("gather_particles_", (parts.clone(), i, parts.double()), "scratch has (shape|dtype)"),
    ]


@pytest.mark.parametrize("backend", ["reference"] + CPU_COMPILED)
@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_public_and_raw_ops_refuse_the_same_arguments(backend, case):
    """Every backend refuses a bad call at the public boundary with a message naming the argument, the
    value and what is allowed; the C++ and Triton ops, called directly through torch.ops, refuse it with
    the same exception and message."""
    name, args, pattern = _bad_calls()[case]
    with ops.use_backend(backend), pytest.raises((TypeError, ValueError), match=pattern) as public:
        getattr(ops, name)(*args)
    if backend in ("cpp", "triton"):  # the raw ops check too (no wrong rows, no out-of-bounds access)
        with pytest.raises(public.type) as raw:
            _library.op(backend, name)(*args)
        assert str(raw.value).splitlines()[0] == str(public.value), "raw and public messages differ"


# ------------------------------------------------------------------ autograd


def _differentiable_calls():
    """(op name, args, index of the argument that requires grad) for the ops with float outputs."""
    g = torch.Generator().manual_seed(2)
    r = (lambda *s: torch.randn(*s, generator=g))
    x, coef, lw = r(3, 4), r(3, 6), r(3, 5)
    idx = torch.randint(0, 5, (3, 5), generator=g)
    return [("fused_step", (x, r(3, 4), coef, x.clone(), None), 1),
            ("fused_step", (x, r(3, 4), coef, x.clone(), None), 0),
            ("normalize_log_weights", (lw,), 0),
            ("gather_particles", (r(3, 5, 2), idx), 0)]


@pytest.mark.parametrize("backend", ["reference"] + CPU_COMPILED)
@pytest.mark.parametrize("case", range(len(_differentiable_calls())))
def test_backward_is_the_references_or_raises(backend, case):
    """An op fed a tensor that requires grad either differentiates like the reference or raises at
    backward; it never hands back a missing or wrong gradient (the compiled ops have no derivative)."""
    name, args, at = _differentiable_calls()[case]

    def grad(backend_name):
        leaf = args[at].clone().requires_grad_(True)
        call = list(args[:at]) + [leaf] + list(args[at + 1:])
        with ops.use_backend(backend_name):
            outs = getattr(ops, name)(*call)
        sum(o.sum() for o in outs if o.dtype.is_floating_point).backward()
        return leaf.grad

    expected = grad("reference")
    assert expected is not None and expected.abs().sum() > 0
    if backend == "reference":
        return
    with pytest.raises(RuntimeError, match=rf"derivative for glass_fast::{name} is not implemented|"
                                           rf"glass_fast_triton\.{name}\.default but no autograd formula"):
        grad(backend)


@pytest.mark.parametrize("backend", ["reference"] + CPU_COMPILED)
def test_in_place_ops_refuse_arguments_that_need_a_gradient(backend):
    """The compiled in-place ops would overwrite a tensor without recording how (its gradient lost
    without a word); they refuse, the reference records it, and under no_grad all run."""
    x, coef = torch.randn(3, 4), torch.randn(6)
    parts, idx = torch.randn(2, 3, 4), torch.tensor([[0, 0, 1], [2, 1, 0]])
    calls = {"fused_step_": lambda out: ops.fused_step_(x.clone(), out, coef),
             "gather_particles_": lambda p: ops.gather_particles_(p.clone(), idx, torch.empty(2, 3, 4))}
    for name, arg in (("fused_step_", torch.randn(3, 4)), ("gather_particles_", parts)):
        with ops.use_backend(backend):
            with torch.no_grad():
                calls[name](arg.clone().requires_grad_(True))
            if backend == "reference":
                calls[name](arg.clone().requires_grad_(True))
                continue
            with pytest.raises(RuntimeError, match=f"{name} on the '{backend}' backend has no derivative"):
                calls[name](arg.clone().requires_grad_(True))
