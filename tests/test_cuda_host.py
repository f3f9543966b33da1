"""The CUDA kernels (csrc/cuda/kernels.cuh), compiled for the host, against the reference.

On a GPU the same cases run through the real device build (tests/test_ops*.py, ``cuda-cuda``); here the
kernels' own source runs on the CPU with the grids ops.cu launches (tests/cuda_host.py says what that
does and does not cover).
"""
import math

import pytest
import torch

import cuda_host
from glass_fast.ops import reference as R
from glass_fast.ops.testing import assert_within_reference_error
from test_ops import CASES, DTYPES, _inputs, _truth
from test_ops_particles import BY_HAND, INVALID_GROUPS, SCHEMES, SHAPES, _log_w, _near_ties

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    if cuda_host.compiler() is None:
        pytest.skip("no host C++ compiler (g++ or $CXX) to build the CUDA kernels for the CPU")
    kernels = cuda_host.build(str(tmp_path_factory.mktemp("cuda_host")))
    yield kernels
    kernels.lib.gf_host_set_thread_order(0)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t that starts one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


# ------------------------------------------------------------------ fused step


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_step_matches_reference(host, dtype, case):
    args = _inputs(case, dtype, "cpu")
    ref_new, ref_y = R.fused_step(*args)
    true_new, true_y = _truth(*args)
    new, y = host.fused_step(*args)
    assert new.dtype == args[0].dtype and y.dtype == args[1].dtype
    assert_within_reference_error(new, ref_new, true_new, "new")
    assert_within_reference_error(y, ref_y, true_y, "y_next")


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("state_dtype", DTYPES, ids=str)
def test_fused_step_every_state_and_output_dtype(host, state_dtype, out_dtype):
    """Every pair the launcher dispatches (a float32 state carried for a bf16 model, say)."""
    g = torch.Generator().manual_seed(3)
    shape = (3, 4, 12)  # rows of whole packs: the vector kernel with per-sample coefficients
    base = torch.randn(shape, generator=g).to(state_dtype)
    out = torch.randn(shape, generator=g).to(out_dtype)
    x_t, stage = (torch.randn(shape, generator=g).to(state_dtype) for _ in range(2))
    coef = torch.randn(3, 6, generator=g, dtype=torch.float64)
    args = (base, out, coef, x_t, stage)
    new, y = torch.empty_like(base), torch.empty_like(out)
    assert host.fused_step_into(*args, new, y) == 4
    ref_new, ref_y = R.fused_step(*args)
    true_new, true_y = _truth(*args)
    assert_within_reference_error(new, ref_new, true_new, "new")
    assert_within_reference_error(y, ref_y, true_y, "y_next")


# (shape, per-sample coefficients): the vector width the launcher must choose for aligned operands
PATHS = {
    "shared, tail of 3": ((5, 7, 11), False, 4),
    "per-sample, rows of whole packs": ((6, 40), True, 4),
    "per-sample, rows of 37": ((4, 37), True, 1),
    "one element": ((1, 1), True, 4),
    "several blocks": ((3, 2049), False, 4),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_fused_step_vector_scalar_and_grid_stride_agree(host, dtype, path):
    """The vector kernel, the scalar kernel (misaligned operands) and either with a grid too small for
    the work (grid-stride loops) give the same bits; the launcher picks the width it should."""
    shape, per_sample, width = PATHS[path]
    g = torch.Generator().manual_seed(4)
    base, out, x_t, stage = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    coef = torch.randn((shape[0], 6) if per_sample else (6,), generator=g, dtype=torch.float64)
    want_new, want_y = R.fused_step(base, out, coef, x_t, stage)
    runs = []
    for grid in (0, 1, 3):
        new, y = torch.empty_like(base), torch.empty_like(out)
        assert host.fused_step_into(base, out, coef, x_t, stage, new, y, grid) == width
        runs.append((new, y))
        new, y = _misaligned(torch.empty_like(base)), _misaligned(torch.empty_like(out))
        moved = [_misaligned(t) for t in (base, out, x_t, stage)]
        assert host.fused_step_into(moved[0], moved[1], coef, moved[2], moved[3], new, y, grid) == 1
        runs.append((new, y))
    for new, y in runs:
        assert torch.equal(new, runs[0][0]) and torch.equal(y, runs[0][1])
    truth = _truth(base, out, coef, x_t, stage)
    assert_within_reference_error(runs[0][0], want_new, truth[0], "new")
    assert_within_reference_error(runs[0][1], want_y, truth[1], "y_next")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_step_in_place_on_its_inputs(host, dtype):
    """ops.cu's in-place entry writes new into base and y_next into out itself (y_out = out), or both
    into base (y_out = base)."""
    g = torch.Generator().manual_seed(5)
    shape = (4, 3, 10)
    base, out, x_t, stage = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    coef = torch.randn(4, 6, generator=g, dtype=torch.float64)
    want_new, want_y = host.fused_step(base, out, coef, x_t, stage)
    host.fused_step_into(base, out, coef, x_t, stage, base, out)
    assert torch.equal(base, want_new) and torch.equal(out, want_y)
    # y_out = base: both results land in base, y_next last (the reference copies new, then y_next)
    base = torch.randn(shape, generator=g).to(dtype)
    _, want_y = host.fused_step(base, base, coef, x_t, stage)
    host.fused_step_into(base, base, coef, x_t, stage, base, base)
    assert torch.equal(base, want_y)


# ------------------------------------------------------------------ particle ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(2, 1000)], ids=str)
def test_normalize_matches_reference(host, shape, dtype):
    lw = _log_w(shape, dtype)
    ref_n, ref_e = R.normalize_log_weights(lw)
    true_n, true_e = R.normalize_log_weights(lw.double())
    n, e = host.normalize_log_weights(lw)
    finite = torch.isfinite(ref_n)
    assert torch.equal(torch.isfinite(n), finite) and torch.equal(torch.isneginf(n), torch.isneginf(ref_n))
    assert_within_reference_error(n[finite], ref_n[finite], true_n[finite], "normalised log-weights")
    assert_within_reference_error(e, ref_e, true_e, "ess")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_invalid_groups(host, dtype):
    """All -inf, NaN or +inf: NaN normalisation and ESS, identity ancestors; the valid neighbours
    are untouched."""
    valid = [0.3, -1.0, 2.0, -math.inf, 0.0]
    lw = torch.tensor([valid] + list(INVALID_GROUPS.values()) + [valid], dtype=dtype)
    u = torch.rand(lw.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    n, e = host.normalize_log_weights(lw)
    assert torch.isnan(n[1:-1]).all() and torch.isnan(e[1:-1]).all() and torch.isfinite(e[[0, -1]]).all()
    for scheme in SCHEMES:
        idx = host.resample_indices(lw, u, scheme)
        assert torch.equal(idx[1:-1], torch.arange(5).expand(len(INVALID_GROUPS), 5)), scheme
        assert torch.equal(idx, R.resample_indices(lw, u, scheme)), scheme


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_resample_same_ancestors_as_reference(host, shape, scheme):
    lw = _log_w(shape, seed=1)
    u = torch.rand(shape, generator=torch.Generator().manual_seed(2))
    ref = R.resample_indices(lw, u, scheme)
    got = host.resample_indices(lw, u, scheme)
    if shape[1] == 1:
        assert (got == 0).all()
        return
    ties = _near_ties(lw, u, scheme)
    assert ties.float().mean() < 0.01, "too many near-ties for a meaningful comparison"
    mismatch = (got != ref) & ~ties
    assert not mismatch.any(), f"{int(mismatch.sum())} ancestors differ away from cdf ties"
    if shape[1] > 2:
        assert not (got == 1).any(), "a zero-weight particle was selected"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resample_other_dtypes_and_exact_cases(host, scheme):
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        lw = _log_w((3, 40), dtype, seed=3)
        u = torch.rand((3, 40), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        mismatch = (host.resample_indices(lw, u, scheme) != R.resample_indices(lw, u, scheme))
        assert not (mismatch & ~_near_ties(lw, u, scheme)).any(), dtype
    # positions at and past the ends of [0, 1), NaN included
    lw = torch.tensor([[0.0, 1.0, -1.0, 0.5]] * 5)
    u = torch.tensor([[0.0, 0.3, 0.6, 0.9], [1.0] * 4, [-0.5, 0.2, 0.2, 0.2], [math.nan] * 4,
                      [0.999999, 2.0, math.inf, -math.inf]])
    assert torch.equal(host.resample_indices(lw, u, scheme), R.resample_indices(lw, u, scheme))
    # ... with trailing particles of weight zero, which such positions must not reach either
    lw = torch.tensor([[0.0, 1.0, -math.inf, 0.5, -math.inf, -math.inf]] * 4)
    u = torch.tensor([[1.0] * 6, [2.0] * 6, [math.inf] * 6, [math.nan] * 6])
    idx = host.resample_indices(lw, u, scheme)
    assert torch.equal(idx, R.resample_indices(lw, u, scheme)) and torch.isfinite(lw.gather(1, idx)).all()
    # a huge weight takes every draw; one particle per group draws itself
    for dtype, big in ((torch.float32, 1e30), (torch.float64, 1e300)):
        lw = torch.tensor([[0.0, big, -big, 1.0]], dtype=dtype)
        assert host.resample_indices(lw, torch.rand(1, 4), scheme).tolist() == [[1, 1, 1, 1]]
    lw = torch.tensor([[3.0], [-math.inf], [math.nan], [math.inf]])
    assert (host.resample_indices(lw, torch.rand(4, 1), scheme) == 0).all()
    # zero weights after the last positive one, and positions just below 1
    lw = torch.randn(64, 6, generator=torch.Generator().manual_seed(11))
    lw[:, 4:] = -math.inf
    lw[:32, 1] = -math.inf
    idx = host.resample_indices(lw, torch.full_like(lw, 1.0 - 2.0**-24), scheme)
    assert torch.isfinite(lw.gather(1, idx)).all(), "a particle of weight zero was drawn"


@pytest.mark.parametrize("scheme,log_w,u,expected", BY_HAND)
def test_resample_by_hand(host, scheme, log_w, u, expected):
    got = host.resample_indices(torch.tensor([log_w], dtype=torch.float64),
                                torch.tensor([u], dtype=torch.float64), scheme)
    assert got.tolist() == [expected]


# (particle shape [B, K, ...], dtype, storage offset in elements) -> bytes per unit the launcher picks
GATHERS = [
    ((2, 3, 8), torch.float32, 0, 16),
    ((2, 3, 6), torch.float32, 0, 8),   # 24-byte rows
    ((2, 3, 5), torch.float32, 0, 4),
    ((2, 3, 3), torch.float16, 0, 2),
    ((2, 3, 7), torch.uint8, 0, 1),
    ((2, 3, 8), torch.float32, 1, 4),   # 16-byte rows, source 4 bytes past an alignment boundary
    ((2, 3, 2, 4200), torch.float32, 0, 16),  # rows of three tiles (2100 units; 1024 per tile)
    ((1, 1), torch.float64, 0, 8),
]


@pytest.mark.parametrize("shape,dtype,offset,unit", GATHERS, ids=str)
def test_gather_matches_reference(host, shape, dtype, offset, unit):
    g = torch.Generator().manual_seed(5)
    x = (100 * torch.randn(shape, generator=g)).to(dtype)
    if offset:
        buf = torch.empty(x.numel() + offset, dtype=dtype)
        x = buf[offset:].view(shape).copy_(x)
    idx = torch.randint(0, shape[1], shape[:2], generator=g)
    want = R.gather_particles(x, idx)
    for grid in (0, 1, 5):  # the library's grid, then blocks striding over the tiles
        res = torch.empty_like(want)
        assert host.gather_into(x, idx, res, grid) == unit
        assert torch.equal(res, want), grid


# ------------------------------------------------------------------ thread order


def test_results_do_not_depend_on_the_order_of_threads(host):
    """Between two barriers a block's threads may run in any order on the device: running them in
    reverse gives the same bits (a thread reading another's write without a barrier would not)."""
    g = torch.Generator().manual_seed(6)
    lw = _log_w((5, 300), seed=6)
    u = torch.rand(5, 300, generator=g)
    base, out, x_t = (torch.randn(4, 1001, generator=g) for _ in range(3))
    coef = torch.randn(4, 6, generator=g, dtype=torch.float64)
    x, idx = torch.randn(3, 4, 2100, generator=g), torch.randint(0, 4, (3, 4), generator=g)

    def run():
        return ([*host.normalize_log_weights(lw)] + [host.resample_indices(lw, u, s) for s in SCHEMES]
                + [*host.fused_step(base, out, coef, x_t)] + [host.gather_particles(x, idx)])

    forward = run()
    host.lib.gf_host_set_thread_order(1)
    try:
        backward = run()
    finally:
        host.lib.gf_host_set_thread_order(0)
    for a, b in zip(forward, backward):
        assert torch.equal(a, b)
