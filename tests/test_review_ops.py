"""Edge cases of the op layer on every backend: in-place outputs sharing memory with inputs (write order,
idx overlapping scratch or x), channels_last, non-finite entries, single-particle and huge groups,
uniforms at the ends of [0, 1), gradient refusals that name the argument, and the backend switch."""
import math
import os
import re

import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from glass_fast import ops  # noqa: E402
from glass_fast.ops import reference as R  # noqa: E402
from glass_fast.ops.testing import (backend_device_params, backend_devices, interpreted,  # noqa: E402
                                    triton_interpreter_active)

PAIRS = backend_device_params()
WITH_REFERENCE = PAIRS + [pytest.param("reference", "cpu", id="reference-cpu")]
CPU_BACKENDS = ["reference"] + [b for b, d in backend_devices() if d == "cpu"]
SCHEMES = list(R.RESAMPLING_SCHEMES)
# Invalid groups reduce NaN rows by design; Triton's CPU interpreter reports those through numpy.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")]
INF, NAN = math.inf, math.nan


# ------------------------------------------------------------------ fused_step_ write order


def _storage_cases(device):
    """name -> setup(work) giving (base, out, y_out) views of one flat buffer `work` of 16 elements.

    base is strided (copied back after the kernel) and y_out contiguous: where they overlap, the
    documented order (new into base, then y_next into y_out) leaves y_next."""
    return {
        "strided base overlaps y_out": lambda w: (w[0:16:2], torch.linspace(-1, 1, 8, device=device),
                                                  w[0:8]),
        "strided base overlaps out, y_out is out": lambda w: (w[0:16:2], w[0:8], w[0:8]),
        "strided base overlaps y_out shifted from out": lambda w: (w[1:16:2], w[2:10], w[0:8]),
    }


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_fused_step_in_place_strided_base_overlapping_y_out_ends_with_y_next(backend, device):
    """Outputs may share memory with inputs in any way: the result is that of computing new and y_next
    first, then writing new into base and y_next into y_out. A strided base is written back after the
    kernel; y_next written directly into an overlapping y_out was then overwritten by new."""
    coef = torch.tensor([2.0, 0.0, 0.0, 1.0, 0.0, 3.0], device=device)
    for name, setup in _storage_cases(device).items():
        want = torch.arange(16.0, device=device)
        base, out, y_out = setup(want)
        new, y = R.fused_step(base.clone(), out.clone(), coef)
        base.copy_(new)
        y_out.copy_(y)
        got = torch.arange(16.0, device=device)
        base, out, y_out = setup(got)
        with ops.use_backend(backend):
            ops.fused_step_(base, out, coef, y_out=y_out)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_fused_step_in_place_with_x_t_and_stage_aliasing_base(backend, device):
    """x_t and stage may be base itself (and out): every element is read before base is written."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, generator=g).to(device)
    coef = torch.randn(3, 6, generator=g, dtype=torch.float64).to(device)
    new, y = R.fused_step(x, x, coef, x, x)
    with ops.use_backend(backend):
        base = x.clone()
        got_y = ops.fused_step_(base, base, coef, base, base)
    torch.testing.assert_close(base, new, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_y, y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_fused_step_non_finite_entries_follow_the_formula(backend, device):
    """NaN and +-inf propagate as in the reference's formula: a zero coefficient times inf is NaN (no
    term is skipped for a zero coefficient), on both outputs and in place."""
    x = torch.tensor([[NAN, INF, -INF, 1.0, 0.0, -2.0]], device=device)
    for coef in ([1.0, 0.5, -1.0, 0.5, 0.25, 2.0], [0.0] * 6, [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]):
        coef = torch.tensor(coef, device=device)
        args = (x, x.flip(-1), coef, x.roll(1, -1), x.roll(2, -1))
        want = R.fused_step(*args)
        with ops.use_backend(backend):
            got = ops.fused_step(*args)
            base = x.clone()
            y = ops.fused_step_(base, *args[1:])
        for g, w in ((got[0], want[0]), (got[1], want[1]), (base, want[0]), (y, want[1])):
            torch.testing.assert_close(g, w, equal_nan=True, rtol=0, atol=0, msg=str(coef.tolist()))


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_in_place_ops_write_channels_last_tensors_in_their_layout(backend, device):
    """channels_last base, y_out and x (dense but not contiguous) get the reference's values and keep
    their strides."""
    g = torch.Generator().manual_seed(8)
    cl = (lambda *s: torch.randn(*s, generator=g).to(device).to(memory_format=torch.channels_last))
    base, out, x_t = cl(2, 3, 4, 5), cl(2, 3, 4, 5), cl(2, 3, 4, 5)
    coef = torch.randn(2, 6, generator=g).to(device)
    new, y = R.fused_step(base, out, coef, x_t)
    parts, idx = cl(2, 3, 4, 5), torch.tensor([[2, 0, 0], [1, 1, 2]], device=device)
    want = R.gather_particles(parts, idx)
    with ops.use_backend(backend):
        b, y_out, p = base.clone(), torch.empty_like(out), parts.clone()
        ops.fused_step_(b, out, coef, x_t, y_out=y_out)
        ops.gather_particles_(p, idx, torch.empty_like(p))
    for got, ref in ((b, base), (y_out, out), (p, parts)):
        assert got.stride() == ref.stride()
    torch.testing.assert_close(b, new, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y_out, y, rtol=1e-6, atol=1e-6)
    assert torch.equal(p, want)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
def test_in_place_ops_name_the_argument_that_requires_grad(backend):
    x, coef = torch.randn(3, 4), torch.randn(6)
    parts, idx = torch.randn(2, 3, 4), torch.tensor([[0, 0, 1], [2, 1, 0]])
    with ops.use_backend(backend):
        with pytest.raises(RuntimeError, match=rf"fused_step_ on the '{backend}' backend has no derivative, "
                                               r"but coef has requires_grad=True; .* detach coef"):
            ops.fused_step_(x.clone(), x, coef.requires_grad_(True))
        with pytest.raises(RuntimeError, match=r"but x_t, y_out have requires_grad=True"):
            ops.fused_step_(x.clone(), x, coef.detach(), x.clone().requires_grad_(True),
                            y_out=torch.empty(3, 4, requires_grad=True))
        with pytest.raises(RuntimeError, match=r"gather_particles_ on .* but scratch has requires_grad=True"):
            ops.gather_particles_(parts.clone(), idx, torch.empty(2, 3, 4, requires_grad=True))


# ------------------------------------------------------------------ gather_particles_ scratch


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_gather_in_place_with_idx_sharing_memory_with_scratch_or_x(backend, device):
    """scratch is clobbered, but idx must be read as it was at the call: staging x into a scratch that
    is idx itself overwrote the ancestors (a wrong gather, an out-of-bounds read or a spurious
    out-of-range error), and so did gathering into an x that overlaps idx."""
    for x0 in ([[5, 6, 7], [1, 0, 2]], [[0, 1, 2], [2, 2, 2]]):
        x = torch.tensor(x0, device=device)
        idx = torch.tensor([[2, 2, 0], [1, 0, 0]], device=device)
        want = R.gather_particles(x, idx)
        with ops.use_backend(backend):
            ops.gather_particles_(x, idx, idx)
        assert torch.equal(x, want), ("scratch is idx", x0, x.tolist(), want.tolist())
    # idx = buf[0:4] and x = buf[1:5]: writing x[k] changes idx[k + 1] before it is read
    buf = torch.tensor([1, 2, 0, 3, 1], device=device)
    x, idx = buf[1:].view(1, 4), buf[:4].view(1, 4)
    want = R.gather_particles(x, idx)  # [[0, 3, 2, 1]]
    with ops.use_backend(backend):
        ops.gather_particles_(x, idx, torch.empty_like(x))
    assert torch.equal(x, want), ("x overlaps idx", x.tolist(), want.tolist())


# ------------------------------------------------------------------ particle ops at the edges


@pytest.mark.parametrize("backend,device", PAIRS)
def test_single_particle_groups_with_special_log_weights(backend, device):
    """K = 1: the only ancestor is 0 whatever the weight; normalisation gives 0 and ESS 1 for a finite
    log-weight, NaN for -inf, +inf and NaN (no valid normalisation), as the reference."""
    for dtype in (torch.float32, torch.float64):
        lw = torch.tensor([[3.0], [-INF], [NAN], [INF], [-1e30]], dtype=dtype, device=device)
        with ops.use_backend(backend):
            norm, ess = ops.normalize_log_weights(lw)
            idx = {s: ops.resample_indices(lw, torch.full_like(lw, 1.0 - 2.0**-24), s) for s in SCHEMES}
        assert norm.dtype == ess.dtype == dtype
        torch.testing.assert_close(norm.cpu(), torch.tensor([[0.0], [NAN], [NAN], [NAN], [0.0]], dtype=dtype),
                                   equal_nan=True)
        torch.testing.assert_close(ess.cpu(), torch.tensor([1.0, NAN, NAN, NAN, 1.0], dtype=dtype),
                                   equal_nan=True)
        for s, got in idx.items():
            assert got.dtype == torch.int64 and torch.equal(got.cpu(), torch.zeros(5, 1, dtype=torch.long)), s


@pytest.mark.parametrize("backend,device", PAIRS)
def test_uniforms_exactly_zero_and_just_below_one_match_the_reference(backend, device):
    """u = 0 draws the first particle of positive weight; u just below 1 (in the uniforms' own dtype)
    the last one, never a zero weight, for every scheme and log-weight / uniform dtype pair."""
    lw = torch.tensor([[-INF, 0.0, 1.0, -INF, 2.0, -INF], [0.5, -INF, -INF, 0.5, -INF, -INF],
                       [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], dtype=torch.float64)
    for lw_dtype in (torch.float32, torch.float64):
        for u_dtype in (torch.float16, torch.float32, torch.float64):
            for u0 in (0.0, 1.0 - torch.finfo(u_dtype).eps / 2):
                u = torch.full(lw.shape, u0, dtype=u_dtype)
                for s in SCHEMES:
                    want = R.resample_indices(lw.to(lw_dtype), u, s)
                    with ops.use_backend(backend):
                        got = ops.resample_indices(lw.to(lw_dtype).to(device), u.to(device), s).cpu()
                    assert torch.equal(got, want), (lw_dtype, u_dtype, u0, s, got.tolist(), want.tolist())
                    assert torch.isfinite(lw.gather(1, got)).all(), (lw_dtype, u_dtype, u0, s)


def _huge_groups(dtype):
    g = torch.Generator().manual_seed(4)
    k = 4097  # one past a power of two: Triton blocks and tiles with a partial last one
    lw = 3.0 * torch.randn(2, k, generator=g, dtype=torch.float64)
    lw[0, ::3] = -INF
    lw[1, 4000:] = -INF  # trailing zero weights
    u = torch.rand(2, k, generator=g, dtype=torch.float64)
    u[:, 0], u[:, -1] = 0.0, 1.0 - 2.0**-24
    return lw.to(dtype), u.to(dtype)


def _check_huge(backend, device):
    for dtype in (torch.float32, torch.float64):
        lw, u = _huge_groups(dtype)
        for s in SCHEMES:
            want = R.resample_indices(lw, u, s)
            with ops.use_backend(backend):
                got = ops.resample_indices(lw.to(device), u.to(device), s).cpu()
            assert torch.isfinite(lw.gather(1, got)).all(), f"{s} {dtype}: a zero-weight particle drawn"
            if dtype == torch.float64:
                assert torch.equal(got, want), f"{s}: {int((got != want).sum())} ancestors differ"
            else:
                # float32 cumulative sums in another order move positions within ~K ulps of a cdf
                # entry to the neighbour; a handful of 8194 ancestors, never further than that
                differ = got != want
                assert int(differ.sum()) <= 16 and (got - want).abs().max() <= 3, (s, int(differ.sum()))
        with ops.use_backend(backend):
            norm, ess = ops.normalize_log_weights(lw.to(device))
        ref_norm, ref_ess = R.normalize_log_weights(lw)
        # sums of K float32 terms in another order: relative differences of a few 1e-6
        tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
        torch.testing.assert_close(norm.cpu(), ref_norm, **tol)
        torch.testing.assert_close(ess.cpu(), ref_ess, **tol)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_huge_groups(backend):
    """K = 4097 with zero weights inside and trailing: float64 ancestors equal the reference's."""
    _check_huge(backend, "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", [p for p in PAIRS if p.values[0] == "triton"])
def test_huge_groups_triton(backend, device):
    """As test_huge_groups (slow under the Triton CPU interpreter: about 80 s)."""
    _check_huge(backend, device)


# ------------------------------------------------------------------ backend switch


def test_set_backend_refuses_a_name_that_is_not_a_string():
    for bad in (3, b"cpp", ["cpp"]):
        with pytest.raises(TypeError, match=rf"backend={re.escape(repr(bad))} is not a backend name; "
                                            r"allowed: None or one of auto, cuda, triton, cpp, reference"):
            ops.set_backend(bad)
        with pytest.raises(TypeError, match=r"backend=.* is not a backend name"):
            with ops.use_backend(bad):
                pass
    assert ops._backend._override is None


def test_use_backend_nests_and_restores_on_exception(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    with pytest.raises(KeyError):
        with ops.use_backend("reference"):
            assert ops.requested_backend() == "reference"
            with ops.use_backend("cpp"):
                assert ops.requested_backend() == "cpp"
                with pytest.raises(ValueError, match=r"backend='nope' is not a backend; allowed: auto"):
                    with ops.use_backend("nope"):
                        pass
                assert ops.requested_backend() == "cpp"
                raise KeyError("inner")
    assert ops.requested_backend() == "auto" and ops._backend._override is None
    monkeypatch.setenv(ops.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=r"GLASS_FAST_BACKEND='bogus' is not a backend; allowed: auto"):
        ops.normalize_log_weights(torch.zeros(1, 2))
    with ops.use_backend("reference"):  # an override wins over a bad variable
        ops.normalize_log_weights(torch.zeros(1, 2))


def test_triton_interpreter_spellings_agree_with_the_backend_switch(monkeypatch):
    """Triton reads TRITON_INTERPRET as a boolean (1, true, on, yes); the backend switch does too, and
    the test helpers must agree with it, or the Triton CPU runs are dropped or held to compiled-kernel
    tolerances."""
    if not triton_interpreter_active():
        pytest.skip("triton not imported under TRITON_INTERPRET here")
    for value in ("1", "true", "On", "yes"):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert ops._backend.unavailable_reason("triton", "cpu") is None, value
        assert triton_interpreter_active() and interpreted("triton", "cpu"), value
        assert ("triton", "cpu") in backend_devices(), value
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_interpreter_active() and not interpreted("triton", "cpu")
    assert ("triton", "cpu") not in backend_devices()
