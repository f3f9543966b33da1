"""fused_step / fused_step_ on every available backend against the plain-PyTorch reference."""
import os

import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from glass_fast import ops  # noqa: E402
from glass_fast.ops import reference as R  # noqa: E402
from glass_fast.ops.testing import (INTERPRETER_BF16_ULPS, assert_within_reference_error,  # noqa: E402
                                    backend_device_params, backend_devices, interpreted)


PAIRS = backend_device_params()
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# (shape, per_sample coef, with x_t, with stage, layout, out dtype or None = state's); layout False is
# contiguous, True non-contiguous, "broadcast" 0-stride views (one sample expanded over the batch)
CASES = {
    "euler-shared": ((3, 5, 7), False, True, False, False, None),
    "batch1-odd": ((1, 1001), True, True, True, False, None),
    "no-xt-no-stage": ((2, 3, 11), False, False, False, False, None),
    "per-sample-stage": ((4, 33), True, False, True, False, None),
    "non-contiguous": ((3, 6, 10), True, True, True, True, None),
    "fp32-out": ((2, 17), True, True, False, False, torch.float32),
    "bf16-out": ((5, 9), False, True, True, False, torch.bfloat16),
    "broadcast": ((4, 3, 13), True, True, True, "broadcast", None),
}


def _inputs(case, dtype, device, seed=0):
    shape, per_sample, with_xt, with_stage, strided, out_dtype = CASES[case]
    g = torch.Generator().manual_seed(seed)

    def make(dt):
        if strided == "broadcast":
            return torch.randn((1,) + shape[1:], generator=g).to(device=device, dtype=dt).expand(shape)
        if strided:  # every other column of a wider tensor, then transposed: no contiguous view
            t = torch.randn(shape[:-1] + (2 * shape[-1],), generator=g)[..., ::2].transpose(0, -1)
            return t.to(device=device, dtype=dt)
        return torch.randn(shape, generator=g).to(device=device, dtype=dt)

    base = make(dtype)
    out = make(out_dtype or dtype)
    x_t = make(dtype) if with_xt else None
    stage = make(dtype) if with_stage else None
    rows = (base.shape[0], 6) if per_sample else (6,)
    coef = torch.randn(rows, generator=g, dtype=torch.float64).to(device)
    return base, out, coef, x_t, stage


def _truth(base, out, coef, x_t, stage):
    f = (lambda t: None if t is None else t.to(torch.float64))
    return R.fused_step(f(base), f(out), coef.double(), f(x_t), f(stage))


def _extra_ulps(backend, device, dtype):
    return INTERPRETER_BF16_ULPS if interpreted(backend, device) and dtype == torch.bfloat16 else 0.0


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", PAIRS)
def test_fused_step_matches_reference(backend, device, dtype, case):
    args = _inputs(case, dtype, device)
    ref_new, ref_y = R.fused_step(*args)
    true_new, true_y = _truth(*args)
    with ops.use_backend(backend):
        new, y = ops.fused_step(*args)
    assert new.dtype == args[0].dtype and y.dtype == args[1].dtype
    assert new.device == args[0].device
    assert_within_reference_error(new, ref_new, true_new, "new",
                                  _extra_ulps(backend, device, new.dtype))
    assert_within_reference_error(y, ref_y, true_y, "y_next", _extra_ulps(backend, device, y.dtype))


@pytest.mark.parametrize("case", ["euler-shared", "non-contiguous", "bf16-out", "broadcast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("backend,device", PAIRS)
def test_fused_step_inplace(backend, device, dtype, case):
    base, out, coef, x_t, stage = _inputs(case, dtype, device)
    ref_new, ref_y = R.fused_step(base, out, coef, x_t, stage)
    true_new, true_y = _truth(base, out, coef, x_t, stage)
    extra_new = _extra_ulps(backend, device, base.dtype)
    extra_y = _extra_ulps(backend, device, out.dtype)
    with ops.use_backend(backend):
        state = base.clone()  # clone keeps the strides of a non-contiguous input
        y_buf = torch.empty_like(out)
        got = ops.fused_step_(state, out, coef, x_t, stage, y_out=y_buf)
        assert got is y_buf
        assert_within_reference_error(state, ref_new, true_new, "new", extra_new)
        assert_within_reference_error(y_buf, ref_y, true_y, "y_next", extra_y)
        state = base.clone()
        y_alloc = ops.fused_step_(state, out, coef, x_t, stage)
        assert_within_reference_error(y_alloc, ref_y, true_y, "y_next", extra_y)
        # y_next may overwrite the model output buffer (the captured-loop pattern)
        state, out_buf = base.clone(), out.clone()
        ops.fused_step_(state, out_buf, coef, x_t, stage, y_out=out_buf)
        assert_within_reference_error(out_buf, ref_y, true_y, "y_next into out", extra_y)


@pytest.mark.parametrize("backend,device", PAIRS + [pytest.param("reference", "cpu", id="reference-cpu")])
def test_fused_step_in_place_aliasing(backend, device):
    """Outputs that share memory with inputs give what the reference's order gives: compute new and
    y_next from the old values, then write new into base and y_next into y_out."""
    g = torch.Generator().manual_seed(3)
    shape, n = (3, 701), 2103  # more than one Triton block (1024): programs that run one after another
    coef = torch.randn(3, 6, generator=g, dtype=torch.float64).to(device)
    buf = torch.randn(n + 5, generator=g).to(device)
    x_t = torch.randn(shape, generator=g).to(device)
    other = torch.randn(shape, generator=g).to(device)

    def expected(work, base, out, y_out, xt=x_t):
        new, y = R.fused_step(base.clone(), out.clone(), coef, xt.clone())
        base.copy_(new)
        y_out.copy_(y)
        return work

    def views(work):  # base = work[0:n], and views of work shifted by 1 and by 5 elements
        return work[:n].view(shape), work[1:n + 1].view(shape), work[5:n + 5].view(shape)

    def run(setup):
        want_buf, got_buf = buf.clone(), buf.clone()
        expected(want_buf, *setup(want_buf))
        with ops.use_backend(backend):
            base, out, y_out = setup(got_buf)
            ops.fused_step_(base, out, coef, x_t, y_out=y_out)
        return got_buf, want_buf

    cases = {
        "y_out is base": lambda w: (views(w)[0], views(w)[1].clone(), views(w)[0]),
        "out is base": lambda w: (views(w)[0], views(w)[0], torch.empty(shape, device=device)),
        "y_out is out, shifted from base": lambda w: (views(w)[0], views(w)[1], views(w)[1]),
        "y_out shifted by one from base": lambda w: (views(w)[0], views(w)[0].clone(), views(w)[1]),
        "y_out shifted by five from out": lambda w: (other.clone(), views(w)[0], views(w)[2]),
    }
    for name, setup in cases.items():
        got, want = run(setup)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)
    # x_t overwritten by y_next while other elements still need it
    want_buf, got_buf = buf.clone(), buf.clone()
    base = torch.randn(shape, generator=g).to(device)
    expected(want_buf, base.clone(), base.clone(), views(want_buf)[1], xt=views(want_buf)[0])
    with ops.use_backend(backend):
        ops.fused_step_(base.clone(), base.clone(), coef, views(got_buf)[0], y_out=views(got_buf)[1])
    torch.testing.assert_close(got_buf, want_buf, rtol=1e-6, atol=1e-6, msg="y_out shifted from x_t")


@pytest.mark.parametrize("backend,device", PAIRS + [pytest.param("reference", "cpu", id="reference-cpu")])
def test_fused_step_empty_tensors(backend, device):
    for shape, rows in (((0, 5), (0, 6)), ((0, 5), (6,)), ((3, 0), (3, 6)), ((2, 0, 4), (6,))):
        base = torch.randn(shape, device=device)
        with ops.use_backend(backend):
            new, y = ops.fused_step(base, base.clone(), torch.zeros(rows, device=device), x_t=base.clone())
            y2 = ops.fused_step_(base, base.clone(), torch.zeros(rows, device=device))
        assert new.shape == y.shape == y2.shape == shape


@pytest.mark.parametrize("backend,device", PAIRS + [pytest.param("reference", "cpu", id="reference-cpu")])
def test_fused_step_outputs_are_contiguous_for_channels_last_inputs(backend, device):
    """As documented: both outputs contiguous whatever the inputs' layout (the reference used to keep theirs)."""
    x = torch.randn(2, 3, 4, 5, device=device).to(memory_format=torch.channels_last)
    coef = torch.tensor([0.5, 0.0, 0.25, 1.5, 0.3, 0.7], device=device)
    with ops.use_backend(backend):
        new, y = ops.fused_step(x, x.clone(), coef, x_t=x.clone())
    assert new.is_contiguous() and y.is_contiguous()
    torch.testing.assert_close(new, 0.5 * x + 0.25 * x + 1.5 * x)


def test_reference_inplace_matches_functional():
    base, out, coef, x_t, stage = _inputs("per-sample-stage", torch.float32, "cpu")
    new, y = R.fused_step(base, out, coef, x_t, stage)
    state = base.clone()
    y2 = R.fused_step_(state, out, coef, x_t, stage)
    assert torch.equal(state, new) and torch.equal(y2, y)


def test_fused_step_euler_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    v = torch.tensor([[10.0, 20.0], [30.0, 40.0]])
    xt = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    coef = torch.tensor([[1.0, 0.0, 0.5, 0.1, 2.0, 3.0], [2.0, 0.0, 0.0, 1.0, 0.0, 1.0]])
    for backend in ["reference"] + [b for b, d in backend_devices() if d == "cpu"]:
        with ops.use_backend(backend):
            new, y = ops.fused_step(x, v, coef, x_t=xt)
        # row 0: new = x + 0.5 + 0.1 v ; y = 3 new + 2 ; row 1: new = 2x + v ; y = new
        assert torch.allclose(new, torch.tensor([[2.5, 4.5], [36.0, 48.0]])), backend
        assert torch.allclose(y, torch.tensor([[9.5, 15.5], [36.0, 48.0]])), backend


@pytest.mark.parametrize("backend", ["reference"] + [b for b, d in backend_devices() if d == "cpu"])
def test_fused_step_rejects_bad_arguments(backend):
    x = torch.randn(3, 4)
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match=r"coef has shape \(5,\)"):
            ops.fused_step(x, x, torch.zeros(5))
        with pytest.raises(ValueError, match=r"coef has shape \(2, 6\).*B = 3"):
            ops.fused_step(x, x, torch.zeros(2, 6))
        with pytest.raises(ValueError, match="out has shape"):
            ops.fused_step(x, torch.randn(3, 5), torch.zeros(6))
        with pytest.raises(TypeError, match="x_t has dtype torch.float16 but base has dtype"):
            ops.fused_step(x, x, torch.zeros(6), x_t=x.half())
        with pytest.raises(TypeError, match="coef has dtype torch.int64"):
            ops.fused_step(x, x, torch.zeros(6, dtype=torch.long))
        with pytest.raises(TypeError, match="y_out has dtype"):
            ops.fused_step_(x.clone(), x, torch.zeros(6), y_out=x.half())
        with pytest.raises(TypeError, match="base must be a torch.Tensor, got list"):
            ops.fused_step([[0.0]], x, torch.zeros(6))
        with pytest.raises(TypeError, match="base has dtype torch.int64; allowed: float32"):
            ops.fused_step(x.long(), x, torch.zeros(6))
        with pytest.raises(ValueError, match="out is on meta but base is on cpu; all tensors of an op"):
            ops.fused_step(x, x.to("meta"), torch.zeros(6))
        with pytest.raises(ValueError, match="coef is on meta but base is on cpu"):
            ops.fused_step(x, x, torch.zeros(6, device="meta"))
        with pytest.raises(ValueError, match=r"coef has shape \(3, 5\); allowed: \[6\] or \[B, 6\] with B = 3"):
            ops.fused_step(x, x, torch.zeros(3, 5))
        with pytest.raises(ValueError, match=r"coef has shape \(3, 6, 1\)"):
            ops.fused_step(x, x, torch.zeros(3, 6, 1))
        with pytest.raises(TypeError, match="coef has dtype torch.float16; allowed: float32, float64"):
            ops.fused_step(x, x, torch.zeros(6, dtype=torch.float16))
        with pytest.raises(TypeError, match="coef must be a torch.Tensor, got list"):
            ops.fused_step(x, x, [1.0, 0, 0, 0, 0, 1.0])
        with pytest.raises(TypeError, match="out has dtype torch.int32; allowed: float32"):
            ops.fused_step(x, x.int(), torch.zeros(6))
        with pytest.raises(ValueError, match=r"stage has shape \(3, 5\) but base has shape \(3, 4\)"):
            ops.fused_step(x, x, torch.zeros(6), stage=torch.randn(3, 5))
        with pytest.raises(TypeError, match="stage has dtype torch.bool; allowed"):
            ops.fused_step(x, x, torch.zeros(6), stage=x > 0)
        with pytest.raises(ValueError, match="x_t is on meta but base is on cpu"):
            ops.fused_step(x, x, torch.zeros(6), x_t=x.to("meta"))
        with pytest.raises(ValueError, match=r"y_out has shape \(4, 3\) but base has shape \(3, 4\)"):
            ops.fused_step_(x.clone(), x, torch.zeros(6), y_out=torch.empty(4, 3))
        with pytest.raises(TypeError, match="y_out has dtype torch.int64; allowed"):
            ops.fused_step_(x.clone(), x, torch.zeros(6), y_out=x.long())


CPP_CPU = [b for b, d in backend_devices() if b == "cpp" and d == "cpu"]


@pytest.mark.skipif(not CPP_CPU, reason="the C++ CPU extension is not built")
@pytest.mark.parametrize("offsets", [(0, 0), (1, 1), (1, 0), (3, 5)], ids=lambda o: f"new+{o[0]},y+{o[1]}")
@pytest.mark.parametrize("case", ["euler-shared", "batch1-odd", "per-sample-stage", "non-contiguous", "fp32-out"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpp_streaming_stores_match_the_reference(monkeypatch, dtype, case, offsets):
    """Above a size threshold (0 here) the C++ step streams its stores: outputs at every alignment (a
    scalar head up to the first 32-byte boundary; outputs not aligned alike fall back to ordinary stores)."""
    monkeypatch.setenv("GLASS_FAST_CPU_STREAM_MIN_BYTES", "0")
    base, out, coef, x_t, stage = _inputs(case, dtype, "cpu")
    ref_new, ref_y = R.fused_step(base, out, coef, x_t, stage)
    true_new, true_y = _truth(base, out, coef, x_t, stage)

    def at_offset(t, k):  # a contiguous copy of t whose data starts k elements into a larger buffer
        buf = torch.empty(t.numel() + k, dtype=t.dtype)
        view = buf[k:].view(t.shape)
        view.copy_(t)
        return view

    with ops.use_backend("cpp"):
        new, y = ops.fused_step(base, out, coef, x_t, stage)
        assert_within_reference_error(new, ref_new, true_new, "new")
        assert_within_reference_error(y, ref_y, true_y, "y_next")
        state = at_offset(base.contiguous(), offsets[0])
        y_buf = at_offset(torch.zeros_like(out).contiguous(), offsets[1])
        ops.fused_step_(state, out, coef, x_t, stage, y_out=y_buf)
        assert_within_reference_error(state, ref_new, true_new, "new in place")
        assert_within_reference_error(y_buf, ref_y, true_y, "y_next into y_out")


@pytest.mark.skipif(not CPP_CPU, reason="the C++ CPU extension is not built")
@pytest.mark.parametrize("stream", ["0", ""], ids=["streamed", "default-threshold"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_cpp_parallel_chunks_straddling_samples(monkeypatch, dtype, stream):
    """Sizes above the parallel grain (32768 elements): thread chunks start and end inside samples of
    odd length, each piece must use its own sample's coefficient row."""
    monkeypatch.setenv("GLASS_FAST_CPU_STREAM_MIN_BYTES", stream)
    g = torch.Generator().manual_seed(5)
    shape = (7, 33333)
    base, out, x_t, stage = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    coef = torch.randn(7, 6, generator=g, dtype=torch.float64)
    ref_new, ref_y = R.fused_step(base, out, coef, x_t, stage)
    true_new, true_y = _truth(base, out, coef, x_t, stage)
    with ops.use_backend("cpp"):
        new, y = ops.fused_step(base, out, coef, x_t, stage)
        state, y_buf = base.clone(), torch.empty_like(out)
        ops.fused_step_(state, out, coef, x_t, stage, y_out=y_buf)
    for got, ref, truth, name in ((new, ref_new, true_new, "new"), (y, ref_y, true_y, "y_next"),
                                  (state, ref_new, true_new, "new in place"), (y_buf, ref_y, true_y, "y_out")):
        assert_within_reference_error(got, ref, truth, name)


@pytest.mark.parametrize("backend", ["reference"] + [b for b, d in backend_devices() if d == "cpu"])
def test_fused_step_in_place_refuses_expanded_outputs(backend):
    """An expanded (stride 0) base or y_out cannot be written; refused before anything is written
    (the copy into it would fail after new had already overwritten base)."""
    x, coef = torch.randn(3, 4), torch.randn(6)
    for name, base, y_out in (("y_out", x.clone(), torch.zeros(1, 4).expand(3, 4)),
                              ("base", torch.zeros(1, 4).expand(3, 4), torch.empty(3, 4))):
        before = base.clone()
        pattern = rf"{name} has shape .* and strides .*: an expanded view.* cannot be written in place"
        with ops.use_backend(backend), pytest.raises(ValueError, match=pattern):
            ops.fused_step_(base, x, coef, y_out=y_out)
        assert torch.equal(base, before), f"{name}: base was written before the refusal"
        if backend == "cpp":
            with pytest.raises(ValueError, match=pattern):
                torch.ops.glass_fast.fused_step_(base, x, coef, None, None, y_out)
            assert torch.equal(base, before)


@pytest.mark.skipif(not CPP_CPU, reason="the C++ CPU extension is not built")
@pytest.mark.parametrize("value", ["64M", "-1", "1e9", " "])
def test_cpp_stream_threshold_that_is_not_a_byte_count_is_refused(monkeypatch, value):
    """A threshold such as "64M" (which atoll reads as 64 bytes: every step streamed) is refused with a
    message naming it; an integer is taken."""
    base, out, coef, x_t, stage = _inputs("euler-shared", torch.float32, "cpu")
    monkeypatch.setenv("GLASS_FAST_CPU_STREAM_MIN_BYTES", value)
    with ops.use_backend("cpp"), pytest.raises(ValueError, match=rf"GLASS_FAST_CPU_STREAM_MIN_BYTES='{value}' "
                                                                 r"is not a byte count; allowed: an integer >= 0"):
        ops.fused_step(base, out, coef, x_t, stage)
    monkeypatch.setenv("GLASS_FAST_CPU_STREAM_MIN_BYTES", "1000000")
    with ops.use_backend("cpp"):
        new, y = ops.fused_step(base, out, coef, x_t, stage)
    ref_new, ref_y = R.fused_step(base, out, coef, x_t, stage)
    torch.testing.assert_close(new, ref_new)
    torch.testing.assert_close(y, ref_y)
