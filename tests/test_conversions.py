"""Raw output <-> denoiser conversions: accuracy of the opmath-dtype arithmetic against float64, the a_o = 0
case, and per-row device coefficients that are never read on the host."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import glass_fast as gf
from glass_fast.model import (PREDICTIONS, combine_output, denoiser_coefficients, output_from_denoised, solve_output,
                              velocity_coefficients)

SCHEDULES = [gf.LinearSchedule(), gf.CosineSchedule(), gf.VPSchedule()]
# Unit roundoffs (half an ulp at 1): round to nearest makes each rounding's relative error at most u.
U = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _gamma(u: float, k: int = 3) -> float:
    """Bound on (1 + u)^k - 1, the relative error of k successive roundings (that difference is 0 in float64)."""
    return k * u / (1 - k * u)


def _case(sch, prediction, n=4096, seed=0):
    """at(t) -> (x, out) in float64: x_t = alpha z + sigma eps for fixed draws (z, eps), and the exact output
    of a ``prediction`` model there (so D = z: the terms cancel as they do in sampling)."""
    g = torch.Generator().manual_seed(seed)
    z, eps = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)

    def at(t: float):
        tt = torch.tensor(t, dtype=torch.float64)
        a, s, da, ds = sch.alpha(tt), sch.sigma(tt), sch.d_alpha(tt), sch.d_sigma(tt)
        out = {"x0": z, "epsilon": eps, "velocity": da * z + ds * eps, "score": -eps / s}[prediction]
        return a * z + s * eps, out
    return at


def _times(model):
    """The time range's ends, a point just inside each, and interior points."""
    lo, hi = model.time_range
    return [lo, lo + 1e-4, 0.01, 0.3, 0.7, 0.99, hi - 1e-4, hi]


def _check(model, method, x, out, t, dtype, per_row):
    """Max over the elements of |result - float64 reference| / the rounding bound; None where singular."""
    coefficients = denoiser_coefficients if method == "denoise" else velocity_coefficients
    tc = torch.tensor(model.clamp_time(t), dtype=torch.float64)
    c_x, c_o = (float(c) for c in coefficients(model.schedule, model.prediction, tc))
    if not (abs(c_x) < float("inf") and abs(c_o) < float("inf") and bool(torch.isfinite(out).all())):
        return None   # singular at sigma = 0: a non-velocity model's velocity; VP's exact velocity (sigma' = inf)
    xs, outs = x.to(dtype), out.to(dtype)
    model.fn = lambda x_, t_: outs.clone()
    arg = torch.full((x.shape[0],), t, dtype=torch.float64) if per_row else t
    got = getattr(model, method)(xs, arg).double()
    x64, out64 = xs.double(), outs.double()
    ref = c_x * x64 + c_o * out64
    mag = abs(c_x) * x64.abs() + abs(c_o) * out64.abs()
    # fp32 (the opmath dtype for half precision too): coefficient, product and sum each rounded once;
    # the reference's own float64 error; a half-precision result rounded once more.
    work = torch.float64 if dtype == torch.float64 else torch.float32
    bound = (_gamma(U[work]) + _gamma(U[torch.float64])) * mag
    if dtype in (torch.bfloat16, torch.float16):   # rounded once more, to a normal or a subnormal number
        bound = bound * (1 + U[dtype]) + U[dtype] * ref.abs() + 0.5 * torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    err = (got - ref).abs()
    return float((err / bound).max())


@pytest.mark.parametrize("per_row", [False, True], ids=["float_t", "tensor_t"])
@pytest.mark.parametrize("method", ["denoise", "velocity"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("sch", SCHEDULES, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_conversion_error_within_rounding_bound(sch, prediction, method, per_row, dtype):
    # Within the error the arithmetic's roundings allow, at every time of the default range including its
    # ends, where epsilon and score divide by alpha -> 0 (tens of thousands) and the terms cancel.
    model = gf.FlowModel(lambda x, t: x, sch, prediction)
    at = _case(sch, prediction, n=512 if per_row else 4096)
    checked = 0
    for t in _times(model):
        x, out = at(model.clamp_time(t))
        r = _check(model, method, x, out, t, dtype, per_row)
        if r is not None:
            assert r <= 1.0, f"t={t}: error {r:.3g} x the rounding bound"
            checked += 1
    assert checked >= len(_times(model)) - 2   # at most the two ends are singular


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_solve_output_inverts_combine_output(prediction):
    sch = gf.CosineSchedule()
    t = torch.tensor([0.05, 0.5, 0.9], dtype=torch.float64)
    c = denoiser_coefficients(sch, prediction, t)
    x, out = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(solve_output(c, x, combine_output(c, x, out)), out)
    torch.testing.assert_close(output_from_denoised(sch, prediction, t, x, combine_output(c, x, out)), out)
    # x None: the change of output that moves D by delta
    delta = torch.randn(3, 4, dtype=torch.float64)
    moved = combine_output(c, x, out + solve_output(c, None, delta))
    torch.testing.assert_close(moved, combine_output(c, x, out) + delta)


@pytest.mark.parametrize("prediction", ["velocity", "epsilon"])
@pytest.mark.parametrize("t", [1.0, torch.tensor([0.5, 1.0], dtype=torch.float64)], ids=["float", "tensor"])
def test_output_that_does_not_enter_the_denoiser_is_zero(prediction, t):
    # At sigma = 0, D = x / alpha whatever the output: the inverse gives 0, not NaN or Inf.
    sch = gf.LinearSchedule()
    c = denoiser_coefficients(sch, prediction, t)
    x = torch.randn(2, 3, dtype=torch.float64)
    d = combine_output(c, x, torch.randn(2, 3, dtype=torch.float64))
    torch.testing.assert_close(d[-1], x[-1])                          # alpha_1 = 1
    back = solve_output(c, x, d)
    assert bool(torch.isfinite(back).all()) and bool((back[-1] == 0).all())
    torch.testing.assert_close(combine_output(c, x, back), d)


@pytest.mark.parametrize("method", ["denoise", "velocity"])
def test_device_times_are_never_read_on_the_host(method):
    # A meta tensor has no values: any read on the host (float(), .item(), a Python branch) raises, as a
    # CUDA tensor's would synchronise the stream.
    model = gf.FlowModel(lambda x, t: x * 0.5, gf.CosineSchedule(), "epsilon")
    x, t = torch.empty(5, 2, 3, device="meta"), torch.empty(5, dtype=torch.float64, device="meta")
    got = getattr(model, method)(x, t)
    assert got.shape == x.shape and got.device.type == "meta"
    c = denoiser_coefficients(model.schedule, model.prediction, t)
    assert solve_output(c, x, x).shape == x.shape and solve_output(c, None, x).shape == x.shape


class _OutputDtypes(TorchDispatchMode):
    """Records (dtype, numel) of every tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen += [(o.dtype, o.numel()) for o in (out if isinstance(out, (tuple, list)) else (out,))
                      if isinstance(o, torch.Tensor)]
        return out


@pytest.mark.parametrize("method", ["denoise", "velocity"])
@pytest.mark.parametrize("t", [0.4, torch.full((8,), 0.4)], ids=["float", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_float64_copy_of_the_state(dtype, t, method):
    # Coefficients are float64 (per row at most); the state-sized work is float32.
    model = gf.FlowModel(lambda x, t: x * 0.5, gf.CosineSchedule(), "epsilon")
    x = torch.randn(8, 64).to(dtype)
    with _OutputDtypes() as mode:
        getattr(model, method)(x, t)
    state_sized = {dt for dt, n in mode.seen if n >= x.numel()}
    assert torch.float32 in state_sized and torch.float64 not in state_sized
